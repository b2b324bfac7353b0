"""model.scoring_decoder: a small AutoencoderTiny decodes the x0-predictions the pixel judge scores (and nothing else),
a decoder for another latent space is refused in one line, and the shipped world:tiny_decoder reproduces the world
VAE's decode."""

import pytest
import torch

from conftest import tiny_spo_args
from spo.config import SPOConfig, load_config
from spo.errors import SPOError
from spo.models import Diffusion, load_pipeline, load_scoring_decoder
from spo.resampler import resample
from spo.trainer import SPOTrainer
from spo.world.tiny_decoder import psnr, tiny_autoencoder

CONSTANT = -0.4  # what the marked decoder below draws everywhere


def _marked_decoder(latent_channels: int = 4, **config):
    """A random AutoencoderTiny whose last conv is zero, bias 0.3: every image it decodes is 2·0.3 − 1 = −0.4."""
    torch.manual_seed(0)
    decoder = tiny_autoencoder(latent_channels, channels=8, blocks=(1, 0))
    if config:
        decoder.register_to_config(**config)
    last = decoder.decoder.layers[-1]
    with torch.no_grad():
        last.weight.zero_(), last.bias.fill_(0.3)
    return decoder


def _constant(images) -> bool:
    return torch.allclose(images, torch.full_like(images, CONSTANT), atol=1e-6)


@pytest.fixture()
def diffusion(tiny_world):
    return Diffusion(load_pipeline(tiny_world / "sd"))


def test_the_scoring_decoder_decodes_only_what_the_judge_scores(diffusion):
    z = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    vae_images = diffusion.decode(z)
    decoder = tiny_autoencoder(4, channels=8, blocks=(1, 0))
    diffusion.set_scoring_decoder(decoder)
    with torch.no_grad():
        expected = decoder.decoder(z).clamp(-1, 1)  # TAESD reads the denoiser's latents as they are
        torch.testing.assert_close(diffusion.scoring_decode(z), expected)
        torch.testing.assert_close(diffusion.decode(z), vae_images)  # final images, evaluation: still the VAE
        cond, uncond = diffusion.encode_prompts(["a red circle"] * 3)
        t = torch.full((3,), 500)
        images, out = diffusion.x0_images(z, t, cond, uncond, 5.0)
        torch.testing.assert_close(images, decoder.decoder(diffusion.x0_prediction(z, out, t)).clamp(-1, 1))
    assert decoder.training is False and not any(p.requires_grad for p in decoder.parameters())


def test_the_decoders_own_scale_and_shift_are_applied_as_pipelines_apply_them(diffusion):
    decoder = _marked_decoder(scaling_factor=2.0, shift_factor=0.5)
    with torch.no_grad():
        decoder.decoder.layers[-1].weight.normal_()  # no longer constant: the input matters
    diffusion.set_scoring_decoder(decoder)
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(diffusion.scoring_decode(z), decoder.decoder(z / 2.0 + 0.5).clamp(-1, 1))
        assert not torch.allclose(diffusion.scoring_decode(z), decoder.decoder(z).clamp(-1, 1))


def test_the_resampler_scores_x0_predictions_with_the_scoring_decoder(diffusion):
    seen = []

    def judge(images, captions, t):
        seen.append(images.clone())
        return images.mean((1, 2, 3)) + torch.arange(len(images)) * 1e-3  # distinct scores: pairs are kept

    diffusion.set_scoring_decoder(_marked_decoder())
    result = resample(diffusion, judge, ["a red circle", "a blue square"], num_steps=4, guidance=5.0, eta=1.0,
                      num_candidates=3, threshold=0.0, divert_start_step=1, generator=torch.Generator().manual_seed(0))
    assert len(seen) == 3 and len(result.pairs) == 3 * 2  # steps 1, 2 (x0-predictions) and 3 (final latents)
    for images in seen[:-1]:
        assert images.shape == (6, 3, 32, 32) and _constant(images)
    assert not _constant(seen[-1])  # the final candidates are clean latents: decoded by the VAE


def test_spo_trains_an_epoch_with_a_scoring_decoder(tiny_world, tiny_spm, tmp_path):
    folder = tmp_path / "tiny_decoder"
    _marked_decoder().save_pretrained(folder)
    cfg = load_config(SPOConfig, None, tiny_spo_args(tiny_world, tiny_spm, tmp_path / "run", "train.num_epochs=1",
                                                     f"model.scoring_decoder={folder}"))
    trainer = SPOTrainer(cfg, log=lambda m: None).setup()
    decoder = trainer.diffusion.scoring_decoder
    calls = []
    decoder.decoder.register_forward_hook(lambda module, args, out: calls.append(out.shape[0]))
    lora = trainer.train()
    assert (lora / "pytorch_lora_weights.safetensors").is_file()
    # 2 prompts x 4 candidates at diverted steps 1 and 2 (step 3 scores final latents with the VAE)
    assert calls == [8, 8]
    assert trainer.diffusion.pipe.vae is not decoder  # final images and validation keep the pipeline's VAE


def test_a_decoder_for_another_latent_space_is_refused_in_one_line(tiny_world, tiny_spm, tmp_path):
    folder = tmp_path / "taesd3_like"
    _marked_decoder(latent_channels=16).save_pretrained(folder)
    cfg = load_config(SPOConfig, None, tiny_spo_args(tiny_world, tiny_spm, tmp_path / "run",
                                                     f"model.scoring_decoder={folder}"))
    with pytest.raises(SPOError) as err:
        SPOTrainer(cfg, log=lambda m: None).setup()
    message = str(err.value)
    assert "16 latent channels" in message and "has 4" in message and "\n" not in message
    with pytest.raises(SPOError, match="could not load an AutoencoderTiny"):
        load_scoring_decoder(tmp_path / "missing")


# The shipped decoder's mean PSNR against the VAE decode on the 72 held-out latents drawn below is 30.9 dB (32.6 and
# 31.4 with seeds 8 and 9; 30.1 dB on the distillation's own held-out set); an untrained one of its shape scores ~7 dB.
PSNR_BOUND = 28.0


def test_the_shipped_tiny_decoder_reproduces_the_world_vae_decode():
    from pathlib import Path

    from spo.models import load_diffusion
    from spo.plugins import resolve
    from spo.world.prompts import split_prompts
    from spo.world.tiny_decoder import distillation_data, tiny_decode

    folder = Path(resolve("world:tiny_decoder"))
    assert sum(p.stat().st_size for p in folder.iterdir()) < 2e6
    diffusion = load_diffusion(resolve("world:sd"))
    decoder = load_scoring_decoder(folder)
    data = distillation_data(diffusion, split_prompts(0)["test"], n=24, seed=7, steps=6)  # held-out captions
    values = psnr(tiny_decode(decoder, data["latents"]), data["targets"])
    assert values.mean() > PSNR_BOUND, values
    untrained = tiny_autoencoder(4).eval()  # the bound is not met by any decoder of this shape
    assert psnr(tiny_decode(untrained, data["latents"]), data["targets"]).mean() < PSNR_BOUND - 5


def test_evaluate_spm_scores_the_tiny_decoders_images(tiny_world, tiny_spm, tmp_path):
    """With the marked decoder every x0-prediction is the same flat image, so every judge scores both images of a
    pair alike and 'orders' each decided pair as image 1 first: all accuracies equal that share of the labels."""
    import json

    import numpy as np
    from click.testing import CliRunner

    from spo.cli import cli
    from spo.preference.data import load_preference_dataset

    folder = tmp_path / "tiny_decoder"
    _marked_decoder().save_pretrained(folder)
    args = ["evaluate-spm", "--spm", str(tiny_spm), "--base", str(tiny_world / "pickscore"),
            "--dataset", str(tiny_world / "preference"), "--diffusion-model", str(tiny_world / "sd"),
            "--timesteps", "0,500", "--max-pairs", "8", "--scoring-decoder", str(folder), "--out", str(tmp_path / "e")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    acc = json.loads((tmp_path / "e" / "accuracy.json").read_text())["accuracy"]
    labels = np.asarray(load_preference_dataset(str(tiny_world / "preference"), "test")["label_0"][:8])
    expected = float((labels[labels != 0.5] == 0).mean())
    assert set(acc) == {"base (naive)", "SPM", "utility on x0-prediction"}
    assert all(values == pytest.approx([expected, expected]) for values in acc.values()), (acc, expected)

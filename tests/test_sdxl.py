"""SDXL through the same code path as SD: a tiny StableDiffusionXLPipeline built from config.

Two tiny CLIP text encoders (the second with projection), a UNet with SDXL's "text_time"
micro-conditioning, a tiny VAE and SDXL's DDIM scheduler, saved with `save_pretrained`, then run
through loading (with and without a separate VAE), SPM training, SPO training with inner steps,
LoRA export into stock diffusers, and `spo generate`.
"""

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import assert_stock_reload_matches, deterministic_latents

from spo.cli import cli
from spo.config import load_config
from spo.errors import SPOError
from spo.models import Conditioning, Diffusion, guided_output, load_pipeline
from spo.config import SPOConfig
from spo.trainer import SPOTrainer
from spo.world import resolve

TEXT_DIMS = (16, 24)  # the two text encoders' widths; the UNet sees their concatenation
POOLED_DIM = 24  # projection of the second text encoder
TIME_DIM = 4  # per micro-conditioning number; SDXL feeds 6 of them (sizes and crop)
PROMPTS = ["a red circle", "a blue square above a yellow triangle"]
CONFIGS = Path(__file__).parents[1] / "configs"


def _text_encoder(cls, tokenizer, width: int, seed: int):
    from transformers import CLIPTextConfig

    torch.manual_seed(seed)
    return cls(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length, projection_dim=POOLED_DIM,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))


def _vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                         layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, sample_size=32,
                         scaling_factor=0.13025, force_upcast=False)


def tiny_sdxl_pipeline():
    """Every SDXL component at toy size; 16x16 latents, 32 px images (the world's image size)."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(resolve("world:tokenizer"))
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8, use_linear_projection=True, cross_attention_dim=sum(TEXT_DIMS),
        addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
        projection_class_embeddings_input_dim=6 * TIME_DIM + POOLED_DIM)
    scheduler = DDIMScheduler(  # SDXL base's scheduler configuration
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
        timestep_spacing="leading")
    return StableDiffusionXLPipeline(
        vae=_vae(1), unet=unet, scheduler=scheduler, tokenizer=tokenizer, tokenizer_2=tokenizer,
        text_encoder=_text_encoder(CLIPTextModel, tokenizer, TEXT_DIMS[0], 2),
        text_encoder_2=_text_encoder(CLIPTextModelWithProjection, tokenizer, TEXT_DIMS[1], 3),
        add_watermarker=False)


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sdxl")
    tiny_sdxl_pipeline().save_pretrained(out / "pipeline")
    _vae(7).save_pretrained(out / "vae")  # a different VAE, for the separate-VAE option
    return out


@pytest.fixture(scope="module")
def sdxl_spm(sdxl_dir, tmp_path_factory):
    """A step-aware preference model trained through `spo train-spm` with the SDXL model as the noiser."""
    out = tmp_path_factory.mktemp("spm-sdxl")
    result = CliRunner().invoke(cli, [
        "train-spm", "data.dataset=world:preference", "data.split=validation",
        f"model.diffusion_model={sdxl_dir / 'pipeline'}", f"model.vae={sdxl_dir / 'vae'}", "model.base=world:pickscore",
        f"log.output_dir={out}", "train.max_steps=2", "train.batch_size=2", "log.report_to=none"])
    assert result.exit_code == 0, result.output
    return out / "spm"


def _spo_config(sdxl_dir, spm, out, *extra):
    """The shipped SDXL recipe, shrunk to seconds on the tiny model."""
    return load_config(SPOConfig, CONFIGS / "sdxl.yaml", [
        "prompts=world:train", f"model.pretrained={sdxl_dir / 'pipeline'}", "model.vae=", f"model.spm={spm}",
        "model.lora_rank=4", "model.lora_alpha=4", "model.gradient_checkpointing=false", "sample.num_steps=4",
        "sample.divert_start_step=1", "sample.inner_steps=1", "sample.threshold=0", "sample.batches_per_epoch=1",
        "train.num_epochs=1", "train.mixed_precision='no'", "train.learning_rate=1e-2", f"log.output_dir={out}",
        "log.report_to=none", *extra])


def test_the_sdxl_presets_hold_the_papers_settings():
    from spo.config import SPMTrainConfig

    cfg = load_config(SPOConfig, CONFIGS / "sdxl.yaml")
    s, t, m = cfg.sample, cfg.train, cfg.model
    assert (s.num_candidates, s.threshold, s.num_steps, s.eta) == (2, 0.4, 20, 1.0)
    assert (s.guidance_scale, s.divert_start_step) == (5.0, 4)
    assert (m.lora_rank, m.lora_alpha, t.learning_rate) == (64, 64.0, 1e-5)
    assert (t.batch_size, t.gradient_accumulation_steps, t.max_grad_norm) == (2, 2, 0.0)
    assert (t.beta, t.eps, m.vae) == (10.0, 0.1, "madebyollin/sdxl-vae-fp16-fix")
    spm = load_config(SPMTrainConfig, CONFIGS / "spm_sdxl.yaml")
    assert spm.model.vae == m.vae and "xl" in spm.model.diffusion_model
    # the authors' relabelling: PickScore at t=0, a 2-way gap <= 0.1 becomes a kept tie
    assert (spm.data.relabel_threshold, spm.data.relabel_ties) == (0.1, "tie")
    assert (spm.train.learning_rate, spm.train.conditioning_learning_rate, spm.train.weight_decay) == (1e-6, 0, 0.3)
    assert (spm.train.lr_scheduler, spm.train.lr_warmup_steps, spm.train.max_steps) == ("linear", 500, 7000)


# ---------------------------------------------------------------- loading and conditioning


def test_sdxl_checkpoint_is_detected_and_conditioned_with_pooled_embeddings_and_time_ids(sdxl_dir):
    from diffusers import StableDiffusionXLPipeline

    d = Diffusion(load_pipeline(sdxl_dir / "pipeline"))
    assert isinstance(d.pipe, StableDiffusionXLPipeline) and d.family == "sdxl"
    assert d.resolution == 32  # sample_size 16 x VAE factor 2
    assert len(d.frozen_modules()) == 3  # VAE and both text encoders
    cond, uncond = d.encode_prompts(PROMPTS)
    assert cond.embeds.shape == (2, 24, sum(TEXT_DIMS)) and cond.pooled.shape == (2, POOLED_DIM)
    assert cond.time_ids.tolist() == [[32, 32, 0, 0, 32, 32]] * 2  # generated at full size, uncropped
    assert uncond.embeds.abs().sum() == 0 and uncond.pooled.abs().sum() == 0  # SDXL's zeroed empty prompt
    # rows behave like a tensor's, so the resampler and trainer can select, repeat and join them
    both = Conditioning.cat([cond, cond[torch.tensor([1])]]).repeat_interleave(2)
    assert len(both) == 6 and torch.equal(both.pooled[4], cond.pooled[1])
    assert torch.equal(both.time_ids[5], cond.time_ids[1]) and torch.equal(both.embeds[0], cond.embeds[0])


def test_our_conditioning_and_ddim_reproduce_the_stock_sdxl_pipeline(sdxl_dir):
    """DDIM (eta 0) driven by `guided_output` with our conditioning lands on the pipeline's own latents."""
    d = Diffusion(load_pipeline(sdxl_dir / "pipeline"))
    start = torch.randn((2, 4, 16, 16), generator=torch.Generator().manual_seed(0))
    expected = d.pipe(PROMPTS, num_inference_steps=3, guidance_scale=5.0, latents=start.clone(),
                      output_type="latent").images
    x, _ = deterministic_latents(d, PROMPTS, start, 3, 5.0)
    torch.testing.assert_close(x, expected, rtol=1e-4, atol=1e-4)


def test_a_separate_vae_replaces_the_pipelines_own(sdxl_dir):
    from diffusers import AutoencoderKL

    own = load_pipeline(sdxl_dir / "pipeline").vae
    swapped = load_pipeline(sdxl_dir / "pipeline", vae=sdxl_dir / "vae").vae
    separate = AutoencoderKL.from_pretrained(sdxl_dir / "vae")
    for a, b, c in zip(swapped.state_dict().values(), separate.state_dict().values(), own.state_dict().values()):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, c) for a, c in zip(swapped.state_dict().values(), own.state_dict().values()))
    with pytest.raises(SPOError, match="could not load a VAE"):
        load_pipeline(sdxl_dir / "pipeline", vae=sdxl_dir / "no-such-vae")


def test_sdxls_own_vae_stays_out_of_half_precision_autocast_and_the_fp16_fix_does_not(sdxl_dir):
    """SDXL's original VAE says force_upcast (it overflows in fp16); the fp16-fix VAE does not."""
    d = Diffusion(load_pipeline(sdxl_dir / "pipeline"))
    latents = torch.randn(1, 4, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert d.decode(latents).dtype == torch.bfloat16  # force_upcast false: runs under autocast
        d.pipe.vae.register_to_config(force_upcast=True)
        assert d.decode(latents).dtype == torch.float32
        assert d.encode_images(torch.zeros(1, 3, 32, 32)).dtype == torch.float32


def test_a_checkpoint_shipped_with_another_scheduler_samples_with_ddim_on_its_noise_schedule(sdxl_dir, tmp_path):
    """SDXL base ships EulerDiscreteScheduler (SD 1.5 PNDM); SPO's transitions are DDIM's."""
    import shutil

    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    euler_dir = tmp_path / "euler"
    shutil.copytree(sdxl_dir / "pipeline", euler_dir)
    ddim = load_pipeline(sdxl_dir / "pipeline").scheduler
    EulerDiscreteScheduler.from_config(ddim.config).save_pretrained(euler_dir / "scheduler")
    config_file = euler_dir / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    for key in ("clip_sample", "set_alpha_to_one"):  # Euler has no such settings; DDIM's defaults would be wrong
        config.pop(key, None)
    config_file.write_text(json.dumps(config))
    index = json.loads((euler_dir / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "EulerDiscreteScheduler"]
    (euler_dir / "model_index.json").write_text(json.dumps(index))
    loaded = load_pipeline(euler_dir).scheduler
    assert isinstance(loaded, DDIMScheduler)
    assert not loaded.config.clip_sample and not loaded.config.set_alpha_to_one
    torch.testing.assert_close(loaded.alphas_cumprod, ddim.alphas_cumprod)


def test_checkpoints_of_other_pipeline_classes_are_refused_clearly(sdxl_dir, tmp_path):
    for name in ("PixArtAlphaPipeline", "StableDiffusionXLImg2ImgPipeline"):
        fake = tmp_path / name
        fake.mkdir()
        (fake / "model_index.json").write_text(json.dumps({"_class_name": name}))
        with pytest.raises(SPOError, match=f"holds a {name}; spo trains"):
            load_pipeline(fake)


# ---------------------------------------------------------------- SPM and SPO training


def test_spm_training_uses_the_sdxl_noising_step(sdxl_spm):
    from spo.preference.spm import StepAwareCLIP

    spm = StepAwareCLIP.from_pretrained(sdxl_spm)
    assert spm.config.time_conditioned
    cfg = json.loads((sdxl_spm.parent / "data_report.json").read_text())
    assert cfg["steps"] == 2


def test_spo_trains_sdxl_with_inner_steps_and_exports_a_lora_stock_diffusers_reloads(sdxl_dir, sdxl_spm, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    tr = SPOTrainer(_spo_config(sdxl_dir, sdxl_spm, tmp_path / "run"), log=lambda m: None).setup()
    assert tr.diffusion.family == "sdxl"
    assert all(not p.requires_grad for p in tr.diffusion.pipe.text_encoder_2.parameters())
    pairs, _, _ = tr.method.sample(tr, 0)
    assert (~pairs.shared).any()  # inner steps: some lose transitions start from their own state
    unet = tr.acc.unwrap_model(tr.unet)
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    lora_dir = tr.train()
    for name, p in unet.named_parameters():
        assert (not torch.equal(p.detach(), before[name])) == ("lora" in name), name
    assert json.loads((lora_dir / "spo_lora.json").read_text())["family"] == "sdxl"

    tr.diffusion.pipe.unet = unet
    assert_stock_reload_matches(tr.diffusion.pipe, StableDiffusionXLPipeline.from_pretrained(sdxl_dir / "pipeline"),
                                lora_dir, PROMPTS[0], num_inference_steps=3, guidance_scale=5.0)


def test_generate_cli_on_sdxl_with_lora_and_separate_vae(sdxl_dir, sdxl_spm, tmp_path):
    import numpy as np
    from PIL import Image

    lora_dir = SPOTrainer(_spo_config(sdxl_dir, sdxl_spm, tmp_path / "run"), log=lambda m: None).setup().train()
    out = tmp_path / "gen"
    result = CliRunner().invoke(cli, [
        "generate", "--pretrained", str(sdxl_dir / "pipeline"), "--vae", str(sdxl_dir / "vae"), "--lora", str(lora_dir),
        "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--steps", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    base = np.asarray(Image.open(out / "base" / "0000.png"))
    tuned = np.asarray(Image.open(out / lora_dir.name / "0000.png"))
    assert base.shape == tuned.shape == (32, 32, 3) and (out / "grid.png").is_file()
    assert (out / lora_dir.name / "0001.png").is_file()


def test_evaluate_cli_scores_an_sdxl_base_and_its_lora(sdxl_dir, sdxl_spm, tmp_path):
    import json

    lora_dir = SPOTrainer(_spo_config(sdxl_dir, sdxl_spm, tmp_path / "run"), log=lambda m: None).setup().train()
    pipeline = sdxl_dir / "pipeline"
    result = CliRunner().invoke(cli, [
        "evaluate", "--model", f"base={pipeline}", "--model", f"spo={pipeline}+{lora_dir}", "--prompts", "world:test",
        "--num-prompts", "2", "--steps", "2", "--scorer", "world-utility", "--out", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "eval" / "results.json").read_text())
    text = json.dumps(report)
    assert "world-utility" in text and str(lora_dir) in text and (tmp_path / "eval" / "grid.png").is_file()


def test_a_lora_of_the_other_family_is_refused(sdxl_dir, tmp_path):
    from spo.generation import load_model

    fake = tmp_path / "sd-lora"
    fake.mkdir()
    (fake / "spo_lora.json").write_text(json.dumps({"rank": 4, "alpha": 4.0, "family": "sd"}))
    with pytest.raises(SPOError, match="trained on an SD model but .* is SDXL"):
        load_model(str(sdxl_dir / "pipeline"), fake)


# ---------------------------------------------------------------- one trainer for both families


def test_the_family_adapter_is_the_only_family_specific_code():
    """SD, SDXL and SD3 share the resampler, the losses, the trainer and SPM training: only models.py
    (the adapters and the loader) names anything SDXL- or SD3-specific."""
    src = Path(__file__).parents[1] / "src" / "spo"
    markers = ("StableDiffusionXL", "text_encoder_2", "added_cond_kwargs", "time_ids",
               "StableDiffusion3", "SD3Transformer", "text_encoder_3", "pooled_projections", "transformer_lora",
               "FlowMatchEuler", "shift_factor", 'family == "sd', "family == 'sd",
               "FluxPipeline", "FluxTransformer", "guidance_embeds", "pack_latents", "txt_ids", "img_ids",
               'family == "flux', "family == 'flux")
    # The world plug-in builds its models from their classes (an SD and an SD3 pipeline): it is a user of the
    # families, not library code that runs them.
    specific = sorted(str(p.relative_to(src)) for p in src.rglob("*.py")
                      if any(m in p.read_text() for m in markers) and "world" not in p.relative_to(src).parts)
    assert specific == ["models.py"], specific


def test_guided_output_accepts_plain_sd_text_embeddings():
    """SD conditioning is just the text embeddings; a bare tensor still works where a Conditioning is expected."""
    calls = []

    class Unet(torch.nn.Module):
        def forward(self, x, t, encoder_hidden_states, added_cond_kwargs=None):
            calls.append(added_cond_kwargs)
            return type("Out", (), {"sample": x * encoder_hidden_states.mean(dim=(1, 2))[:, None, None, None]})

    x, t = torch.ones(2, 4, 2, 2), torch.zeros(2, dtype=torch.long)
    cond, uncond = torch.full((2, 3, 5), 2.0), torch.zeros(2, 3, 5)
    out = guided_output(Unet(), x, t, cond, uncond, 3.0)
    torch.testing.assert_close(out, torch.full_like(x, 6.0))  # 0 + 3 * (2 - 0)
    assert calls == [None]

"""FLUX.1 end to end on a tiny random FluxPipeline built here (no download).

The tiny pipeline has every FLUX component at toy size: a guidance-distilled transformer (one double-stream and
one single-stream block), a 16-channel VAE with FLUX's shift and scale, CLIP for the pooled embedding and a T5
encoder with a real T5 tokenizer built in code. It goes through loading, the stock pipeline's sampling, the
resampler, SPM training, SPO training, LoRA export into stock diffusers, `spo generate`, the wrong-family
refusal and Diffusion-DPO. The flow maths themselves are SD3's, tested in test_flow.py.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import assert_stock_reload_matches, deterministic_latents

CONFIGS = Path(__file__).parents[1] / "configs"
PROMPTS = ["a red circle", "a blue square above a yellow triangle"]
LATENT = 16  # latent height and width in this module (64 image tokens); FLUX's own default is 128
TEXT_LEN = 8  # T5 tokens: the tiny checkpoint declares max_sequence_length 8 (FLUX's default is 512)
T5_WIDTH = 32  # the transformer's joint_attention_dim (4096 in FLUX.1)
CLIP_WIDTH = 32  # the transformer's pooled_projection_dim (768 in FLUX.1)
STOCK = {"max_sequence_length": TEXT_LEN}  # what stock diffusers must be told; spo reads it from the checkpoint


@pytest.fixture(scope="module", autouse=True)
def small_default_size():
    """FluxPipeline fixes its default size at 128x128 latents (1024 px with FLUX's VAE); 4096 image tokens make each
    call of even a toy transformer several times slower on CPU. In this module every FluxPipeline, spo's and stock,
    defaults to LATENT x LATENT latents instead; the adapter reads the pipeline's attribute, so a hard-coded size
    would fail these tests (the first test checks FLUX's own default too)."""
    from diffusers import FluxPipeline

    with pytest.MonkeyPatch.context() as mp:
        # a data descriptor wins over the instance attribute FluxPipeline.__init__ assigns
        mp.setattr(FluxPipeline, "default_sample_size", property(lambda self: LATENT, lambda self, value: None),
                   raising=False)
        yield


def _t5_tokenizer(clip_tokenizer):
    """A real T5 tokenizer (a Unigram model with T5's special tokens and ▁ word prefixes) over the world's words:
    no T5 tokenizer can be downloaded here. Unknown words fall back to single letters."""
    from transformers import T5TokenizerFast

    words = sorted({w[:-4] for w in clip_tokenizer.get_vocab() if w.endswith("</w>") and w[:-4].isalpha()})
    letters = sorted({c for w in words for c in w})
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(c, -5.0) for c in letters] + [("▁" + w, -1.0) for w in words]
    return T5TokenizerFast(vocab=vocab, extra_ids=0)


def _transformer(guidance_embeds: bool):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(  # 16 latent channels packed 2x2 -> 64 features per token
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=T5_WIDTH, pooled_projection_dim=CLIP_WIDTH, guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 4, 8))  # sums to the head dim, as FLUX.1's (16, 56, 56) to 128


def tiny_flux_pipeline():
    """FLUX.1-dev's architecture and scheduler at toy size: 32 px images, 16-channel latents."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

    from spo.world import resolve

    tokenizer = CLIPTokenizer.from_pretrained(resolve("world:tokenizer"))
    tokenizer_2 = _t5_tokenizer(tokenizer)
    torch.manual_seed(1)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16),
                        layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, sample_size=32,
                        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    torch.manual_seed(2)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=CLIP_WIDTH, intermediate_size=2 * CLIP_WIDTH, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    torch.manual_seed(3)
    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=T5_WIDTH, d_kv=8, d_ff=2 * T5_WIDTH,
                                 num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                                 pad_token_id=tokenizer_2.pad_token_id, eos_token_id=tokenizer_2.eos_token_id))
    scheduler = FlowMatchEulerDiscreteScheduler(  # FLUX.1-dev's: the shift grows with the image's token count
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096)
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=tokenizer, text_encoder_2=t5,
                        tokenizer_2=tokenizer_2, transformer=_transformer(guidance_embeds=True))


def _stock(path):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _load(path):
    from spo.models import load_diffusion

    return load_diffusion(path)


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    from spo.models import CALL_DEFAULTS_FILE

    out = tmp_path_factory.mktemp("flux") / "pipeline"
    tiny_flux_pipeline().save_pretrained(out)
    (out / CALL_DEFAULTS_FILE).write_text(json.dumps(STOCK))
    return out


@pytest.fixture(scope="module")
def flux_spm(flux_dir, tmp_path_factory):
    """An SPM trained through `spo train-spm` with the FLUX model as the noiser (flow noising, one guided step)."""
    from spo.cli import cli

    out = tmp_path_factory.mktemp("spm-flux")
    result = CliRunner().invoke(cli, [
        "train-spm", "data.dataset=world:preference", "data.split=validation", f"model.diffusion_model={flux_dir}",
        "model.base=world:pickscore", f"log.output_dir={out}", "train.max_steps=2", "train.batch_size=2",
        "train.guidance_scale=3.5", "log.report_to=none"])
    assert result.exit_code == 0, result.output
    return out / "spm"


def _spo_config(flux_dir, spm, out, *extra):
    """The shipped FLUX recipe, shrunk to seconds on the tiny model."""
    from spo.config import SPOConfig, load_config

    return load_config(SPOConfig, CONFIGS / "flux.yaml", [
        "prompts=world:train", f"model.pretrained={flux_dir}", f"model.spm={spm}", "model.lora_rank=4",
        "model.lora_alpha=4", "model.gradient_checkpointing=false", "sample.num_steps=4", "sample.divert_start_step=1",
        "sample.inner_steps=1", "sample.threshold=0", "sample.batches_per_epoch=1", "train.num_epochs=1",
        "train.gradient_accumulation_steps=1", "train.mixed_precision='no'", "train.learning_rate=1e-2",
        f"log.output_dir={out}", "log.report_to=none", *extra])


@pytest.fixture(scope="module")
def flux_run(flux_dir, flux_spm, tmp_path_factory):
    """One epoch of SPO on tiny FLUX with the recipe's SDE sampler: (trainer, LoRA folder, weights before)."""
    from spo.trainer import Trainer

    tr = Trainer(_spo_config(flux_dir, flux_spm, tmp_path_factory.mktemp("spo-flux") / "run"),
                 log=lambda m: None).setup()
    network = tr.acc.unwrap_model(tr.unet)
    before = {n: p.detach().clone() for n, p in network.named_parameters()}
    return tr, tr.train(), before


def _stock_timesteps(pipe, steps: int) -> list[float]:
    """The timesteps the stock pipeline steps through (read by a step callback)."""
    seen = []

    def record(pipeline, i, t, kwargs):
        seen.append(float(t))
        return {}

    pipe(PROMPTS[:1], num_inference_steps=steps, output_type="latent", callback_on_step_end=record, **STOCK)
    return seen


# ---------------------------------------------------------------- the adapter


def test_a_flux_checkpoint_loads_as_the_flux_adapter_with_t5_and_pooled_clip_conditioning(flux_dir):
    from diffusers import FluxPipeline

    from spo.models import FluxDiffusion, checkpoint_family

    assert checkpoint_family(flux_dir) == "flux"
    d = _load(flux_dir)
    assert isinstance(d, FluxDiffusion) and d.family == "flux" and d.unet is d.pipe.transformer
    assert d.resolution == 32 and d.frozen_modules() == [d.vae, d.pipe.text_encoder, d.pipe.text_encoder_2]
    cond, uncond = d.encode_prompts(PROMPTS)
    assert cond.embeds.shape == (2, TEXT_LEN, T5_WIDTH) and cond.pooled.shape == (2, CLIP_WIDTH)
    ids = d.pipe.tokenizer_2(PROMPTS, padding="max_length", max_length=TEXT_LEN, return_tensors="pt").input_ids
    torch.testing.assert_close(cond.embeds, d.pipe.text_encoder_2(ids)[0])  # T5's hidden states
    assert uncond is cond  # no classifier-free guidance: nothing else to encode
    schedule = d.schedule(4)
    assert [t for t, _ in schedule] == pytest.approx(_stock_timesteps(d.pipe, 4), abs=1e-3)
    assert schedule[0][0] == 1000.0 and schedule[-1][1] == 0.0
    assert all(p == n for (_, p), (n, _) in zip(schedule, schedule[1:]))
    assert d.initial_latents(3, torch.Generator().manual_seed(0)).shape == (3, 16, LATENT, LATENT)

    with pytest.MonkeyPatch.context() as mp:  # FluxPipeline's own default size: 128x128 latents, 4096 tokens
        mp.delattr(FluxPipeline, "default_sample_size")
        full = _load(flux_dir)
        assert full.resolution == 256 and full.initial_latents(1, torch.Generator()).shape == (1, 16, 128, 128)
        mu = 1.15  # calculate_shift at max_image_seq_len; the exponential time shift of sigmas linspace(1, 1/4, 4)
        expected = [1000 * math.exp(mu) / (math.exp(mu) + 1 / s - 1) for s in np.linspace(1, 1 / 4, 4)]
        assert [t for t, _ in full.schedule(4)] == pytest.approx(expected, rel=1e-5)


def test_latents_are_packed_into_2x2_patch_tokens_as_flux_pipeline_packs_them():
    from diffusers import FluxPipeline

    from spo.models import latent_positions, pack_latents, unpack_latents

    x = torch.randn((2, 16, 6, 8))
    tokens = pack_latents(x)
    torch.testing.assert_close(tokens, FluxPipeline._pack_latents(x, 2, 16, 6, 8), rtol=0, atol=0)
    torch.testing.assert_close(unpack_latents(tokens, 6, 8), x, rtol=0, atol=0)
    torch.testing.assert_close(FluxPipeline._unpack_latents(tokens, 6 * 8, 8 * 8, 8), x, rtol=0, atol=0)
    torch.testing.assert_close(latent_positions(6, 8, "cpu", torch.float32),
                               FluxPipeline._prepare_latent_image_ids(2, 3, 4, "cpu", torch.float32))


def test_flux_dev_embeds_the_guidance_in_one_call_and_schnell_takes_none(flux_dir):
    d = _load(flux_dir)
    calls = []
    hook = lambda module, args, kwargs: calls.append((len(args[0]), kwargs["guidance"]))  # noqa: E731
    d.unet.register_forward_pre_hook(hook, with_kwargs=True)
    cond, _ = d.encode_prompts(PROMPTS)
    other, _ = d.encode_prompts(["a green star", "a white frame"])
    x, t = torch.randn((2, 16, LATENT, LATENT)), torch.tensor([700.0, 300.0])
    with torch.no_grad():
        out = d.guided_output(x, t, cond, other, 3.5)
        assert len(calls) == 1 and calls[0][0] == 2 and calls[0][1].tolist() == [3.5, 3.5]  # one call, no CFG
        torch.testing.assert_close(d.guided_output(x, t, cond, cond, 3.5), out)  # the unconditional is unused
        assert (d.guided_output(x, t, cond, cond, 1.0) - out).abs().max() > 1e-4  # the scale is an input
        d.unet = _transformer(guidance_embeds=False)  # schnell: timestep-distilled, no guidance input
        schnell = d.guided_output(x, t, cond, cond, 3.5)
        torch.testing.assert_close(d.guided_output(x, t, cond, cond, 1.0), schnell)
    assert schnell.shape == x.shape


@pytest.mark.parametrize("sampler", ["sde", "ddim"])
def test_our_deterministic_flow_sampling_reproduces_the_stock_flux_pipeline(flux_dir, sampler):
    """Our initial noise is the stock pipeline's draw from the same generator; our zero-noise steps its Euler steps."""
    from spo.models import unpack_latents

    d = _load(flux_dir)
    d.sampler = sampler
    start = d.initial_latents(2, torch.Generator().manual_seed(0))
    x, stds = deterministic_latents(d, PROMPTS, start, 3, 3.5)
    assert all(torch.all(std == 0) for std in stds)
    call = dict(num_inference_steps=3, guidance_scale=3.5, generator=torch.Generator().manual_seed(0), **STOCK)
    packed = d.pipe(PROMPTS, output_type="latent", **call).images  # FLUX's latent output is the token sequence
    torch.testing.assert_close(x, unpack_latents(packed, LATENT, LATENT), rtol=1e-4, atol=1e-5)
    if sampler == "sde":  # and our decoding is the pipeline's
        call["generator"] = torch.Generator().manual_seed(0)
        images = d.pipe(PROMPTS, output_type="pt", **call).images
        torch.testing.assert_close((d.decode(x) + 1) / 2, images, rtol=1e-4, atol=1e-4)


def test_flux_noising_and_decoding_use_the_vae_shift_and_scale(flux_dir):
    d = _load(flux_dir)
    images = torch.rand((1, 3, 32, 32)) * 2 - 1
    latents = d.encode_images(images)
    raw = d.vae.encode(images).latent_dist.mean
    torch.testing.assert_close(latents, (raw - 0.1159) * 0.3611)
    torch.testing.assert_close(d.decode(latents), d.vae.decode(raw).sample.clamp(-1, 1), rtol=1e-4, atol=1e-5)
    noise = torch.randn_like(latents)
    t = torch.tensor([250])  # scheduler units: flow time 0.25
    torch.testing.assert_close(d.noised(latents, noise, t), 0.75 * latents + 0.25 * noise)


def test_the_default_lora_targets_adapt_attention_in_both_kinds_of_flux_block(flux_dir):
    from peft import LoraConfig

    from spo.config import DEFAULT_LORA_TARGETS
    from spo.models import check_lora_targets

    network = _load(flux_dir).unet
    check_lora_targets(network, DEFAULT_LORA_TARGETS)
    network.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=DEFAULT_LORA_TARGETS))
    adapted = {n.split(".lora_A")[0] for n, _ in network.named_parameters() if ".lora_A." in n}
    assert adapted == {"transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
                       "transformer_blocks.0.attn.to_v", "transformer_blocks.0.attn.to_out.0",
                       # single blocks have no attention output projection: proj_out mixes attention and MLP
                       "single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_k",
                       "single_transformer_blocks.0.attn.to_v"}


# ---------------------------------------------------------------- the library on FLUX


def test_the_resampler_finds_pairs_with_both_flow_samplers(flux_dir):
    """Only the DDIM-style sampler's last step is deterministic: its K candidates coincide, so no pair there."""
    from spo.resampler import resample

    d = _load(flux_dir)
    judge = lambda images, captions, t: images.mean(dim=(1, 2, 3)) * 50  # noqa: E731
    for sampler, last_step_pairs in (("sde", True), ("ddim", False)):
        d.sampler = sampler
        pairs = resample(d, judge, PROMPTS, num_steps=3, guidance=3.5, eta=1.0, num_candidates=2, threshold=0.0,
                         divert_start_step=0, generator=torch.Generator().manual_seed(0)).pairs
        assert len(pairs) and pairs.win.shape[1:] == (16, LATENT, LATENT) and torch.isfinite(pairs.win).all()
        assert (pairs.step_index == 2).any() == last_step_pairs, sampler


def test_spm_training_runs_with_flux_as_the_noiser(flux_spm):
    from spo.preference.spm import StepAwareCLIP

    assert StepAwareCLIP.from_pretrained(flux_spm).config.time_conditioned
    assert json.loads((flux_spm.parent / "data_report.json").read_text())["steps"] == 2


def test_spo_trains_flux_and_exports_a_lora_stock_diffusers_reloads_with_identical_images(flux_run, flux_dir):
    tr, lora_dir, before = flux_run
    assert tr.diffusion.family == "flux" and tr.diffusion.sampler == "sde" and tr.diffusion.noise_level == 0.9
    network = tr.acc.unwrap_model(tr.unet)
    for name, p in network.named_parameters():  # only the adapters moved, every one of them
        assert (not torch.equal(p.detach(), before[name])) == ("lora" in name), name
    for target in ("transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.ff_context.net.2",
                   "single_transformer_blocks.0.attn.to_q"):  # the recipe's targets, in both kinds of block
        assert f"{target}.lora_A.default.weight" in before, target
    metrics = [json.loads(line) for line in (tr.out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["pairs_trained"] > 0 and math.isfinite(metrics[0]["loss"])
    assert json.loads((lora_dir / "spo_lora.json").read_text())["family"] == "flux"

    tr.diffusion.unet = network
    assert_stock_reload_matches(tr.diffusion.pipe, _stock(flux_dir), lora_dir, PROMPTS[0], num_inference_steps=3,
                                guidance_scale=3.5, **STOCK)


def test_spo_generate_on_flux_gives_the_stock_pipelines_images_with_the_lora(flux_run, flux_dir, tmp_path):
    from PIL import Image

    from spo.cli import cli
    from spo.images import to_uint8

    _, lora_dir, _ = flux_run
    out = tmp_path / "gen"
    result = CliRunner().invoke(cli, [
        "generate", "--pretrained", str(flux_dir), "--lora", str(lora_dir), "--prompt", PROMPTS[0], "--prompt",
        PROMPTS[1], "--steps", "2", "--guidance", "3.5", "--seed", "0", "--out", str(out)])
    assert result.exit_code == 0, result.output
    stock = _stock(flux_dir)
    stock.load_lora_weights(str(lora_dir))
    expected = stock(PROMPTS, num_inference_steps=2, guidance_scale=3.5, output_type="np",
                     generator=[torch.Generator().manual_seed(i) for i in range(2)], **STOCK).images
    for i in range(2):
        ours = np.asarray(Image.open(out / lora_dir.name / f"{i:04d}.png")).astype(int)
        assert ours.shape == (32, 32, 3) and np.abs(ours - to_uint8(expected[i]).astype(int)).max() <= 1
    assert (out / "base" / "0000.png").is_file() and (out / "grid.png").is_file()


def test_a_lora_of_another_family_is_refused_both_ways(flux_run, flux_dir, tmp_path):
    from test_flow import tiny_sd3_pipeline

    from spo.errors import SPOError
    from spo.generation import load_model

    sd3_lora = tmp_path / "sd3-lora"
    sd3_lora.mkdir()
    (sd3_lora / "spo_lora.json").write_text(json.dumps({"rank": 4, "alpha": 4.0, "family": "sd3"}))
    with pytest.raises(SPOError, match="trained on an SD3 model but .* is FLUX"):
        load_model(str(flux_dir), sd3_lora)
    sd3 = tmp_path / "sd3"
    tiny_sd3_pipeline().save_pretrained(sd3)
    with pytest.raises(SPOError, match="trained on a FLUX model but .* is SD3"):
        load_model(str(sd3), flux_run[1])


def test_diffusion_dpo_trains_flux_through_the_adapters_training_target(flux_dir, flux_spm, tmp_path):
    from spo.trainer import Trainer

    cfg = _spo_config(flux_dir, flux_spm, tmp_path / "dpo", "method=diffusion-dpo", "dpo.dataset=world:preference",
                      "dpo.split=validation", "dpo.pairs_per_epoch=4", "train.batch_size=2")
    tr = Trainer(cfg, log=lambda m: None).setup()
    network = tr.acc.unwrap_model(tr.unet)
    before = {n: p.detach().clone() for n, p in network.named_parameters() if "lora" in n}
    guidances, call = [], tr.diffusion.guided_output
    tr.diffusion.guided_output = lambda *a, **k: guidances.append(a[4]) or call(*a, **k)
    lora = tr.train()
    # FLUX.1-dev is trained at its embedded guidance (the recipe's), as diffusers' FLUX scripts do, not at 1
    assert guidances and set(guidances) == {cfg.sample.guidance_scale} != {1.0}
    metrics = [json.loads(line) for line in (tr.out / "metrics.jsonl").read_text().splitlines()]
    assert math.isfinite(metrics[0]["loss"]) and (lora / "pytorch_lora_weights.safetensors").is_file()
    moved = [n for n, p in network.named_parameters() if n in before and not torch.equal(p.detach(), before[n])]
    assert len(moved) == len(before)

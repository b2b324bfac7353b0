"""Flow matching: the flow transitions (spo.flow_sampling) and the SD3 family end to end on tiny random models.

The maths is checked against diffusers' Euler step, against float64 computations written another way
(Flow-GRPO's factored SDE mean, the DDPM posterior), and against exact marginals on a Gaussian target whose
velocity is known in closed form. The tiny StableDiffusion3Pipeline (two tiny CLIPs with projection, no T5,
a 16-channel VAE) goes through SPM training, the resampler, SPO training, LoRA export into stock diffusers,
`spo generate`, and the wrong-family refusal.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import assert_stock_reload_matches, deterministic_latents

from spo.flow_sampling import flow_ddim_transition, flow_noised, flow_sde_transition, flow_x0
from spo.sampling import gaussian_log_prob, transition_log_ratio

CONFIGS = Path(__file__).parents[1] / "configs"
PROMPTS = ["a red circle", "a blue square above a yellow triangle"]


def _euler_scheduler(steps: int):
    from diffusers import FlowMatchEulerDiscreteScheduler

    s = FlowMatchEulerDiscreteScheduler(shift=3.0)  # SD3's
    s.set_timesteps(steps)
    return s


# ---------------------------------------------------------------- transitions


def test_both_flow_steps_are_diffusers_euler_step_at_zero_noise():
    s = _euler_scheduler(5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((3, 4, 6, 6), generator=g)
    for i, t in enumerate(s.timesteps):
        v = torch.randn(x.shape, generator=g)
        expected = s.step(v, t, x).prev_sample
        sig, sig_prev = s.sigmas[i].expand(3), s.sigmas[i + 1].expand(3)
        for step in (flow_sde_transition, flow_ddim_transition):
            mean, std, x0 = step(v, sig, sig_prev, x, 0.0)
            torch.testing.assert_close(mean, expected, rtol=1e-5, atol=1e-6)
            assert torch.all(std == 0)
            torch.testing.assert_close(x0, x - sig.view(-1, 1, 1, 1) * v)
        x = expected


def _sde_reference(x, v, t, t_prev, a, t_max_sigma):
    """Flow-GRPO's factored form, float64 numpy: x(1 + σ²/(2t)·dt) + v(1 + σ²(1 − t)/(2t))·dt."""
    x, v = x.double().numpy(), v.double().numpy()
    sigma = a * math.sqrt(t / (1 - t_max_sigma))
    dt = t_prev - t
    mean = x * (1 + sigma**2 / (2 * t) * dt) + v * (1 + sigma**2 * (1 - t) / (2 * t)) * dt
    return mean, sigma * math.sqrt(-dt)


@pytest.mark.parametrize("t, t_prev, a", [(0.8, 0.6, 0.7), (0.3, 0.25, 1.0), (0.05, 0.0, 0.7), (1.0, 0.96, 0.7)])
def test_the_sde_step_and_its_log_prob_match_an_independent_float64_computation(t, t_prev, a):
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn((2, 4, 3, 3), generator=g), torch.randn((2, 4, 3, 3), generator=g)
    tt, tp = torch.full((2,), t), torch.full((2,), t_prev)
    mean, std, _ = flow_sde_transition(v, tt, tp, x, a)
    # at t = 1 the 1 − t inside σ_t is taken at t_prev (Flow-GRPO's second sigma)
    ref_mean, ref_std = _sde_reference(x, v, t, t_prev, a, t_prev if t >= 1 else t)
    np.testing.assert_allclose(mean.numpy(), ref_mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(std.flatten().numpy(), [ref_std] * 2, rtol=1e-6)
    sample = mean + std * torch.randn(x.shape, generator=g)
    resid = sample.double().numpy() - ref_mean
    per_dim = -(resid**2) / (2 * ref_std**2) - math.log(ref_std) - 0.5 * math.log(2 * math.pi)
    np.testing.assert_allclose(gaussian_log_prob(sample, mean, std).numpy(), per_dim.reshape(2, -1).mean(1), rtol=1e-5)
    # the closed-form log-ratio of two velocities = the difference of their float64 log-probs
    v2 = v + 0.05 * torch.randn(x.shape, generator=g)
    mean2, std2, _ = flow_sde_transition(v2, tt, tp, x, a)
    torch.testing.assert_close(std2, std)
    diff = gaussian_log_prob(sample.double(), mean.double(), std.double()) - gaussian_log_prob(
        sample.double(), mean2.double(), std.double())
    torch.testing.assert_close(transition_log_ratio(sample, mean, mean2, std).double(), diff, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("t, t_prev, eta", [(0.9, 0.7, 1.0), (0.5, 0.45, 1.0), (0.5, 0.3, 0.5), (1.0, 0.9, 1.0)])
def test_the_ddim_flow_step_at_eta_1_is_the_posterior_of_the_flow_interpolation(t, t_prev, eta):
    """eta = 1: q(x_s | x_t, x̂0) of the Markov chain with x_t = α_t x0 + σ_t ε, α = 1 − t, σ = t (float64)."""
    g = torch.Generator().manual_seed(2)
    x, v = (torch.randn((2, 3, 4, 4), generator=g, dtype=torch.float64) for _ in range(2))
    mean, std, x0 = flow_ddim_transition(v, torch.full((2,), t, dtype=torch.float64),
                                         torch.full((2,), t_prev, dtype=torch.float64), x, eta)
    a_t, s_t, a_s, s_s = 1 - t, t, 1 - t_prev, t_prev
    a_ts = a_t / a_s
    var_ts = s_t**2 - a_ts**2 * s_s**2  # variance of x_t given x_s
    post_var = var_ts * s_s**2 / s_t**2
    assert std.flatten().tolist() == pytest.approx([eta * math.sqrt(post_var)] * 2, rel=1e-10)
    if eta == 1.0:
        post_mean = a_ts * s_s**2 / s_t**2 * x + a_s * var_ts / s_t**2 * (x - t * v)
        torch.testing.assert_close(mean, post_mean, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x0, x - t * v)


def test_noising_and_x0_prediction_invert_each_other():
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn((2, 4, 3, 3), generator=g), torch.randn((2, 4, 3, 3), generator=g)
    t = torch.tensor([0.2, 0.9])
    x_t = flow_noised(x0, eps, t)
    torch.testing.assert_close(flow_x0(x_t, eps - x0, t), x0, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- marginals on a Gaussian target

MU, SD = torch.tensor([1.5, -0.5], dtype=torch.float64), torch.tensor([0.5, 2.0], dtype=torch.float64)


def _exact_velocity(x, t):
    """E[ε − x0 | x_t = x] for x0 ~ N(MU, SD²): x_t is jointly Gaussian with x0 and ε."""
    m, var = (1 - t) * MU, (1 - t) ** 2 * SD**2 + t**2
    return (t - (1 - t) * SD**2) / var * (x - m) - MU


def _run(step, level, n_steps=100, n=40_000, noise_seed=0):
    """Trajectories from pure noise (always the same draw) with the exact velocity; {t: samples} at every step."""
    g = torch.Generator().manual_seed(noise_seed)
    ts = torch.linspace(1, 0, n_steps + 1, dtype=torch.float64)
    x = torch.randn((n, 2), generator=torch.Generator().manual_seed(123), dtype=torch.float64)
    seen = {}
    for t, t_prev in zip(ts[:-1].tolist(), ts[1:].tolist()):
        tt, tp = torch.full((n,), t, dtype=torch.float64), torch.full((n,), t_prev, dtype=torch.float64)
        mean, std, _ = step(_exact_velocity(x, t), tt, tp, x, level)
        x = mean + std * torch.randn(x.shape, generator=g, dtype=torch.float64)
        seen[round(t_prev, 6)] = x
    return seen


@pytest.mark.parametrize("step, level", [(flow_sde_transition, 0.7), (flow_sde_transition, 1.0),
                                         (flow_ddim_transition, 1.0)], ids=["sde-0.7", "sde-1.0", "ddim-1.0"])
def test_the_stochastic_samplers_keep_the_odes_marginals_on_a_gaussian_target(step, level):
    sde, ode = _run(step, level), _run(step, 0.0)
    for t in (0.75, 0.5, 0.25, 0.0):
        mean, var = (1 - t) * MU, (1 - t) ** 2 * SD**2 + t**2  # the exact marginal at t
        for samples in (sde[t], ode[t]):
            torch.testing.assert_close(samples.mean(0), mean, rtol=0, atol=0.04)
            torch.testing.assert_close(samples.var(0), var, rtol=0.04, atol=0.01)
    # and the SDE is stochastic: from the same start, other noise ends elsewhere (the ODE is a fixed map)
    assert (_run(step, level, noise_seed=1)[0.0] - sde[0.0]).abs().mean() > 0.1
    assert torch.equal(_run(step, 0.0, noise_seed=1)[0.0], ode[0.0])


# ---------------------------------------------------------------- tiny SD3

TEXT_DIMS = (16, 24)  # CLIP-L and CLIP-G widths (SD3 concatenates them, then pads to T5's width)
POOLED_DIM = 24  # each CLIP's projection; the transformer sees both, concatenated
JOINT_DIM = 48  # T5's width in SD3 (4096); >= the two CLIPs' together


def _clip(tokenizer, width: int, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length, projection_dim=POOLED_DIM,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))


def tiny_sd3_pipeline():
    """Every SD3 component at toy size except T5 (absent, as StableDiffusion3Pipeline allows): 16-channel
    16x16 latents, 32 px images; a dual-attention block as in SD3.5."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTokenizer

    from spo.world import resolve

    tokenizer = CLIPTokenizer.from_pretrained(resolve("world:tokenizer"))
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=JOINT_DIM, caption_projection_dim=16,
        pooled_projection_dim=2 * POOLED_DIM, pos_embed_max_size=16, dual_attention_layers=(0,))
    torch.manual_seed(1)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16),
                        layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, sample_size=32,
                        scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=_clip(tokenizer, TEXT_DIMS[0], 2), tokenizer=tokenizer,
        text_encoder_2=_clip(tokenizer, TEXT_DIMS[1], 3), tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None)


def _stock(path):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sd3") / "pipeline"
    tiny_sd3_pipeline().save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def sd3_spm(sd3_dir, tmp_path_factory):
    """An SPM trained through `spo train-spm` with the SD3 model as the noiser (flow noising, one guided step)."""
    from spo.cli import cli

    out = tmp_path_factory.mktemp("spm-sd3")
    result = CliRunner().invoke(cli, [
        "train-spm", "data.dataset=world:preference", "data.split=validation", f"model.diffusion_model={sd3_dir}",
        "model.base=world:pickscore", f"log.output_dir={out}", "train.max_steps=2", "train.batch_size=2",
        "log.report_to=none"])
    assert result.exit_code == 0, result.output
    return out / "spm"


def _spo_config(sd3_dir, spm, out, *extra):
    """The shipped SD3.5 recipe, shrunk to seconds on the tiny model."""
    from spo.config import SPOConfig, load_config

    return load_config(SPOConfig, CONFIGS / "sd35.yaml", [
        "prompts=world:train", f"model.pretrained={sd3_dir}", f"model.spm={spm}", "model.lora_rank=4",
        "model.lora_alpha=4", "model.gradient_checkpointing=false", "sample.num_steps=4", "sample.divert_start_step=1",
        "sample.inner_steps=1", "sample.threshold=0", "sample.batches_per_epoch=1", "train.num_epochs=1",
        "train.gradient_accumulation_steps=1", "train.mixed_precision='no'", "train.learning_rate=1e-2",
        f"log.output_dir={out}", "log.report_to=none", *extra])


@pytest.fixture(scope="module")
def sd3_run(sd3_dir, sd3_spm, tmp_path_factory):
    """One epoch of SPO on tiny SD3 with the recipe's SDE sampler: (trainer, LoRA folder, weights before)."""
    from spo.trainer import Trainer

    tr = Trainer(_spo_config(sd3_dir, sd3_spm, tmp_path_factory.mktemp("spo-sd3") / "run"), log=lambda m: None).setup()
    network = tr.acc.unwrap_model(tr.unet)
    before = {n: p.detach().clone() for n, p in network.named_parameters()}
    return tr, tr.train(), before


def test_an_sd3_checkpoint_loads_as_the_flow_adapter_with_three_text_encoders_conditioning(sd3_dir):
    from spo.models import FlowDiffusion, checkpoint_family, load_diffusion

    assert checkpoint_family(sd3_dir) == "sd3"
    d = load_diffusion(sd3_dir)
    assert isinstance(d, FlowDiffusion) and d.family == "sd3" and d.pipe.text_encoder_3 is None
    assert d.resolution == 32 and len(d.frozen_modules()) == 3  # the VAE and the two CLIPs (no T5)
    cond, uncond = d.encode_prompts(PROMPTS)
    n_clip = d.pipe.tokenizer.model_max_length
    assert cond.embeds.shape == (2, n_clip + 256, JOINT_DIM) and cond.pooled.shape == (2, 2 * POOLED_DIM)
    assert cond.embeds[:, n_clip:].abs().sum() == 0  # no T5: its 256 tokens are zeros
    assert uncond.pooled.abs().sum() > 0  # SD3's unconditional is the encoded empty prompt, not zeros
    schedule = d.schedule(20)
    assert schedule[0][0] == 1000.0 and schedule[-1][1] == 0.0
    assert all(a > b for a, b in schedule) and all(p == n for (_, p), (n, _) in zip(schedule, schedule[1:]))


@pytest.mark.parametrize("sampler", ["sde", "ddim"])
def test_our_deterministic_flow_sampling_reproduces_the_stock_sd3_pipeline(sd3_dir, sampler):
    from spo.models import load_diffusion

    d = load_diffusion(sd3_dir)
    d.sampler = sampler
    start = torch.randn((2, 16, 16, 16), generator=torch.Generator().manual_seed(0))
    expected = d.pipe(PROMPTS, num_inference_steps=3, guidance_scale=4.5, latents=start.clone(),
                      output_type="latent").images
    x, stds = deterministic_latents(d, PROMPTS, start, 3, 4.5)
    assert all(torch.all(std == 0) for std in stds)
    torch.testing.assert_close(x, expected, rtol=1e-4, atol=1e-5)


def test_flow_noising_and_decoding_use_the_vae_shift_and_scale(sd3_dir):
    from spo.models import load_diffusion

    d = load_diffusion(sd3_dir)
    images = torch.rand((1, 3, 32, 32)) * 2 - 1
    latents = d.encode_images(images)
    raw = d.vae.encode(images).latent_dist.mean
    torch.testing.assert_close(latents, (raw - 0.0609) * 1.5305)
    torch.testing.assert_close(d.decode(latents), d.vae.decode(raw).sample.clamp(-1, 1), rtol=1e-4, atol=1e-5)
    noise = torch.randn_like(latents)
    t = torch.tensor([250])  # scheduler units: flow time 0.25
    torch.testing.assert_close(d.noised(latents, noise, t), 0.75 * latents + 0.25 * noise)


def test_the_resampler_finds_pairs_with_both_flow_samplers(sd3_dir):
    """Only the DDIM-style sampler's last step is deterministic: its K candidates coincide, so no pair there."""
    from spo.models import load_diffusion
    from spo.resampler import resample

    d = load_diffusion(sd3_dir)
    judge = lambda images, captions, t: images.mean(dim=(1, 2, 3)) * 50  # noqa: E731
    for sampler, last_step_pairs in (("sde", True), ("ddim", False)):
        d.sampler = sampler
        result = resample(d, judge, PROMPTS, num_steps=3, guidance=4.5, eta=1.0, num_candidates=2, threshold=0.0,
                          divert_start_step=0, generator=torch.Generator().manual_seed(0))
        pairs = result.pairs
        assert len(pairs) and pairs.timesteps.dtype == torch.float32 and torch.isfinite(pairs.win).all()
        assert (pairs.step_index == 2).any() == last_step_pairs, sampler


def test_spm_training_runs_through_the_flow_noising_step(sd3_spm):
    from spo.preference.spm import StepAwareCLIP

    assert StepAwareCLIP.from_pretrained(sd3_spm).config.time_conditioned
    assert json.loads((sd3_spm.parent / "data_report.json").read_text())["steps"] == 2


def test_spo_trains_sd3_and_exports_a_lora_stock_diffusers_reloads_with_identical_images(sd3_run, sd3_dir):
    tr, lora_dir, before = sd3_run
    assert tr.diffusion.family == "sd3" and tr.diffusion.sampler == "sde" and tr.diffusion.noise_level == 0.7
    network = tr.acc.unwrap_model(tr.unet)
    # Only the adapters moved. (The last block's context query gets no gradient, its LoRA B stays 0: SD3
    # discards that block's text stream.)
    dead = f"transformer_blocks.{len(network.transformer_blocks) - 1}.attn.add_q_proj."
    for name, p in network.named_parameters():
        if dead not in name:
            assert (not torch.equal(p.detach(), before[name])) == ("lora" in name), name
    for target in ("attn.add_q_proj", "attn.to_add_out", "attn.to_q", "attn2.to_q"):
        assert any(f"{target}.lora_A" in n for n in before), target
    metrics = [json.loads(line) for line in (tr.out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["pairs_trained"] > 0 and math.isfinite(metrics[0]["loss"])
    assert json.loads((lora_dir / "spo_lora.json").read_text())["family"] == "sd3"

    tr.diffusion.unet = network
    assert_stock_reload_matches(tr.diffusion.pipe, _stock(sd3_dir), lora_dir, PROMPTS[0], num_inference_steps=3,
                                guidance_scale=4.5)


def test_spo_generate_on_sd3_gives_the_stock_pipelines_images_with_the_lora(sd3_run, sd3_dir, tmp_path):
    from PIL import Image

    from spo.cli import cli
    from spo.images import to_uint8

    _, lora_dir, _ = sd3_run
    out = tmp_path / "gen"
    result = CliRunner().invoke(cli, [
        "generate", "--pretrained", str(sd3_dir), "--lora", str(lora_dir), "--prompt", PROMPTS[0], "--prompt",
        PROMPTS[1], "--steps", "2", "--guidance", "4.5", "--seed", "0", "--out", str(out)])
    assert result.exit_code == 0, result.output
    stock = _stock(sd3_dir)
    stock.load_lora_weights(str(lora_dir))
    expected = stock(PROMPTS, num_inference_steps=2, guidance_scale=4.5, output_type="np",
                     generator=[torch.Generator().manual_seed(i) for i in range(2)]).images
    for i in range(2):
        ours = np.asarray(Image.open(out / lora_dir.name / f"{i:04d}.png")).astype(int)
        assert ours.shape == (32, 32, 3) and np.abs(ours - to_uint8(expected[i]).astype(int)).max() <= 1
    assert (out / "base" / "0000.png").is_file() and (out / "grid.png").is_file()
    from spo.generation import generate

    with pytest.raises(Exception, match="takes no eta"):
        generate(stock, PROMPTS[:1], seed=0, steps=2, eta=1.0)


def test_a_lora_of_another_family_is_refused_both_ways(sd3_run, sd3_dir, tmp_path):
    from spo.errors import SPOError
    from spo.generation import load_model
    from test_sdxl import tiny_sdxl_pipeline

    sd_lora = tmp_path / "sd-lora"
    sd_lora.mkdir()
    (sd_lora / "spo_lora.json").write_text(json.dumps({"rank": 4, "alpha": 4.0, "family": "sd"}))
    with pytest.raises(SPOError, match="trained on an SD model but .* is SD3"):
        load_model(str(sd3_dir), sd_lora)
    sdxl = tmp_path / "sdxl"
    tiny_sdxl_pipeline().save_pretrained(sdxl)
    with pytest.raises(SPOError, match="trained on an SD3 model but .* is SDXL"):
        load_model(str(sdxl), sd3_run[1])


def test_the_flow_training_target_is_the_velocity_that_recovers_x0(sd3_dir):
    from spo.models import load_diffusion

    d = load_diffusion(sd3_dir)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn((3, 16, 8, 8), generator=g), torch.randn((3, 16, 8, 8), generator=g)
    t = torch.tensor([0, 500, 999])
    target = d.training_target(x0, noise, t)
    torch.testing.assert_close(d.x0_prediction(d.noised(x0, noise, t), target, t), x0, rtol=1e-5, atol=1e-5)


def test_diffusion_dpo_trains_sd3_through_the_adapters_training_target(sd3_dir, sd3_spm, tmp_path):
    from spo.trainer import Trainer

    cfg = _spo_config(sd3_dir, sd3_spm, tmp_path / "dpo", "method=diffusion-dpo", "dpo.dataset=world:preference",
                      "dpo.split=validation", "dpo.pairs_per_epoch=4", "train.batch_size=2")
    tr = Trainer(cfg, log=lambda m: None).setup()
    lora = tr.train()
    metrics = [json.loads(line) for line in (tr.out / "metrics.jsonl").read_text().splitlines()]
    assert math.isfinite(metrics[0]["loss"]) and (lora / "pytorch_lora_weights.safetensors").is_file()


def test_a_checkpoints_declared_text_length_reaches_encoding_generation_and_saving(sd3_dir, tmp_path):
    """spo_pipeline.json beside model_index.json (the world's flow model was trained with an 8-token T5 slot):
    prompt encoding and `spo generate` use it, as stock diffusers does when given the same argument."""
    import json
    import shutil

    from spo.errors import SPOError
    from spo.generation import generate
    from spo.models import CALL_DEFAULTS_FILE, load_diffusion, load_pipeline, save_pipeline

    ckpt = tmp_path / "short"
    shutil.copytree(sd3_dir, ckpt)
    (ckpt / CALL_DEFAULTS_FILE).write_text(json.dumps({"max_sequence_length": 8}))
    d = load_diffusion(ckpt)
    cond, _ = d.encode_prompts(PROMPTS)
    assert cond.embeds.shape[1] == d.pipe.tokenizer.model_max_length + 8
    ours = generate(d.pipe, PROMPTS, seed=0, steps=2, guidance=4.5)
    stock = _stock(sd3_dir)
    expected = stock(PROMPTS, num_inference_steps=2, guidance_scale=4.5, output_type="np", max_sequence_length=8,
                     generator=[torch.Generator().manual_seed(i) for i in range(2)]).images
    np.testing.assert_allclose(ours, expected, atol=1e-5)
    assert np.abs(generate(_stock(sd3_dir), PROMPTS, seed=0, steps=2, guidance=4.5) - ours).max() > 1e-3
    save_pipeline(d.pipe, tmp_path / "saved")  # a full fine-tuning output keeps the declaration
    assert json.loads((tmp_path / "saved" / CALL_DEFAULTS_FILE).read_text()) == {"max_sequence_length": 8}
    (ckpt / CALL_DEFAULTS_FILE).write_text(json.dumps({"max_sequence_length": "eight"}))
    with pytest.raises(SPOError, match="positive integers"):
        load_pipeline(ckpt)


def test_init_lora_continues_from_an_sd3_lora(sd3_run, sd3_dir, sd3_spm, tmp_path):
    """model.init_lora reads a flow LoRA (keys under transformer., not unet.) into the fresh adapters."""
    from safetensors.torch import load_file

    from spo.trainer import Trainer, save_lora

    _, lora_dir, _ = sd3_run
    tr = Trainer(_spo_config(sd3_dir, sd3_spm, tmp_path / "continued", f"model.init_lora={lora_dir}"),
                 log=lambda m: None).setup()
    save_lora(tr.acc.unwrap_model(tr.unet), tmp_path / "now", 4, 4.0, type(tr.diffusion.pipe))
    saved, now = (load_file(str(d / "pytorch_lora_weights.safetensors")) for d in (lora_dir, tmp_path / "now"))
    assert saved.keys() == now.keys() and all(torch.equal(saved[k], now[k]) for k in saved)


def test_evaluate_spm_scores_pairs_noised_by_the_flow_model(sd3_spm, sd3_dir, tmp_path):
    """`spo evaluate-spm` with an SD3 noiser: accuracy per flow timestep for the naive model and the SPM."""
    from spo.cli import cli

    result = CliRunner().invoke(cli, [
        "evaluate-spm", "--spm", str(sd3_spm), "--base", "world:pickscore", "--dataset", "world:preference",
        "--split", "validation", "--max-pairs", "4", "--diffusion-model", str(sd3_dir), "--timesteps", "0,500,950",
        "--out", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    acc = json.loads((tmp_path / "eval" / "accuracy.json").read_text())
    assert acc["timesteps"] == [0, 500, 950] and {"base (naive)", "SPM"} <= set(acc["accuracy"])

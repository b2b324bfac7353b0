"""model.compile: the resampler's network calls through torch.compile (spo.compilation) give the eager outputs and
pairs, follow the LoRA weights as they train, and leave every other call (with gradients, outside the block) eager.

One tiny SD pipeline with a one-block UNet and LoRA adapters; every compiled call has the same shape (2 prompts,
classifier-free guidance: 4 rows), so the module compiles one graph (~45 s on a cold inductor cache on 2 busy
cores, a few seconds once cached) and every test reuses it.
"""

from pathlib import Path

import pytest
import torch

from spo.compilation import CompiledSampling
from spo.models import Diffusion
from spo.resampler import resample
from conftest import load_benchmark

PROMPTS = ["a red circle", "a blue square above a yellow triangle"]
REPO = Path(__file__).resolve().parents[1]


def tiny_sd_with_lora():
    """An SD pipeline at toy size whose UNet (one cross-attention block each way, no mid block) has LoRA adapters."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from spo.world import resolve

    tokenizer = CLIPTokenizer.from_pretrained(resolve("world:tokenizer"))
    torch.manual_seed(0)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,), layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        norm_num_groups=4, sample_size=8)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8,), layers_per_block=1, norm_num_groups=4,
        cross_attention_dim=16, attention_head_dim=4, mid_block_type=None,
        down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",))
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():  # as if trained: lora_B starts at zero, where the adapters would change nothing
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, unet=unet, scheduler=scheduler, tokenizer=tokenizer, text_encoder=text,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return Diffusion(pipe.to("cpu"))


@pytest.fixture(scope="module")
def setup():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch._inductor.config, "compile_threads", 1)  # no worker pool to start on a small machine
        diffusion = tiny_sd_with_lora()
        diffusion.unet.eval()
        cond, uncond = diffusion.encode_prompts(PROMPTS)
        x = diffusion.initial_latents(len(PROMPTS), torch.Generator().manual_seed(0))
        yield diffusion, CompiledSampling("default"), cond, uncond, x


def _guided(diffusion, x, cond, uncond, t=500):
    with torch.no_grad():
        return diffusion.guided_output(x, torch.full((len(x),), t), cond, uncond, 5.0)


def _lora_weight(network) -> torch.nn.Parameter:
    return next(p for n, p in network.named_parameters() if "lora_B" in n)


def test_compiled_guided_output_matches_eager_and_the_hooks_still_run(setup):
    diffusion, compiled, cond, uncond, x = setup
    rows = []
    handle = diffusion.unet.register_forward_pre_hook(lambda m, a, k: rows.append(len(a[0])), with_kwargs=True)
    try:
        eager = _guided(diffusion, x, cond, uncond)
        with compiled(diffusion.unet):
            fast = _guided(diffusion, x, cond, uncond)
            again = _guided(diffusion, x, cond, uncond, t=100)  # another timestep: same graph, other values
    finally:
        handle.remove()
    torch.testing.assert_close(fast, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, _guided(diffusion, x, cond, uncond, t=100), rtol=1e-5, atol=1e-5)
    assert not torch.equal(fast, again)
    assert rows == [4, 4, 4]  # the trainer's row counter sees compiled calls too (doubled batch: guidance)


def test_compiled_calls_read_the_lora_weights_as_they_train(setup):
    diffusion, compiled, cond, uncond, x = setup
    weight = _lora_weight(diffusion.unet)
    with compiled(diffusion.unet):
        before = _guided(diffusion, x, cond, uncond)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs >= 1
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.add_(0.5)  # what an optimizer step does: an in-place update of the adapter's parameter
        with compiled(diffusion.unet):
            after = _guided(diffusion, x, cond, uncond)
        eager_after = _guided(diffusion, x, cond, uncond)
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    assert (after - before).abs().max() > 1e-3  # the compiled call saw the new weight ...
    torch.testing.assert_close(after, eager_after, rtol=1e-5, atol=1e-5)  # ... exactly as the eager call does
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # without compiling again


def test_calls_with_gradients_the_reference_and_calls_outside_the_block_run_eager(setup):
    diffusion, compiled, cond, uncond, x = setup
    network = diffusion.unet
    eager = _guided(diffusion, x, cond, uncond)
    network.disable_adapters()
    reference = _guided(diffusion, x, cond, uncond)
    network.enable_adapters()
    with compiled(network):
        with torch.enable_grad():
            x_grad = x.clone().requires_grad_(True)
            trained = diffusion.guided_output(x_grad, torch.full((2,), 500), cond, uncond, 5.0)
    assert "forward" not in network.__dict__  # the block left the network as it found it
    assert trained.requires_grad and torch.equal(trained.detach(), eager)  # the eager forward, bit for bit
    assert torch.equal(_guided(diffusion, x, cond, uncond), eager)
    assert not torch.allclose(reference, eager)  # (the adapters do change the output)
    with CompiledSampling("")(network) as same:  # mode "" (the default): nothing is swapped
        assert same is network and "forward" not in network.__dict__


def test_the_resampler_draws_the_same_pairs_with_and_without_compile(setup):
    diffusion, compiled, cond, uncond, x = setup

    def judge(latents, conditioning, t):  # a latent judge: every network call of the round has 2 prompts' rows
        return 100 * latents.mean(dim=(1, 2, 3))

    def run():
        return resample(diffusion, judge, PROMPTS, num_steps=5, guidance=5.0, eta=1.0, num_candidates=3,
                        threshold=0.0, divert_start_step=1, generator=torch.Generator().manual_seed(3),
                        judge_input="latents")

    eager = run()
    with compiled(diffusion.unet):
        fast = run()
    a, b = eager.pairs, fast.pairs
    assert len(a) == len(b) == len(PROMPTS) * 4
    for name in ("prompt_index", "step_index", "timesteps", "prev_timesteps", "shared"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for name in ("x_t", "win", "lose", "gap"):  # the same draws; values equal up to the kernels' float rounding
        torch.testing.assert_close(getattr(b, name), getattr(a, name), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast.final_latents, eager.final_latents, rtol=1e-4, atol=1e-4)


def test_under_bf16_autocast_compiled_calls_are_as_close_to_fp32_as_eager_ones(setup):
    """Under a half-precision autocast the compiled kernels keep intermediates in other precisions than the eager
    ops, so outputs differ at bf16 rounding (~1e-2) and the sampled latents with them: the same distribution, not
    the same numbers. What must hold: the compiled call is no less accurate than the eager one (fp32 as truth).
    Checked on one transformer block of the UNet (attention with its LoRA adapters, feed-forward): a graph of its
    own under autocast, compiled in seconds where the whole UNet would take as long as the fixture's."""
    diffusion, _, cond, uncond, x = setup
    compiled = CompiledSampling("default")  # its own: the fixture's keeps its compiled UNet for the other tests
    block = diffusion.unet.down_blocks[0].attentions[0].transformer_blocks[0]
    hidden = torch.randn(2, 16, block.norm1.normalized_shape[0], generator=torch.Generator().manual_seed(1))

    def call():
        with torch.no_grad():
            return block(hidden, encoder_hidden_states=cond.embeds).float()

    truth = call()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = call()
        with compiled(block):
            fast = call()
    eager_error, compiled_error = (eager - truth).abs().max(), (fast - truth).abs().max()
    assert 0 < eager_error < 0.1 * truth.abs().max()
    assert compiled_error <= 2 * eager_error


def test_outputs_are_copied_out_of_a_cuda_graph_pool_whatever_their_container():
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    from spo.compilation import owned

    sample = torch.ones(2, 3)
    for output, get in ((sample, lambda o: o), ((sample,), lambda o: o[0]),
                        (UNet2DConditionOutput(sample=sample), lambda o: o.sample)):
        copy = owned(output)
        assert type(copy) is type(output) and torch.equal(get(copy), sample)
        assert get(copy).data_ptr() != sample.data_ptr()


def test_model_compile_is_a_checked_setting():
    from spo.config import SPOConfig, load_config
    from spo.errors import SPOError

    assert load_config(SPOConfig).model.compile == ""  # off unless asked for
    assert load_config(SPOConfig, None, ["model.compile=reduce-overhead"]).model.compile == "reduce-overhead"
    with pytest.raises(SPOError, match="model.compile must be one of"):
        load_config(SPOConfig, None, ["model.compile=fast"]).validate()
    with pytest.raises(ValueError, match="unknown compile mode"):
        CompiledSampling("fast")


def test_the_benchmark_report_gives_median_range_and_speed_up():
    bench = load_benchmark("compile_speed")
    result = dict(setting="world", mode="default", threads=1, repeats=3, compile_seconds=80.0, warm_compile_seconds=5.0,
                  eager=[10.0, 12.0, 11.0], compiled=[8.0, 7.5, 9.0], load_before=[1.0, 1.0, 1.0],
                  load_after=[2.0, 2.0, 2.0], same_pairs=True, max_abs_diff=1e-6, b=16, k=4, num_steps=20,
                  network_rows_per_round=100, command="python benchmarks/compile_speed.py", machine="test")
    text = bench.markdown(result)
    assert "| eager | 11 (10–12) |" in text and "| compiled | 8 (7.5–9) |" in text
    assert "1.25×" in text  # the median of the per-repeat ratios 10/8, 12/7.5, 11/9
    assert "80" in text and "load average" in text

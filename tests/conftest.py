import os

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the network: every model is built locally
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
from click.testing import CliRunner


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """A complete world built once per session with `spo world build --tiny` (the real CLI path)."""
    from spo.cli import cli

    out = tmp_path_factory.mktemp("world")
    result = CliRunner().invoke(cli, ["world", "build", "--tiny", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def tiny_spm(tiny_world, tmp_path_factory):
    """A step-aware preference model for the tiny world, from one `spo train-spm` step."""
    from spo.cli import cli

    out = tmp_path_factory.mktemp("spm")
    result = CliRunner().invoke(cli, [
        "train-spm", f"data.dataset={tiny_world / 'preference'}", f"model.diffusion_model={tiny_world / 'sd'}",
        f"model.base={tiny_world / 'pickscore'}", f"log.output_dir={out}", "train.max_steps=1", "train.batch_size=4",
        "log.report_to=none"])
    assert result.exit_code == 0, result.output
    return out / "spm"


def tiny_spo_args(world, spm, out, *extra):
    """`spo train` overrides for a seconds-long run on the tiny world."""
    return [f"model.pretrained={world / 'sd'}", f"model.spm={spm}", "sample.num_steps=4", "sample.divert_start_step=1",
            "sample.batch_size=2", "sample.batches_per_epoch=1", "sample.threshold=0", "train.batch_size=2",
            "train.num_epochs=2",
            "train.learning_rate=1e-2", f"log.output_dir={out}", "log.report_to=none", *extra]


def assert_same_run(resumed, uninterrupted):
    """An interrupted-and-resumed run has the uninterrupted run's loss curve and final LoRA."""
    import json

    import torch
    from safetensors.torch import load_file

    losses = lambda d: [json.loads(l)["loss"] for l in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert losses(resumed) == pytest.approx(losses(uninterrupted), rel=1e-5)
    a = load_file(str(uninterrupted / "lora" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(resumed / "lora" / "pytorch_lora_weights.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)


def deterministic_latents(diffusion, prompts, start, steps: int, guidance: float):
    """Our eta-0 sampling loop through the family adapter (`guided_output` + `transition`): the latents it
    ends on, and every step's std (all zero when the loop is deterministic). Compared with the stock
    pipeline's latents by the family tests."""
    import torch

    cond, uncond = diffusion.encode_prompts(prompts)
    x, stds = start, []
    with torch.no_grad():
        for t, t_prev in diffusion.schedule(steps):
            tb = torch.full((len(x),), t)
            out = diffusion.guided_output(x, tb, cond, uncond, guidance)
            x, std, _ = diffusion.transition(out, tb, torch.full_like(tb, t_prev), x, 0.0)
            stds.append(std)
    return x, stds


def assert_stock_reload_matches(trained_pipe, stock, lora_dir, prompt: str, **kw):
    """A LoRA folder loaded by stock diffusers (`stock.load_lora_weights`) draws what the trained pipeline
    draws (same seed), and differs from the stock model without it."""
    import torch

    def draw(pipe):
        return pipe([prompt], generator=torch.Generator().manual_seed(0), output_type="np", **kw).images

    trained, base = draw(trained_pipe), draw(stock)
    stock.load_lora_weights(str(lora_dir))
    reloaded = draw(stock)
    torch.testing.assert_close(torch.from_numpy(reloaded), torch.from_numpy(trained), rtol=0, atol=1e-5)
    assert abs(reloaded - base).max() > 1e-4  # and the LoRA does change the picture


def load_benchmark(name: str):
    """benchmarks/<name>.py as a module (the benchmarks are scripts, not a package). It is registered in
    sys.modules first, because dataclasses defined in it look their module up there."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module

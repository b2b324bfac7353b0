"""model.compile: time of one resampler round on the world model, eager vs torch.compile'd network calls (issue #14).

The world model (`world:sd`, with LoRA adapters as `spo train` adds them) and its shipped SPM (`world:spm`), the
sampling settings of configs/world.yaml (16 prompts, K = 4, 20 steps, diverted from step 4). The compiled variant
wraps the round in `spo.compilation.CompiledSampling(mode)`, exactly as `SPO.sample` does. Reported:
- compile: the first compiled round minus a steady compiled round, on a cold inductor cache (a fresh
  TORCHINDUCTOR_CACHE_DIR), and again after `torch._dynamo.reset()` with the cache now warm (what a later run on
  the same machine pays);
- the round's seconds, eager and compiled, interleaved (eager, compiled, eager, ...) so a slow spell of the machine
  hits both alike; median and range, and the median of the per-repeat speed-ups;
- whether the two variants drew the same pairs from the same seed (same prompts, steps and selection; latents equal
  up to float rounding), and the load average before and after.

    OMP_NUM_THREADS=1 python benchmarks/compile_speed.py             # benchmarks/results/compile_speed.{json,md}
    OMP_NUM_THREADS=1 python benchmarks/compile_speed.py --quick --out /tmp/bench   # smoke test, minutes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_world(lora_rank: int, seed: int):
    """The world model with fresh LoRA adapters (the trainer's recipe) and its pixel SPM."""
    import torch
    from peft import LoraConfig

    from spo.config import DEFAULT_LORA_TARGETS
    from spo.models import load_diffusion
    from spo.plugins import resolve
    from spo.preference.judges import load_step_judge

    diffusion = load_diffusion(resolve("world:sd"))
    torch.manual_seed(seed)
    network = diffusion.unet.requires_grad_(False)
    network.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian",
                                   target_modules=list(DEFAULT_LORA_TARGETS)))
    network.eval()
    return diffusion, load_step_judge("world:spm", "cpu")


def round_runner(diffusion, judge, prompts, s, seed: int):
    """One resampler round with configs/world.yaml's sampling settings; returns (seconds, result)."""
    import torch

    from spo.resampler import resample

    def run():
        start = time.perf_counter()
        result = resample(diffusion, judge, prompts, s.num_steps, s.guidance_scale, s.eta, s.num_candidates,
                          s.threshold, s.divert_start_step, torch.Generator().manual_seed(seed), s.inner_steps,
                          s.keep_rule, s.continuation)
        return time.perf_counter() - start, result
    return run


def same_pairs(a, b) -> tuple[bool, float]:
    """Same selection (prompts, steps, counts) and latents equal to 1e-4; the largest latent difference."""
    import torch

    if len(a.pairs) != len(b.pairs):
        return False, float("inf")
    same = all(torch.equal(getattr(a.pairs, n), getattr(b.pairs, n)) for n in ("prompt_index", "step_index"))
    diffs = [float((getattr(a.pairs, n) - getattr(b.pairs, n)).abs().max()) if len(a.pairs) else 0.0
             for n in ("x_t", "win", "lose")] + [float((a.final_latents - b.final_latents).abs().max())]
    return same and max(diffs) < 1e-4, max(diffs)


def measure(args) -> dict:
    import torch

    from spo.compilation import CompiledSampling
    from spo.config import SPOConfig, load_config
    from spo.prompts import load_prompts

    torch.set_num_threads(args.threads)
    cfg = load_config(SPOConfig, REPO / "configs" / "world.yaml")
    s = cfg.sample
    if args.quick:
        s.num_steps, s.divert_start_step, s.batch_size, s.num_candidates = 6, 2, 2, 2
    prompts = load_prompts(cfg.prompts)[: s.batch_size]
    diffusion, judge = load_world(cfg.model.lora_rank, args.seed)
    run = round_runner(diffusion, judge, prompts, s, args.seed)
    compiled = CompiledSampling(args.mode)
    network = diffusion.unet

    def run_compiled():
        with compiled(network):
            return run()

    log = lambda msg: print(f"[compile_speed] {msg}", flush=True)  # noqa: E731
    load_before = list(os.getloadavg())
    eager_first, eager_result = run()
    log(f"eager round {eager_first:.1f}s (untimed warm-up); compiling ({args.mode}) ...")
    first, compiled_result = run_compiled()
    log(f"first compiled round (compiles) {first:.1f}s")
    eager, fast, loads = [], [], []
    for i in range(args.repeats):
        loads.append(os.getloadavg()[0])
        eager.append(run()[0])
        fast.append(run_compiled()[0])
        log(f"repeat {i + 1}: eager {eager[-1]:.2f}s, compiled {fast[-1]:.2f}s, load {loads[-1]:.2f}")
    torch._dynamo.reset()  # forget the compiled graphs; the inductor cache on disk is now warm
    warm_first, _ = run_compiled()
    ok, diff = same_pairs(eager_result, compiled_result)
    rows = s.batch_size * 2 * (s.divert_start_step + 1 + (s.num_steps - s.divert_start_step - 1) * s.num_candidates)
    steady = statistics.median(fast)
    setting = "world:sd + world:spm, configs/world.yaml sampling" + (" (--quick: reduced)" if args.quick else "")
    return dict(setting=setting,
                mode=args.mode, threads=torch.get_num_threads(), repeats=args.repeats, b=s.batch_size,
                k=s.num_candidates, num_steps=s.num_steps, divert_start_step=s.divert_start_step,
                network_rows_per_round=rows, first_compiled_round=first, warm_first_compiled_round=warm_first,
                compile_seconds=first - steady, warm_compile_seconds=warm_first - steady, eager=eager, compiled=fast,
                load_before=load_before, load_during=loads, load_after=list(os.getloadavg()),
                same_pairs=ok, max_abs_diff=diff, pairs=len(eager_result.pairs), quick=args.quick,
                command=" ".join(["OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "?"), "python",
                                  "benchmarks/compile_speed.py", *sys.argv[1:]]),
                machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                        f"torch {torch.__version__}")


def _span(values) -> str:
    return f"{statistics.median(values):.3g} ({min(values):.3g}–{max(values):.3g})"


def markdown(r: dict) -> str:
    ratios = [e / c for e, c in zip(r["eager"], r["compiled"])]
    load = lambda key: ", ".join(f"{v:.2f}" for v in r[key])  # noqa: E731
    lines = [
        "# model.compile: one resampler round, eager vs torch.compile", "",
        f"{r['setting']}: {r['b']} prompts, K = {r['k']}, {r['num_steps']} steps; torch.compile mode `{r['mode']}`, "
        f"CPU, {r['threads']} torch thread(s), seconds per round: median (min–max) of {r['repeats']} interleaved "
        f"repeats. `{r['command']}` on {r['machine']}.", "",
        "| variant | seconds per round |", "|---|---|",
        f"| eager | {_span(r['eager'])} |", f"| compiled | {_span(r['compiled'])} |", "",
        f"Speed-up (eager / compiled, per repeat): **{statistics.median(ratios):.2f}×** "
        f"(range {min(ratios):.2f}–{max(ratios):.2f}).", "",
        f"Compile (warm-up), paid once per run in its first round: **{r['compile_seconds']:.0f} s** on a cold inductor "
        f"cache, {r['warm_compile_seconds']:.0f} s with the cache warm (a later run on the same machine).", "",
        f"Same pairs from the same seed: {'yes' if r['same_pairs'] else 'NO'} (same prompts, steps and selection; "
        f"largest latent difference {r['max_abs_diff']:.1e}: the compiled kernels round differently, not bit for bit).",
        "", f"System load average (1, 5, 15 min) before: {load('load_before')}; after: {load('load_after')}.",
        "",
        "Only the resampler's no-grad network calls are compiled (`spo.compilation`); training runs eager, so a "
        "training step costs the same either way. Each round makes two network batch shapes (2b rows before the "
        "diverted steps, 2bK rows after), each compiled once per run.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", default="default",
                        help="torch.compile mode: default | reduce-overhead | max-autotune")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="2 prompts, K = 2, 6 steps, 1 repeat: a smoke test")
    parser.add_argument("--warm-cache", action="store_true", help="keep the machine's inductor cache (default: a "
                        "fresh one, so the compile time is a first run's)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    if args.quick and "--repeats" not in sys.argv:
        args.repeats = 1
    with tempfile.TemporaryDirectory(prefix="inductor-") as cache:
        if not args.warm_cache:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        result = measure(args)
    from spo.files import atomic_write_text

    args.out.mkdir(parents=True, exist_ok=True)
    name = "compile_speed_quick" if args.quick else "compile_speed"
    atomic_write_text(args.out / f"{name}.json", json.dumps(result, indent=2))
    atomic_write_text(args.out / f"{name}.md", markdown(result))
    print((args.out / f"{name}.md").read_text())


if __name__ == "__main__":
    main()

"""The paper's claims on the embedded world, several seeds per row (issue: decisive multi-seed results).

Every row is configs/world.yaml with one thing changed, trained with seeds 0..S-1 and judged on
held-out prompts by the world's ground-truth utility (never seen in training), beside the training
judge (the SPM at t=0). Each seed's gain is the mean paired difference to the base model over the
same prompts and image seeds; a row's CI comes from a two-level bootstrap (seeds, then prompts), so
it includes seed-to-seed variation, not just prompt sampling.

    python benchmarks/multiseed.py --jobs 2                 # everything (hours on 2 CPU cores)
    python benchmarks/multiseed.py --rows spo,oracle        # some rows
    python benchmarks/multiseed.py --quick                  # seconds-long runs (what the tests run)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
EVAL_SEED = 10_000

# name -> overrides of configs/world.yaml
ROWS = {
    "spo": [],
    "kway-rule": ["sample.keep_rule=kway"],
    # the simulated humans' own Bradley-Terry logit (utility / tau) on the x0-predictions: a perfect judge
    "oracle-judge": ["model.spm=scorer:world-utility-logit"],
    "naive-pickscore": ["model.spm=world:pickscore"],
    "continue-best": ["sample.continuation=best"],
    "continue-worst": ["sample.continuation=worst"],
    "all-t": ["sample.divert_start_step=0"],
    "K=2": ["sample.num_candidates=2"],
    "K=8": ["sample.num_candidates=8"],
    "threshold=0": ["sample.threshold=0.0"],
    "threshold=0.3": ["sample.threshold=0.3"],
}


def run_one(job: dict) -> dict:
    """Train one (row, seed) and score its held-out images; runs in its own process."""
    import torch

    torch.set_num_threads(job["threads"])
    from spo.config import SPOConfig, load_config
    from spo.generation import generate, load_model
    from spo.scorers import load_scorer
    from spo.trainer import Trainer

    out = Path(job["work"]) / f"{job['row']}-seed{job['seed']}"
    cfg = load_config(SPOConfig, ROOT / "configs" / "world.yaml", [
        *job["overrides"], f"train.seed={job['seed']}", f"train.num_epochs={job['epochs']}",
        f"log.output_dir={out}", "log.report_to=none", "log.checkpointing_epochs=1000", *job["extra"]])
    t0 = time.time()
    tr = Trainer(cfg, overwrite=True, log=lambda m: None).setup()
    lora = tr.train()
    seconds = time.time() - t0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    images = generate(load_model("world:sd", lora), job["prompts"], EVAL_SEED, desc="eval")
    return dict(row=job["row"], seed=job["seed"], seconds=seconds,
                pairs_trained=int(sum(r.get("pairs_trained", 0) for r in rows)),
                fraction_kept=float(np.mean([r.get("fraction_kept", float("nan")) for r in rows])),
                utility=load_scorer("world-utility").score(images, job["prompts"]).tolist(),
                spm_t0=_spm_t0(images, job["prompts"]))


def _spm_t0(images, prompts) -> list[float]:
    import torch

    from spo.plugins import resolve
    from spo.preference.judges import load_scorer_model

    spm = load_scorer_model(resolve("world:spm")).eval()
    x = torch.as_tensor(images).permute(0, 3, 1, 2).float() * 2 - 1
    with torch.no_grad():
        return spm(x, prompts, torch.zeros(len(prompts), dtype=torch.long)).tolist()


def base_scores(prompts: list[str]) -> dict:
    from spo.generation import generate, load_model
    from spo.scorers import load_scorer

    images = generate(load_model("world:sd"), prompts, EVAL_SEED, desc="base")
    return dict(utility=load_scorer("world-utility").score(images, prompts).tolist(), spm_t0=_spm_t0(images, prompts))


def seeds_and_prompts_ci(gains: np.ndarray, n_boot: int = 4000, seed: int = 0) -> list[float]:
    """95% CI of the mean over seeds of per-seed mean gains; gains is (seeds, prompts) of paired differences.

    Two-level bootstrap: resample seeds, then prompts (the same prompt draw for every seed, since the
    prompts are shared), so both seed-to-seed and prompt-sampling variation are in the interval.
    """
    rng = np.random.default_rng(seed)
    s, p = gains.shape
    si = rng.integers(0, s, (n_boot, s))
    pi = rng.integers(0, p, (n_boot, p))
    means = np.array([gains[si[b]][:, pi[b]].mean() for b in range(n_boot)])
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def summarise(results: list[dict], base: dict) -> list[dict]:
    out = []
    for row in dict.fromkeys(r for r in ROWS if any(x["row"] == r for x in results)):
        runs = sorted((r for r in results if r["row"] == row), key=lambda r: r["seed"])
        gains = np.array([np.subtract(r["utility"], base["utility"]) for r in runs])
        spm = np.array([np.subtract(r["spm_t0"], base["spm_t0"]) for r in runs])
        per_seed = gains.mean(1)
        out.append(dict(row=row, seeds=len(runs), utility_gain=float(per_seed.mean()),
                        utility_gain_ci95=seeds_and_prompts_ci(gains), per_seed_gain=per_seed.round(4).tolist(),
                        seed_sd=float(per_seed.std(ddof=1)) if len(runs) > 1 else float("nan"),
                        spm_t0_gain=float(spm.mean()), spm_t0_gain_ci95=seeds_and_prompts_ci(spm),
                        pairs_trained=int(np.mean([r["pairs_trained"] for r in runs])),
                        fraction_kept=float(np.mean([r["fraction_kept"] for r in runs])),
                        train_seconds=float(np.mean([r["seconds"] for r in runs]))))
    return out


def relative(results: list[dict], reference: str = "spo") -> list[dict]:
    """Each row against the reference row, paired by seed and prompt (needs no base-model images)."""
    ref = {r["seed"]: np.asarray(r["utility"]) for r in results if r["row"] == reference}
    out = []
    for row in dict.fromkeys(r for r in ROWS if r != reference and any(x["row"] == r for x in results)):
        runs = sorted((r for r in results if r["row"] == row and r["seed"] in ref), key=lambda r: r["seed"])
        d = np.array([np.asarray(r["utility"]) - ref[r["seed"]] for r in runs])
        out.append(dict(row=row, seeds=len(runs), delta=float(d.mean()), delta_ci95=seeds_and_prompts_ci(d),
                        per_seed=d.mean(1).round(4).tolist(),
                        pairs_trained=int(np.mean([r["pairs_trained"] for r in runs])),
                        fraction_kept=float(np.mean([r["fraction_kept"] for r in runs]))))
    return out


def relative_markdown(rel: list[dict], results: list[dict], meta: dict) -> str:
    ref = [r for r in results if r["row"] == "spo"]
    lines = [f"# World ablations over {meta['seeds']} seeds per row, against the SPO row",
             "", f"configs/world.yaml ({meta['epochs']} epochs) with one change per row; ground-truth utility on "
             f"{meta['prompts']} held-out prompts. Δ = row minus the `spo` row (same seed, same prompts and image "
             f"seeds), mean over seeds; CI = two-level bootstrap over seeds and prompts. SPO row: mean utility "
             f"{np.mean([np.mean(r['utility']) for r in ref]):.4f}, {int(np.mean([r['pairs_trained'] for r in ref]))} "
             f"pairs per run, {np.mean([r['fraction_kept'] for r in ref]):.2f} of candidate sets kept.", "",
             "| row | seeds | Δ utility vs spo | 95% CI (seeds+prompts) | per-seed Δ | pairs/run | kept |",
             "|---|---|---|---|---|---|---|"]
    for r in rel:
        lo, hi = r["delta_ci95"]
        lines.append(f"| {r['row']} | {r['seeds']} | {r['delta']:+.4f} | [{lo:+.4f}, {hi:+.4f}] | "
                     f"{', '.join(f'{g:+.3f}' for g in r['per_seed'])} | {r['pairs_trained']} | {r['fraction_kept']:.2f} |")
    lines += ["", f"Command: `{meta['command']}`; machine: {meta['machine']}."]
    return "\n".join(lines) + "\n"


def markdown(summary: list[dict], base: dict, meta: dict) -> str:
    lines = [f"# World results over {meta['seeds']} seeds per row",
             "", f"configs/world.yaml ({meta['epochs']} epochs) with one change per row; ground-truth utility on "
             f"{meta['prompts']} held-out prompts (base {np.mean(base['utility']):.3f}). Gain = mean over seeds of the "
             "paired mean difference to the base model; CI = two-level bootstrap over seeds and prompts.", "",
             "| row | seeds | utility gain | 95% CI (seeds+prompts) | per-seed gains | SPM(t=0) gain | pairs/run | kept |",
             "|---|---|---|---|---|---|---|---|"]
    for r in summary:
        lo, hi = r["utility_gain_ci95"]
        lines.append(f"| {r['row']} | {r['seeds']} | {r['utility_gain']:+.4f} | [{lo:+.4f}, {hi:+.4f}] | "
                     f"{', '.join(f'{g:+.3f}' for g in r['per_seed_gain'])} | {r['spm_t0_gain']:+.3f} | "
                     f"{r['pairs_trained']} | {r['fraction_kept']:.2f} |")
    lines += ["", f"Command: `{meta['command']}`; machine: {meta['machine']}; {meta['wall_seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows (default: all)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=25)
    p.add_argument("--prompts", type=int, default=128)
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--quick", action="store_true", help="seconds-long runs: 2 rows, 2 seeds, 1 epoch, 8 prompts")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-multiseed")
    p.add_argument("--reuse", type=Path, default=None, help="runs .jsonl of an earlier call: skip the runs it has")
    p.add_argument("--relative-from", type=Path, default=None,
                   help="only summarise a runs .jsonl of an earlier call against its spo row (no training)")
    p.add_argument("--machine", default="", help="with --relative-from: where those runs ran")
    args = p.parse_args(argv)
    if args.relative_from:
        results = [json.loads(line) for line in args.relative_from.read_text().splitlines() if line.strip()]
        meta = dict(seeds=max(r["seed"] for r in results) + 1, epochs=args.epochs, prompts=len(results[0]["utility"]),
                    command="python benchmarks/multiseed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                    machine=args.machine)
        text = relative_markdown(relative(results), results, meta)
        (args.out / (args.relative_from.stem + "_vs_spo.md")).write_text(text)
        print(text)
        return dict(meta=meta)
    rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    extra = []
    if args.quick:
        rows, args.seeds, args.epochs, args.prompts = rows[:2], 2, 1, 8
        extra = ["sample.batch_size=2", "sample.num_steps=6", "sample.divert_start_step=2"]
    from spo.prompts import load_prompts

    prompts = load_prompts("world:test")[: args.prompts]
    t0 = time.time()
    base = base_scores(prompts)
    jobs = [dict(row=r, seed=s, overrides=ROWS[r], epochs=args.epochs, prompts=prompts, work=str(args.work),
                 threads=args.threads, extra=extra) for s in range(args.seeds) for r in rows]
    reused = [json.loads(line) for line in args.reuse.read_text().splitlines() if line.strip()] if args.reuse else []
    done = {(r["row"], r["seed"]) for r in reused}
    jobs = [j for j in jobs if (j["row"], j["seed"]) not in done]
    args.out.mkdir(parents=True, exist_ok=True)
    partial = args.out / ("multiseed_quick_runs.jsonl" if args.quick else "multiseed_runs.jsonl")
    partial.write_text("")
    results = list(reused)
    if reused:
        partial.write_text("".join(json.dumps(r) + "\n" for r in reused))
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:  # each finished run is written at once: a cut-off run keeps them
        for future in as_completed([pool.submit(run_one, j) for j in jobs]):
            results.append(future.result())
            with open(partial, "a") as f:
                f.write(json.dumps(results[-1]) + "\n")
            print(f"done {results[-1]['row']} seed {results[-1]['seed']} in {results[-1]['seconds']:.0f} s", flush=True)
    summary = summarise(results, base)
    import platform

    meta = dict(seeds=args.seeds, epochs=args.epochs, prompts=len(prompts), wall_seconds=time.time() - t0,
                command="python benchmarks/multiseed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                machine=f"{platform.machine()}, {os.cpu_count()} cores, {args.jobs} jobs x {args.threads} threads")
    name = "multiseed_quick" if args.quick else "multiseed"
    (args.out / f"{name}.json").write_text(json.dumps(dict(meta=meta, base=base, summary=summary, runs=results), indent=1))
    (args.out / f"{name}.md").write_text(markdown(summary, base, meta))
    print(markdown(summary, base, meta))
    return dict(meta=meta, summary=summary)


if __name__ == "__main__":
    main()

"""The paper's claims on the embedded world, several seeds per row (issue: decisive multi-seed results).

Every row is configs/world.yaml with one thing changed, trained with seeds 0..S-1 and judged on
held-out prompts by the world's ground-truth utility (never seen in training), beside the training
judge (the SPM at t=0). Each seed's gain is the mean paired difference to the base model over the
same prompts and image seeds; a row's CI comes from a two-level bootstrap (seeds, then prompts), so
it includes seed-to-seed variation, not just prompt sampling.

    python benchmarks/multiseed.py --jobs 2                 # everything (hours on 2 CPU cores)
    python benchmarks/multiseed.py --rows spo,oracle        # some rows
    python benchmarks/multiseed.py --quick                  # seconds-long runs (what the tests run)
    python benchmarks/multiseed.py --recipe flow_world.yaml --rows spo,trajectory,oracle-judge   # the flow world

`--recipe` names the shipped config every row starts from (default configs/world.yaml, the SD world; the
flow world's configs/flow_world.yaml trains world:sd3 with its own step judge world:spm_sd3). The model the
images come from and the training judge reported beside the utility are the recipe's.

Rows that need more than an override: `diffusion-dpo` trains configs/world_dpo.yaml; with
`--tune-dpo` its β and learning rate are first chosen on the world's *validation* prompts (one run
per grid point, seed 0), then the chosen setting runs every seed on the held-out test prompts.
`no-t-spm` uses a step judge trained without timestep conditioning: `--no-t-spm PATH`, or trained
here first (configs/spm_world.yaml with model.time_conditioned=false). `--every N` also evaluates a
LoRA snapshot every N epochs (mean utility against UNet compute), for quality-per-compute curves.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
EVAL_SEED = 10_000
DPO_QUICK = ["dpo.pairs_per_epoch=16", "train.batch_size=8"]
SPM_QUICK = ["train.max_steps=2", "train.batch_size=4", "log.checkpointing_steps=1000"]

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
    # Trajectory-level credit (Flow-GRPO/D3PO style): branch once, roll the K candidates to the end, judge the
    # final images, and train every transition of the best against the worst trajectory.
    "trajectory": ["sample.inner_steps=1000"],
    "K=2": ["sample.num_candidates=2"],
    "K=8": ["sample.num_candidates=8"],
    "threshold=0": ["sample.threshold=0.0"],
    "threshold=0.3": ["sample.threshold=0.3"],
    "no-t-spm": ["model.spm={no_t_spm}"],
    # the latent step judge (model.latent_judge, world:latent_judge): scores noisy latents, no decode, no CLIP
    "latent-judge": ["model.judge=latent"],
    # the latent judge distilled from world:spm on the world model's own sibling candidates (issue #14)
    "latent-distilled": ["model.judge=latent", "model.latent_judge=world:latent_judge_distilled"],
    # the same, retrained with one on-policy round: also on the sets of three policies SPO tuned with the above
    "latent-onpolicy": ["model.judge=latent", "model.latent_judge=world:latent_judge_onpolicy"],
    # a second training draw of that recipe: first `spo train-latent-judge --config latent_judge_onpolicy_world
    # train.seed=1 log.output_dir=runs/latent-judge-onpolicy-world-seed1`
    "latent-onpolicy-draw2": ["model.judge=latent",
                              "model.latent_judge=runs/latent-judge-onpolicy-world-seed1/latent_judge"],
    # the on-policy judge with the compiled sampling path (the configuration of the 0.44x epoch)
    "latent-onpolicy-compiled": ["model.judge=latent", "model.latent_judge=world:latent_judge_onpolicy",
                                 "model.compile=default"],
    # the pixel SPM on x0-predictions decoded by the distilled AutoencoderTiny (world:tiny_decoder), not the VAE
    "tiny-decoder": ["model.scoring_decoder=world:tiny_decoder"],
    "diffusion-dpo": [],  # configs/world_dpo.yaml; β and lr from --dpo or --tune-dpo
}
CONFIGS = {"diffusion-dpo": "world_dpo.yaml"}
CURVE_ROWS = ("spo", "oracle-judge", "diffusion-dpo")  # rows whose snapshots --every evaluates  # rows not named here train configs/world.yaml
TRAIN_ROW_COST = 3  # a UNet row with gradients (forward + backward) in forward-equivalents


def run_one(job: dict) -> dict:
    """Train one (row, seed) and score its held-out images; runs in its own process."""
    import torch

    torch.set_num_threads(job["threads"])
    from spo.config import SPOConfig, load_config
    from spo.generation import generate, load_model
    from spo.scorers import load_scorer
    from spo.trainer import Trainer, save_lora

    out = Path(job["work"]) / f"{job['row']}-seed{job['seed']}".replace(" ", "_")
    cfg = load_config(SPOConfig, ROOT / "configs" / job.get("config", job["recipe"]), [
        *job["overrides"], f"train.seed={job['seed']}", f"train.num_epochs={job['epochs']}",
        f"log.output_dir={out}", "log.report_to=none", "log.checkpointing_epochs=1000", *job["extra"]])
    if cfg.model.pretrained != job["pretrained"]:  # the images are judged from job["pretrained"]: they must agree
        raise ValueError(f"{job['row']} trains {cfg.model.pretrained} but is evaluated on {job['pretrained']}")
    utility = load_scorer("world-utility")
    t0, excluded, snapshots = time.time(), [0.0], []

    def snapshot(tr) -> None:  # evaluation time is excluded from the run's seconds
        if not job.get("every") or tr.epoch % job["every"] or tr.epoch == cfg.train.num_epochs:
            return
        s0 = time.time()
        where = out / "snapshots" / f"epoch-{tr.epoch}"
        save_lora(tr.acc.unwrap_model(tr.unet), where, cfg.model.lora_rank, cfg.model.lora_alpha,
                  type(tr.diffusion.pipe))  # in the family's LoRA format
        images = generate(load_model(job["pretrained"], str(where)), job["prompts"], EVAL_SEED, desc="snapshot")
        snapshots.append(dict(epoch=tr.epoch, seconds=s0 - t0 - excluded[0], **_compute(tr),
                              utility=float(utility.score(images, job["prompts"]).mean())))
        excluded[0] += time.time() - s0

    tr = Trainer(cfg, overwrite=True, log=lambda m: None).setup()
    lora = tr.train(on_epoch_end=snapshot)
    seconds = time.time() - t0 - excluded[0]
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # this run's process, before evaluation
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    images = generate(load_model(job["pretrained"], lora), job["prompts"], EVAL_SEED, desc="eval")
    scores = utility.score(images, job["prompts"])
    snapshots.append(dict(epoch=cfg.train.num_epochs, seconds=seconds, **_compute(tr), utility=float(scores.mean())))
    return dict(row=job["row"], seed=job["seed"], seconds=seconds, split=job.get("split", "test"),
                overrides=job["overrides"], pairs_trained=int(sum(r.get("pairs_trained", 0) for r in rows)),
                fraction_kept=float(np.mean([r.get("fraction_kept", float("nan")) for r in rows])),
                utility=scores.tolist(), spm_t0=_spm_t0(images, job["prompts"], job["judge"]), snapshots=snapshots,
                peak_rss_mb=peak_rss_mb)


def evaluate_run(job: dict) -> dict:
    """Score a finished run folder (trained elsewhere, e.g. on a lent GPU) as `run_one` would have."""
    import torch

    torch.set_num_threads(job["threads"])
    from spo.generation import generate, load_model
    from spo.scorers import load_scorer

    out, utility = Path(job["dir"]), load_scorer("world-utility")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    snapshots = []
    curve = sorted((out / "snapshots").glob("epoch-*"), key=lambda d: int(d.name.split("-")[1]))
    for where in (curve if job["split"] == "test" else []) + [out / "lora"]:  # tuning runs: the final LoRA only
        epoch = int(where.name.split("-")[1]) if where.name != "lora" else rows[-1]["epoch"]
        images = generate(load_model(job["pretrained"], str(where)), job["prompts"], EVAL_SEED, desc="eval")
        scores = utility.score(images, job["prompts"])
        m = next(r for r in rows if r["epoch"] == epoch)
        compute = dict(forward_rows=m["unet_forward_rows"], train_rows=m["unet_train_rows"])
        snapshots.append(dict(epoch=epoch, seconds=sum(r["epoch_seconds"] for r in rows if r["epoch"] <= epoch), **compute,
                              forward_equivalents=compute["forward_rows"] + TRAIN_ROW_COST * compute["train_rows"],
                              utility=float(scores.mean())))
    return dict(row=job["row"], seed=job["seed"], seconds=snapshots[-1]["seconds"], split=job["split"],
                overrides=job["overrides"], pairs_trained=int(sum(r.get("pairs_trained", 0) for r in rows)),
                fraction_kept=float(np.mean([r.get("fraction_kept", float("nan")) for r in rows])),
                utility=scores.tolist(), spm_t0=_spm_t0(images, job["prompts"], job["judge"]), snapshots=snapshots,
                trained_in=str(out))


def run_folder_job(folder: Path, test: list[str], validation: list[str], threads: int, recipe: dict) -> dict:
    """The evaluation job of `<row>-seed<N>` (tuning rows: `dpo-tune_beta=B_lr=L-seed0`, scored on validation)."""
    name, seed = folder.name.rsplit("-seed", 1)
    row = name.replace("_", " ")
    tune = row.startswith("dpo-tune")
    overrides = [f"dpo.beta={row.split('beta=')[1].split()[0]}", f"train.learning_rate={row.split('lr=')[1]}"] if tune \
        else ROWS.get(row, [])
    return dict(recipe, dir=str(folder), row=row, seed=int(seed), overrides=overrides, threads=threads,
                split="validation" if tune else "test", prompts=validation if tune else test)


def _compute(tr) -> dict:
    rows = dict(forward_rows=tr.unet_rows["forward"], train_rows=tr.unet_rows["train"])
    return dict(rows, forward_equivalents=rows["forward_rows"] + TRAIN_ROW_COST * rows["train_rows"])


def train_no_t_spm(job: dict) -> str:
    """The ablation judge: configs/spm_world.yaml (the shipped world:spm's recipe) without timestep conditioning."""
    import torch

    torch.set_num_threads(job["threads"])
    from spo.config import SPMTrainConfig, load_config
    from spo.preference.train_spm import train_spm

    cfg = load_config(SPMTrainConfig, ROOT / "configs" / "spm_world.yaml", [
        "model.time_conditioned=false", f"log.output_dir={Path(job['work']) / 'spm-no-t'}", "log.report_to=none",
        *job["extra"]])
    return str(train_spm(cfg, log=lambda m: None, overwrite=True))


def _spm_t0(images, prompts, judge: str = "world:spm") -> list[float]:
    """The recipe's step judge on the final images (t = 0): what training optimised, beside the utility."""
    import torch

    from spo.plugins import resolve
    from spo.preference.judges import load_scorer_model

    spm = load_scorer_model(resolve(judge)).eval()
    x = torch.as_tensor(images).permute(0, 3, 1, 2).float() * 2 - 1
    with torch.no_grad():
        return spm(x, prompts, torch.zeros(len(prompts), dtype=torch.long)).tolist()


def base_scores(prompts: list[str], pretrained: str = "world:sd", judge: str = "world:spm") -> dict:
    from spo.generation import generate, load_model
    from spo.scorers import load_scorer

    images = generate(load_model(pretrained), prompts, EVAL_SEED, desc="base")
    return dict(utility=load_scorer("world-utility").score(images, prompts).tolist(),
                spm_t0=_spm_t0(images, prompts, judge))


def recipe_models(recipe: str) -> dict:
    """The recipe file, the model its rows fine-tune and the judge they train with."""
    from spo.config import SPOConfig, load_config

    cfg = load_config(SPOConfig, ROOT / "configs" / recipe, [])
    return dict(recipe=recipe, pretrained=cfg.model.pretrained, judge=cfg.model.spm)


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
                        train_seconds=float(np.mean([r["seconds"] for r in runs])),
                        pairs_per_s=float(np.mean([r["pairs_trained"] / r["seconds"] for r in runs])),
                        peak_rss_mb=float(np.mean([r.get("peak_rss_mb", float("nan")) for r in runs])),
                        forward_equivalents=_mean_final(runs, "forward_equivalents"),
                        curve=_curve(runs, float(np.mean(base["utility"])))))
    return out


def _mean_final(runs: list[dict], key: str) -> float:
    values = [r["snapshots"][-1][key] for r in runs if r.get("snapshots")]
    return float(np.mean(values)) if values else float("nan")


def _curve(runs: list[dict], base_mean: float) -> list[dict]:
    """Mean over seeds of (snapshot mean utility − base mean) at each evaluated epoch, with its compute."""
    epochs = sorted({s["epoch"] for r in runs for s in r.get("snapshots", [])})
    points = []
    for e in epochs:
        snaps = [s for r in runs for s in r.get("snapshots", []) if s["epoch"] == e]
        points.append(dict(epoch=e, seeds=len(snaps), utility_gain=float(np.mean([s["utility"] for s in snaps])) - base_mean,
                           forward_equivalents=float(np.mean([s["forward_equivalents"] for s in snaps])),
                           seconds=float(np.mean([s["seconds"] for s in snaps]))))
    return points


def dpo_tuning(tuned: list[dict], base: dict | None) -> list[dict]:
    """The Diffusion-DPO grid on validation prompts: gain over the base model per (beta, lr), best first."""
    rows = [dict(setting=" ".join(r["overrides"]), validation_gain=float(np.mean(r["utility"]) - np.mean(base["utility"])),
                 pairs_trained=r["pairs_trained"]) for r in tuned]
    return sorted(rows, key=lambda r: -r["validation_gain"])


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


def markdown(summary: list[dict], base: dict, meta: dict, tuning: list[dict] = ()) -> str:
    lines = [f"# World results over {meta['seeds']} seeds per row",
             "", f"configs/{meta.get('recipe', 'world.yaml')} ({meta['epochs']} epochs) with one change per row; "
             f"ground-truth utility on {meta['prompts']} held-out prompts (base {np.mean(base['utility']):.3f}). Gain = mean over seeds of the "
             "paired mean difference to the base model; CI = two-level bootstrap over seeds and prompts.", "",
             "| row | seeds | utility gain | 95% CI (seeds+prompts) | per-seed gains | SPM(t=0) gain | pairs/run | kept "
             "| pairs/s | peak RSS (MB) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary:
        lo, hi = r["utility_gain_ci95"]
        lines.append(f"| {r['row']} | {r['seeds']} | {r['utility_gain']:+.4f} | [{lo:+.4f}, {hi:+.4f}] | "
                     f"{', '.join(f'{g:+.3f}' for g in r['per_seed_gain'])} | {r['spm_t0_gain']:+.3f} | "
                     f"{r['pairs_trained']} | {r['fraction_kept']:.2f} | {r.get('pairs_per_s', float('nan')):.2f} | "
                     f"{r.get('peak_rss_mb', float('nan')):.0f} |")
    curves = [r for r in summary if len(r.get("curve", [])) > 1]
    if curves:
        lines += ["", "## Quality per compute", "",
                  "Mean over seeds of the snapshot's mean utility gain over the base, against UNet compute in "
                  f"forward-equivalents (a row with gradients = {TRAIN_ROW_COST}; machine-independent; seconds are "
                  "wall time of runs sharing one machine, so only roughly comparable).", "",
                  "| row | epoch | forward-equivalents (k) | seconds | utility gain |", "|---|---|---|---|---|"]
        for r in curves:
            lines += [f"| {r['row']} | {c['epoch']} | {c['forward_equivalents'] / 1e3:.0f} | {c['seconds']:.0f} | "
                      f"{c['utility_gain']:+.4f} |" for c in r["curve"]]
    if tuning:
        lines += ["", "## Diffusion-DPO tuning (validation prompts, seed 0, one run per setting)", "",
                  "| setting | validation utility gain | pairs trained |", "|---|---|---|"]
        lines += [f"| `{t['setting']}` | {t['validation_gain']:+.4f} | {t['pairs_trained']} |" for t in tuning]
    lines += ["", f"Command: `{meta['command']}`; machine: {meta['machine']}; {meta['wall_seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows (default: all)")
    p.add_argument("--recipe", default="world.yaml", help="shipped config the rows change (flow world: flow_world.yaml)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--seed-from", type=int, default=0, help="train seeds seed-from .. seeds-1 (split one row over calls)")
    p.add_argument("--epochs", type=int, default=25)
    p.add_argument("--prompts", type=int, default=128)
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--quick", action="store_true", help="seconds-long runs: 2 rows, 2 seeds, 1 epoch, 8 prompts")
    p.add_argument("--every", type=int, default=0, help="also evaluate a snapshot every N epochs (0: final only)")
    p.add_argument("--tune-dpo", action="store_true", help="choose Diffusion-DPO's beta and lr on validation prompts")
    p.add_argument("--dpo-betas", default="500,2000,5000")
    p.add_argument("--dpo-lrs", default="1e-4,5e-4,2e-3")
    p.add_argument("--dpo-beta", type=float, default=0.0, help="without --tune-dpo: beta (0: the config's)")
    p.add_argument("--dpo-lr", type=float, default=5e-4, help="without --tune-dpo, with --dpo-beta: learning rate")
    p.add_argument("--evaluate-runs", type=Path, default=None,
                   help="score the finished run folders under this folder (trained elsewhere) instead of training")
    p.add_argument("--base", type=Path, default=None, help="base-model scores of an earlier call (its _base.json)")
    p.add_argument("--no-t-spm", default="", help="the no-t-conditioning SPM (default: train it first)")
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
    recipe = recipe_models(args.recipe)
    if args.recipe != "world.yaml" and any(r in CONFIGS or r == "no-t-spm" for r in rows):
        raise SystemExit(f"rows {', '.join(CONFIGS)}, no-t-spm have their own configs for the SD world; "
                         f"with --recipe {args.recipe} choose among the others")
    extra = []
    if args.quick:
        rows = rows[:2] if args.rows == ",".join(ROWS) else rows
        args.seeds, args.epochs, args.prompts = 2, 2 if args.every else 1, 8
        extra = ["sample.batch_size=2", "sample.num_steps=6", "sample.divert_start_step=2"]
    from spo.prompts import load_prompts

    prompts = load_prompts("world:test")[: args.prompts]
    validation = load_prompts("world:validation")[: args.prompts]
    t0 = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    name = ("multiseed_quick" if args.quick else "multiseed") + ("" if args.recipe == "world.yaml" else "_" + Path(args.recipe).stem)
    base_file = args.out / f"{name}_base.json"
    base = json.loads(args.base.read_text()) if args.base else base_scores(prompts, recipe["pretrained"], recipe["judge"])
    base_file.write_text(json.dumps(base))  # with the runs .jsonl, enough to summarise a cut-off call (--reuse, --base)
    common = dict(recipe, epochs=args.epochs, work=str(args.work), threads=args.threads)

    def job(row, seed, overrides=None, prompts=prompts, **more):
        extra_row = DPO_QUICK if args.quick and row in CONFIGS else []
        return dict(common, row=row, seed=seed, overrides=ROWS[row] if overrides is None else overrides,
                    every=args.every if row in CURVE_ROWS else 0,
                    config=CONFIGS.get(row, args.recipe), prompts=prompts, extra=extra + extra_row, **more)

    dpo = [f"dpo.beta={args.dpo_beta}", f"train.learning_rate={args.dpo_lr}"] if args.dpo_beta else []
    tune = [(b, lr) for b in args.dpo_betas.split(",") for lr in args.dpo_lrs.split(",")] if args.tune_dpo else []
    jobs = [job(r, s, dpo if r == "diffusion-dpo" else None) for s in range(args.seed_from, args.seeds) for r in rows
            if not (r == "diffusion-dpo" and tune) and not (r == "no-t-spm" and not args.no_t_spm)]
    if args.no_t_spm:
        jobs = [dict(j, overrides=[o.format(no_t_spm=args.no_t_spm) for o in j["overrides"]]) for j in jobs]
    jobs += [dict(job("diffusion-dpo", 0, [f"dpo.beta={b}", f"train.learning_rate={lr}"], validation),
                  row=f"dpo-tune beta={b} lr={lr}", config=CONFIGS["diffusion-dpo"], split="validation")
             for b, lr in tune]
    if "no-t-spm" in rows and not args.no_t_spm:
        jobs.insert(0, dict(common, row="train-no-t-spm", seed=0, extra=SPM_QUICK if args.quick else []))
    if args.evaluate_runs:  # score folders trained elsewhere; nothing is trained
        jobs = [run_folder_job(d, prompts, validation, args.threads, recipe) for d in sorted(args.evaluate_runs.iterdir())
                if (d / "lora").is_dir() and (d / "metrics.jsonl").is_file()]
        tune = [j for j in jobs if j["row"].startswith("dpo-tune")]
    reused = [json.loads(line) for line in args.reuse.read_text().splitlines() if line.strip()] if args.reuse else []
    done = {(r["row"], r["seed"]) for r in reused}
    jobs = [j for j in jobs if (j["row"], j["seed"]) not in done]
    partial = args.out / f"{name}_runs.jsonl"
    partial.write_text("".join(json.dumps(r) + "\n" for r in reused))
    results, tuned = list(reused), [r for r in reused if r["row"].startswith("dpo-tune")]
    failures = []
    # Runs whose settings depend on earlier ones (the tuned Diffusion-DPO, the no-t judge's row) are
    # submitted as soon as what they need has finished; each finished run is written at once.
    # One process per run (max_tasks_per_child=1): each run's peak memory is its own, not its worker's so far.
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=1) as pool:
        work = evaluate_run if args.evaluate_runs else run_one
        pending = {pool.submit(train_no_t_spm if j["row"] == "train-no-t-spm" else work, j): j for j in jobs}
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                j = pending.pop(future)
                try:
                    result = future.result()
                except Exception as exc:  # say so now; the other runs go on and are kept
                    failures.append(f"{j['row']} seed {j['seed']}: {type(exc).__name__}: {exc}")
                    print(f"FAILED {failures[-1]}", flush=True)
                    continue
                if j["row"] == "train-no-t-spm":
                    print(f"trained the no-t SPM: {result}", flush=True)
                    for seed in range(args.seeds):
                        nj = job("no-t-spm", seed, [f"model.spm={result}"])
                        pending[pool.submit(run_one, nj)] = nj
                    continue
                results.append(result)
                with open(partial, "a") as f:
                    f.write(json.dumps(result) + "\n")
                print(f"done {result['row']} seed {result['seed']} in {result['seconds']:.0f} s", flush=True)
                if result["row"].startswith("dpo-tune"):
                    tuned.append(result)
                    if len(tuned) == len(tune) and not args.evaluate_runs:
                        best = max(tuned, key=lambda r: np.mean(r["utility"]))
                        print(f"Diffusion-DPO tuned on validation prompts: {best['overrides']}", flush=True)
                        for seed in range(args.seeds):
                            nj = job("diffusion-dpo", seed, best["overrides"])
                            pending[pool.submit(run_one, nj)] = nj
    tuning = dpo_tuning(tuned, base_scores(validation, recipe["pretrained"], recipe["judge"]) if tuned else None)
    summary = summarise(results, base)
    import platform

    meta = dict(recipe=args.recipe, seeds=args.seeds, epochs=args.epochs, prompts=len(prompts), wall_seconds=time.time() - t0,
                command="python benchmarks/multiseed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                machine=f"{platform.machine()}, {os.cpu_count()} cores, {args.jobs} jobs x {args.threads} threads")
    (args.out / f"{name}.json").write_text(json.dumps(dict(meta=meta, base=base, summary=summary, tuning=tuning,
                                                           runs=results), indent=1))
    text = markdown(summary, base, meta, tuning)
    (args.out / f"{name}.md").write_text(text)
    print(text)
    if failures:
        raise SystemExit(f"{len(failures)} run(s) failed (the table holds the others):\n" + "\n".join(failures))
    return dict(meta=meta, summary=summary)


if __name__ == "__main__":
    main()

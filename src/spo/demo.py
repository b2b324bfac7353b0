"""`spo demo`: SPO on the embedded world, then base vs tuned on held-out prompts, as a report folder.

Everything a reader needs to judge the run without trusting one number: the ground-truth utility
(the world's "humans", never seen by training) with a paired 95% CI and win rate, each utility term
separately, the training-side judges (SPM at t=0 and the world PickScore) before and after, how far
the tuned images moved from the base model's distribution, a side-by-side grid and training curves.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

from spo.evaluation import SPMScorer, clip_image_features, frechet_distance, paired_difference, score_images, write_json
from spo.files import atomic_write_text

EVAL_SEED, REFERENCE_SEED = 10_000, 20_000
DEMO_MARKER = "demo.json"  # OUT was made by `spo demo`, so --overwrite may replace its train/


def run_demo(out: Path, config_path: Path, n_prompts: int = 128, overrides: list[str] | None = None,
             log=print, overwrite: bool = False) -> dict:
    """Train, evaluate and write the report folder `out` (locked for the run: one demo per folder).

    A run already in OUT/train is replaced only when it is an earlier demo's and `overwrite` is given."""
    from spo.runtime import RunLock

    with RunLock(out, option="--out", log=log):
        return _run_demo(Path(out), config_path, n_prompts, overrides, log, overwrite)


def check_demo_output(out: Path, overwrite: bool) -> None:
    """Refuse, before any work, to write over OUT/train unless it is an earlier demo's run and --overwrite
    was given; a folder no demo wrote is never replaced (whatever the flags)."""
    from spo.errors import SPOError

    train = out / "train"
    if not train.is_dir() or not any(train.iterdir()):
        return
    if not _is_demo_output(out):
        raise SPOError(f"{train} holds files that `spo demo` did not write; choose another --out")
    if not overwrite:
        raise SPOError(f"{out} already holds a demo run; pass --overwrite to replace it, or choose another --out")


def _is_demo_output(out: Path) -> bool:
    """OUT carries the demo's marker (or, from before the marker, the report an earlier demo wrote)."""
    report = out / "report.md"
    return (out / DEMO_MARKER).is_file() or (report.is_file() and report.read_text(errors="replace").startswith(
        "# SPO on the embedded world"))


def _run_demo(out: Path, config_path: Path, n_prompts: int, overrides: list[str] | None, log,
              overwrite: bool = False) -> dict:
    from spo.config import load_config
    from spo.config import SPOConfig
    from spo.trainer import Trainer
    from spo.world import open_world

    check_demo_output(out, overwrite)
    world = open_world()
    if not (world / "spm").is_dir():
        from spo.errors import SPOError

        raise SPOError(f"the world at {world} has no step-aware preference model (spm/); train one with "
                       f"`spo train-spm --config configs/spm_world.yaml log.output_dir=...` and copy its spm/ there")
    t0 = time.time()
    cfg = load_config(SPOConfig, config_path, list(overrides or []) + [f"log.output_dir={out / 'train'}"])
    atomic_write_text(out / DEMO_MARKER, '{"written_by": "spo demo"}\n')  # train/ is ours to replace next time
    # The Trainer replaces an old run only once the new one has loaded, and only a folder with its marker.
    lora = Trainer(cfg, overwrite=overwrite, log=log).setup().train()
    if lora is None:
        from spo.errors import SPOError

        raise SPOError(f"training was stopped; nothing to evaluate (continue it with `spo train --config "
                       f"{config_path} log.output_dir={out / 'train'} --resume latest`)")
    train_seconds = time.time() - t0
    log(f"[demo] trained in {train_seconds:.0f}s; evaluating on {n_prompts} held-out prompts")
    report = evaluate_base_vs_tuned(world, lora, out, n_prompts, cfg)
    report["train_seconds"] = round(train_seconds, 1)
    report["training_seeds"] = [cfg.train.seed]  # one training run: a single seed, see benchmarks/ for several
    report["total_seconds"] = round(time.time() - t0, 1)
    shutil.copy(out / "train" / "config.yaml", out / "config.yaml")
    if (out / "train" / "curves.png").exists():
        shutil.copy(out / "train" / "curves.png", out / "training_curves.png")
    write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", render_markdown(report))
    return report


def evaluate_base_vs_tuned(world: Path, lora: Path, out: Path, n_prompts: int, cfg) -> dict:
    from spo.generation import generate, load_model
    from spo.plots import captioned_grid
    from spo.prompts import load_prompts
    from spo.scorers import load_scorer
    from spo.world.utility import TERMS, utility_terms

    prompts = load_prompts("world:test")[:n_prompts]
    sampler = dict(steps=cfg.sample.num_steps, guidance=cfg.sample.guidance_scale, eta=0.0)
    base_pipe = load_model(str(world / "sd"))
    base = generate(base_pipe, prompts, EVAL_SEED, desc="base", **sampler)
    base_ref = generate(base_pipe, prompts, REFERENCE_SEED, desc="base, other seeds", **sampler)
    tuned = generate(load_model(str(world / "sd"), lora), prompts, EVAL_SEED, desc="tuned", **sampler)

    # The utility comes with its terms here, so it is read off them rather than scored a second time.
    terms_b = [utility_terms(i, p) for i, p in zip(base, prompts)]
    terms_t = [utility_terms(i, p) for i, p in zip(tuned, prompts)]
    judges = [load_scorer(f"world-pickscore={world / 'pickscore'}", "cpu"), SPMScorer(world / "spm")]
    judged_b, judged_t = score_images(base, prompts, judges), score_images(tuned, prompts, judges)
    feats = {k: clip_image_features(world / "clip", v) for k, v in (("base", base), ("ref", base_ref), ("tuned", tuned))}

    report = dict(
        prompts=f"world:test (held-out compositions), first {len(prompts)}",
        sampler=dict(sampler, seed=EVAL_SEED, scheduler="DDIM"),
        model=dict(base=str(world / "sd"), lora=str(lora)),
        utility=paired_difference([t["utility"] for t in terms_t], [t["utility"] for t in terms_b]),
        terms={k: dict(before=float(np.mean([t[k] for t in terms_b])), after=float(np.mean([t[k] for t in terms_t])))
               for k in TERMS if k != "utility"},
        world_pickscore=paired_difference(judged_t["world-pickscore"], judged_b["world-pickscore"]),
        spm_t0=paired_difference(judged_t["spm-t0"], judged_b["spm-t0"]),
        distance=dict(
            pixel_rmse_tuned_vs_base_same_seed=float(np.sqrt(((tuned - base) ** 2).mean(axis=(1, 2, 3))).mean()),
            frechet_clip_tuned_vs_base=frechet_distance(feats["tuned"], feats["base"]),
            frechet_clip_base_vs_base_other_seeds=frechet_distance(feats["ref"], feats["base"]),
        ),
    )
    k = min(16, len(prompts))
    images, labels = [], []
    for row in range(0, k, 8):
        for name, imgs, terms in (("base", base, terms_b), ("SPO", tuned, terms_t)):
            for i in range(row, min(row + 8, k)):
                images.append(imgs[i])
                labels.append(f"{name} {terms[i]['utility']:.2f}: {prompts[i]}")
    captioned_grid(images, labels, out / "side_by_side.png", cols=8,
                   title="held-out prompts, same seeds; rows alternate base / SPO; number = true utility")
    return report


def render_markdown(r: dict) -> str:
    u, p, s, d = r["utility"], r["world_pickscore"], r["spm_t0"], r["distance"]

    def row(name, x, fmt=".3f"):
        lo, hi = x["diff_ci95"]
        return (f"| {name} | {x['before']:{fmt}} | {x['after']:{fmt}} | {x['diff']:+{fmt}} [{lo:+{fmt}}, {hi:+{fmt}}] | "
                f"{x['win_rate']:.2f} |")

    lines = [
        "# SPO on the embedded world: base vs tuned", "",
        f"Prompts: {r['prompts']}. Sampler: DDIM {r['sampler']['steps']} steps, CFG {r['sampler']['guidance']}, "
        f"eta {r['sampler']['eta']}, seeds {r['sampler']['seed']}+i (same for both models).", "",
        f"Training: one run, {len(r.get('training_seeds', [0]))} seed (train.seed = "
        f"{', '.join(map(str, r.get('training_seeds', [0])))}); the CIs below are over prompts only, not over "
        "training seeds (benchmarks/multiseed.py measures seed-to-seed variation).", "",
        "| judge | base | SPO | paired diff [95% CI] | win rate |", "|---|---|---|---|---|",
        row("ground-truth utility (held-out judge)", u),
        row("world PickScore", p, ".2f"),
        row("SPM at t=0 (training judge)", s, ".2f"), "",
        "Utility terms (mean over prompts):", "",
        "| term | base | SPO |", "|---|---|---|",
        *[f"| {k} | {v['before']:.3f} | {v['after']:.3f} |" for k, v in r["terms"].items()], "",
        "Distance from the base model's images:", "",
        f"- pixel RMSE, same seed: {d['pixel_rmse_tuned_vs_base_same_seed']:.3f}",
        f"- Fréchet distance on world-CLIP features, SPO vs base: {d['frechet_clip_tuned_vs_base']:.4f} "
        f"(base vs base with other seeds: {d['frechet_clip_base_vs_base_other_seeds']:.4f})", "",
        f"Training time: {r.get('train_seconds', float('nan')):.0f}s; whole demo: {r.get('total_seconds', float('nan')):.0f}s.", "",
        "Files: side_by_side.png, training_curves.png, config.yaml, report.json, train/ (LoRA, checkpoints, logs).",
    ]
    return "\n".join(lines) + "\n"

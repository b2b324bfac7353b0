"""The world's figures: base-model utility on held-out prompts, sample grid, PickScore accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from spo.evaluation import label_accuracy
from spo.files import atomic_write_text
from spo.plots import captioned_grid
from spo.world import prompts, scenes
from spo.world.common import clip_scores
from spo.world.preference_data import decode_pair_tensors, load_split
from spo.world.sampling import sample_images
from spo.world.utility import TERMS, utility_terms

EVAL_STEPS, EVAL_GUIDANCE, EVAL_ETA = 20, 5.0, 0.0  # the paper's evaluation sampler (DDIM 20, CFG 5)


def mean_ci(values) -> dict[str, float]:
    """Mean, standard deviation and a normal-approximation 95% confidence interval of the mean."""
    v = np.asarray(values, float)
    half = 1.96 * v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else float("nan")
    return dict(mean=float(v.mean()), std=float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                ci95=[float(v.mean() - half), float(v.mean() + half)], n=int(len(v)))


def base_model_figures(world: Path, n_prompts: int, seed: int) -> dict:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(world / "sd")
    pipe.set_progress_bar_config(disable=True)
    test = prompts.split_prompts(seed)["test"][:n_prompts]
    steps = EVAL_STEPS
    images = sample_images(pipe, test, EVAL_GUIDANCE, steps, EVAL_ETA, seed=seed, desc="held-out samples")
    terms = [utility_terms(img, cap) for img, cap in zip(images, test)]
    captioned_grid(images[:48], test[:48], world / "report" / "base_samples.png", cols=8,
                   title=f"world SD, held-out prompts, DDIM {steps} steps, CFG {EVAL_GUIDANCE:g}, seeds {seed}+i")
    clean = [scenes.render(scenes.layout(scenes.parse_caption(c), np.random.default_rng(i))) for i, c in enumerate(test[:48])]
    captioned_grid(clean, test[:48], world / "report" / "clean_renders.png", cols=8,
                   title="clean renders of the same captions (utility = 1)")
    return dict(
        sampler=dict(steps=steps, guidance=EVAL_GUIDANCE, eta=EVAL_ETA, seed=seed, prompts="test split"),
        utility=mean_ci([t["utility"] for t in terms]),
        terms={k: float(np.mean([t[k] for t in terms])) for k in TERMS},
    )


def pickscore_figures(world: Path) -> dict:
    from transformers import CLIPModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(world / "tokenizer")
    rows = load_split(world / "preference", "test")
    img0, img1 = decode_pair_tensors(rows)
    caps = list(rows["caption"])
    labels = np.asarray(rows["label_0"])
    out = dict(n_pairs=len(caps), ties=float((labels == 0.5).mean()),
               ceiling_true_utility=label_accuracy(rows["utility_0"], rows["utility_1"], labels))
    for name in ("clip", "pickscore"):
        model = CLIPModel.from_pretrained(world / name).eval()
        out[f"accuracy_{name}"] = label_accuracy(clip_scores(model, tokenizer, caps, img0),
                                                 clip_scores(model, tokenizer, caps, img1), labels)
    return out


def world_report(world: Path, cfg) -> dict:
    world = Path(world)
    (world / "report").mkdir(exist_ok=True)
    figures = dict(base_model=base_model_figures(world, 8 if cfg.tiny else 200, cfg.seed),
                   pickscore=pickscore_figures(world))
    figures["sizes_mb"] = {p.name: round(sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 2**20, 2)
                           for p in sorted(world.iterdir()) if p.is_dir()}
    atomic_write_text(world / "report" / "figures.json", json.dumps(figures, indent=2))
    return figures

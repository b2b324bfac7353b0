"""Sampling the world's diffusion model: images for captions, and `spo world sample` (images, a grid,
their ground-truth utility)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from spo.world import scenes


def sample_images(pipe, captions: list[str], guidance: float, steps: int, eta: float, seed: int,
                  batch: int = 64, desc: str = "sample") -> np.ndarray:
    """Images for the world's captions (see `spo.generation.generate`)."""
    from spo.generation import generate

    if not captions:
        return np.zeros((0, scenes.IMAGE_SIZE, scenes.IMAGE_SIZE, 3), np.float32)
    return generate(pipe, captions, seed, steps, guidance, eta, batch=batch, desc=desc)


def sample_and_score(world: Path, captions: list[str], num: int, steps: int, guidance: float, seed: int,
                     out: Path) -> tuple[dict, Path]:
    """Sample `captions` (default: the first `num` test prompts) with DDIM eta 0 from the world at `world`;
    write out/samples.png (captioned with the true utility) and out/summary.json; return (summary, grid)."""
    from spo.errors import SPOError
    from spo.files import atomic_write_text
    from spo.plots import captioned_grid
    from spo.world import load_pipeline
    from spo.world.prompts import split_prompts
    from spo.world.utility import utility_terms

    if bad := scenes.outside_grammar(captions):
        raise SPOError(f"prompt outside the world's grammar: {bad[0]!r} (e.g. 'a large red circle on the left', "
                       "'a blue square above a yellow triangle')")
    captions = captions or split_prompts(0)["test"][:num]
    images = sample_images(load_pipeline(world), captions, guidance, steps, 0.0, seed)
    terms = [utility_terms(img, cap) for img, cap in zip(images, captions)]
    grid = captioned_grid(images, [f"{t['utility']:.2f} {c}" for t, c in zip(terms, captions)], out / "samples.png",
                          title=f"DDIM {steps} steps, CFG {guidance:g}, seed {seed}; number = true utility")
    u = np.array([t["utility"] for t in terms])
    summary = dict(n=len(u), utility_mean=float(u.mean()), utility_std=float(u.std()), steps=steps,
                   guidance=guidance, seed=seed, world=str(world),
                   terms={k: float(np.mean([t[k] for t in terms])) for k in terms[0]})
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    return summary, grid

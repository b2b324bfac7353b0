"""Prompt splits of the world: train / validation for preference data and post-training, and a
held-out test split made of compositions that never appear in the other two.

The base diffusion model saw the whole grammar during pre-training, as Stable Diffusion saw the
web; the preference stages (SPM, SPO, Diffusion-DPO) never see a test composition.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from spo.files import atomic_write_text
from spo.world import scenes

# (colour, shape) pairs reserved for the test split: any caption that names one is held out.
HELD_OUT = (("purple", "triangle"), ("orange", "circle"), ("green", "diamond"), ("yellow", "square"))
SPLITS = ("train", "validation", "test")


def is_held_out(spec: scenes.Spec) -> bool:
    return any(obj in HELD_OUT for obj in spec.objects)


def split_prompts(seed: int = 0, validation_fraction: float = 0.1) -> dict[str, list[str]]:
    rng = np.random.default_rng(seed)
    specs = scenes.all_specs()
    test = [scenes.caption_of(s) for s in specs if is_held_out(s)]
    rest = [scenes.caption_of(s) for s in specs if not is_held_out(s)]
    rng.shuffle(rest)
    rng.shuffle(test)
    n_val = int(len(rest) * validation_fraction)
    return {"train": rest[n_val:], "validation": rest[:n_val], "test": test}


def write_prompt_files(splits: dict[str, list[str]], directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, captions in splits.items():
        atomic_write_text(directory / f"{name}.txt", "\n".join(captions) + "\n")

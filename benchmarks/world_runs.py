"""Shared by the embedded-world benchmarks: training runs with compute-stamped snapshots, and their evaluation.

Compute is counted two ways. Wall time on this machine (training only: sampling + optimisation,
snapshots and evaluation excluded). And, machine-independent, UNet rows: every image the UNet
evaluated, without gradients (sampling, scoring through x0-predictions, the reference) or with
gradients (the policy in training). A row with gradients costs about three rows without (forward +
backward ≈ 3 forwards), so compute in forward-equivalents is `forward_rows + 3 * train_rows`.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

TRAIN_ROW_COST = 3  # forward + backward, in forwards
EVAL_SEED, DIVERSITY_SEED = 10_000, 30_000


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return dict(cpu=cpu, threads=torch.get_num_threads(), torch=torch.__version__,
                cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)


def forward_equivalents(snapshot: dict) -> int:
    return snapshot["forward_rows"] + TRAIN_ROW_COST * snapshot["train_rows"]


def train_with_snapshots(config: str, overrides: list[str], out: Path, every: int, log=print) -> list[dict]:
    """Train, saving the LoRA every `every` epochs (and at the end) with the compute spent so far."""
    from spo.config import load_config
    from spo.files import atomic_write_text
    from spo.trainer import SPOConfig, SPOTrainer, save_lora

    cfg = load_config(SPOConfig, config, list(overrides) + [f"log.output_dir={out}", "log.report_to=none"])
    trainer = SPOTrainer(cfg, overwrite=True, log=log).setup()
    snaps = [dict(epoch=0, lora=None, seconds=0.0, forward_rows=0, train_rows=0)]
    clock = {"start": time.time(), "excluded": 0.0}

    def snapshot(tr) -> None:
        if tr.epoch % every and tr.epoch != cfg.train.num_epochs:
            return
        t0 = time.time()
        where = out / "snapshots" / f"epoch-{tr.epoch}"
        save_lora(tr.acc.unwrap_model(tr.unet), where, cfg.model.lora_rank, cfg.model.lora_alpha)
        snaps.append(dict(epoch=tr.epoch, lora=str(where), seconds=t0 - clock["start"] - clock["excluded"],
                          forward_rows=tr.unet_rows["forward"], train_rows=tr.unet_rows["train"]))
        clock["excluded"] += time.time() - t0

    trainer.train(on_epoch_end=snapshot)
    atomic_write_text(out / "snapshots.json", json.dumps(snaps, indent=2))
    return snaps


def evaluate_lora(world: Path, lora: str | None, prompts: list[str], steps: int = 20, guidance: float = 5.0,
                  diversity_prompts: int = 16, diversity_seeds: int = 4) -> dict:
    """Per-prompt ground-truth utility, world PickScore and SPM(t=0) on held-out prompts, and diversity.

    Diversity: mean pairwise cosine distance between world-CLIP image features of `diversity_seeds`
    images of the same prompt; a policy that collapses onto one picture per prompt drives it to 0.
    """
    from spo.evaluation import SPMScorer, clip_image_features, score_images
    from spo.generation import generate, load_model
    from spo.scorers import load_scorer

    pipe = load_model(str(world / "sd"), lora)
    images = generate(pipe, prompts, EVAL_SEED, steps, guidance, 0.0, desc="eval")
    judges = [load_scorer("world-utility"), load_scorer(f"world-pickscore={world / 'pickscore'}"),
              SPMScorer(world / "spm")]
    scores = score_images(images, prompts, judges)
    repeated = [p for p in prompts[:diversity_prompts] for _ in range(diversity_seeds)]
    variants = generate(pipe, repeated, DIVERSITY_SEED, steps, guidance, 0.0, desc="diversity")
    feats = clip_image_features(world / "clip", variants).reshape(len(repeated) // diversity_seeds, diversity_seeds, -1)
    cos = np.einsum("psf,pqf->psq", feats, feats)
    off = ~np.eye(diversity_seeds, dtype=bool)
    return dict(utility=scores["world-utility"].tolist(), pickscore=scores["world-pickscore"].tolist(),
                spm_t0=scores["spm-t0"].tolist(), diversity=float((1 - cos[:, off]).mean()), images=images[:16])


def summary_row(name: str, snap: dict, scores: dict, base: dict) -> dict:
    from spo.evaluation import paired_difference

    gain = paired_difference(scores["utility"], base["utility"])
    std = {k: float(np.std(base[k], ddof=1)) for k in ("utility", "pickscore", "spm_t0")}
    return dict(
        run=name, epoch=snap["epoch"], seconds=round(snap["seconds"], 1), forward_equivalents=forward_equivalents(snap),
        forward_rows=snap["forward_rows"], train_rows=snap["train_rows"],
        utility=float(np.mean(scores["utility"])), utility_gain=gain["diff"], utility_gain_ci95=gain["diff_ci95"],
        win_rate=gain["win_rate"], pickscore=float(np.mean(scores["pickscore"])), spm_t0=float(np.mean(scores["spm_t0"])),
        diversity=scores["diversity"],
        # gains in units of the base model's spread over prompts, so judges on different scales compare
        effect_utility=gain["diff"] / std["utility"],
        effect_pickscore=(np.mean(scores["pickscore"]) - np.mean(base["pickscore"])) / std["pickscore"],
        effect_spm=(np.mean(scores["spm_t0"]) - np.mean(base["spm_t0"])) / std["spm_t0"],
    )


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> list[str]:
    """columns: (header, key, format)."""
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = []
        for _, key, fmt in columns:
            v = r[key]
            cells.append(f"[{v[0]:{fmt}}, {v[1]:{fmt}}]" if isinstance(v, (list, tuple)) else
                         (f"{v:{fmt}}" if fmt else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    return lines

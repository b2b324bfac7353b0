"""Comparing models image for image: paired statistics, win rates, distribution distances, reports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np



def paired_difference(after, before, n_boot: int = 2000, seed: int = 0) -> dict:
    """Mean of (after - before) over prompts with a bootstrap 95% CI, and the win rate (ties count half)."""
    a, b = np.asarray(after, float), np.asarray(before, float)
    d = a - b
    rng = np.random.default_rng(seed)
    boots = d[rng.integers(0, len(d), (n_boot, len(d)))].mean(1)
    wins = (d > 1e-9).mean() + 0.5 * (np.abs(d) <= 1e-9).mean()
    win_boot = ((d[rng.integers(0, len(d), (n_boot, len(d)))] > 1e-9).mean(1)
                + 0.5 * (np.abs(d[rng.integers(0, len(d), (n_boot, len(d)))]) <= 1e-9).mean(1))
    return dict(before=float(b.mean()), after=float(a.mean()), diff=float(d.mean()),
                diff_ci95=[float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))],
                win_rate=float(wins), win_rate_ci95=[float(np.percentile(win_boot, 2.5)), float(np.percentile(win_boot, 97.5))],
                n=int(len(d)))


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (FID's formula, any features)."""
    from scipy import linalg

    mu_a, mu_b = feats_a.mean(0), feats_b.mean(0)
    cov_a, cov_b = np.cov(feats_a, rowvar=False), np.cov(feats_b, rowvar=False)
    covmean, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


def clip_image_features(clip_dir: str | Path, images: np.ndarray) -> np.ndarray:
    """Normalised CLIP image embeddings of HxWx3 [0, 1] images (the world's CLIP by default)."""
    import torch
    from transformers import CLIPModel

    from spo.world.build import image_features

    model = CLIPModel.from_pretrained(clip_dir).eval()
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() * 2 - 1
    with torch.no_grad():
        return torch.cat([image_features(model, x[i : i + 256]) for i in range(0, len(x), 256)]).numpy()


def write_json(path: Path, data: dict) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)
    return path

"""Pairwise preference data in the Pick-a-Pic schema: loading from anywhere, and robust decoding.

A source may be a hub id (`yuvalkirstain/pickapic_v1`), a `save_to_disk` directory, a directory of
parquet files (split names in the file names), or one parquet file. Rows that cannot be used
(undecodable images, no label) are skipped and counted; odd inputs (grayscale, RGBA, any size,
empty or very long captions) are converted and counted. `DataReport` says what happened.
"""

from __future__ import annotations

import io
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from spo.errors import SPOError

REQUIRED_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")


def load_preference_dataset(source: str | Path, split: str = "train"):
    import datasets

    path = Path(source)
    try:
        if path.is_file() and path.suffix == ".parquet":
            ds = datasets.Dataset.from_parquet(str(path))
        elif path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = _pick_split(ds, split, source)
        elif path.is_dir():
            ds = _pick_split(datasets.load_dataset(str(path)), split, source)
        elif path.exists():
            raise SPOError(f"{source} is neither a parquet file nor a dataset directory")
        else:
            ds = datasets.load_dataset(str(source), split=split)
    except SPOError:
        raise
    except Exception as exc:  # datasets raises many types for missing/corrupt data
        raise SPOError(f"could not load preference data from {source!r} ({type(exc).__name__}: "
                       f"{str(exc).splitlines()[0][:200]})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in ds.column_names]
    if missing:
        raise SPOError(f"preference data {source!r} lacks column(s) {', '.join(missing)}; expected the Pick-a-Pic "
                       f"schema ({', '.join(REQUIRED_COLUMNS)})")
    return ds


def _pick_split(dsd, split: str, source):
    if split not in dsd:
        raise SPOError(f"{source} has no split {split!r}; available: {', '.join(dsd)}")
    return dsd[split]


@dataclass
class DataReport:
    """What the loader did with the rows it saw."""

    counts: Counter = field(default_factory=Counter)

    def summary(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))


def prompt_weights(captions: list[str]) -> np.ndarray:
    """PickScore-style per-prompt weighting: each prompt contributes equally, however many pairs it has."""
    counts = Counter(captions)
    w = np.array([1.0 / counts[c] for c in captions])
    return w * len(w) / w.sum()


def _decode(data, report: DataReport, resolution: int) -> torch.Tensor | None:
    try:
        if isinstance(data, dict):  # datasets' Image feature stores {"bytes": ..., "path": ...}
            data = data.get("bytes")
        image = data if isinstance(data, Image.Image) else Image.open(io.BytesIO(data))
        image.load()
    except Exception:
        report.counts["skipped: undecodable image"] += 1
        return None
    if image.mode != "RGB":
        report.counts[f"converted: {image.mode} image to RGB"] += 1
        image = image.convert("RGB")
    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(127.5).sub(1)
    h, w = x.shape[-2:]
    if (h, w) != (resolution, resolution):
        report.counts["resized: image not at model resolution"] += 1
        scale = resolution / min(h, w)
        nh, nw = max(resolution, round(h * scale)), max(resolution, round(w * scale))
        x = F.interpolate(x[None], size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)[0].clamp(-1, 1)
        top, left = (nh - resolution) // 2, (nw - resolution) // 2
        x = x[:, top : top + resolution, left : left + resolution]
    return x


def _label(row, report: DataReport) -> tuple[float, float] | None:
    try:
        l0, l1 = float(row["label_0"]), float(row["label_1"])
    except (TypeError, ValueError):
        report.counts["skipped: no label"] += 1
        return None
    if math.isnan(l0) or math.isnan(l1) or l0 < 0 or l1 < 0 or not math.isclose(l0 + l1, 1.0, abs_tol=1e-6):
        report.counts["skipped: no label"] += 1
        return None
    if l0 == l1:
        report.counts["tie (0.5/0.5 target)"] += 1
    return l0, l1


class PairCollator:
    """Turns rows into a batch: images in [-1, 1] at `resolution`, captions, soft labels, weights."""

    def __init__(self, resolution: int, max_words: int = 60):
        self.resolution, self.max_words, self.report = resolution, max_words, DataReport()

    def __call__(self, rows: list[dict]) -> dict | None:
        keep = []
        for row in rows:
            self.report.counts["rows seen"] += 1
            label = _label(row, self.report)
            if label is None:
                continue
            img0 = _decode(row["jpg_0"], self.report, self.resolution)
            img1 = _decode(row["jpg_1"], self.report, self.resolution)
            if img0 is None or img1 is None:
                continue
            caption = row.get("caption") or ""
            if not caption.strip():
                self.report.counts["empty caption (kept, unconditional)"] += 1
            elif len(caption.split()) > self.max_words:
                self.report.counts["long caption (truncated by the tokenizer)"] += 1
            keep.append((img0, img1, caption, label, float(row.get("weight", 1.0))))
        self.report.counts["pairs used"] += len(keep)
        if not keep:
            return None
        img0, img1, captions, labels, weights = zip(*keep)
        return dict(img0=torch.stack(img0), img1=torch.stack(img1), captions=list(captions),
                    labels=torch.tensor(labels, dtype=torch.float32), weights=torch.tensor(weights, dtype=torch.float32))

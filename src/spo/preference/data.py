"""Pairwise preference data in the Pick-a-Pic schema: loading from anywhere, and robust decoding.

A source may be a hub id (`yuvalkirstain/pickapic_v1`), a `save_to_disk` directory, a directory of
parquet files (split names in the file names), or one parquet file. Rows that cannot be used
(undecodable images, no label) are skipped and counted; odd inputs (grayscale, RGBA, any size,
empty or very long captions) are converted and counted. `DataReport` says what happened.
"""

from __future__ import annotations

import base64
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
    """What the loader did with the rows it saw.

    A row that carries its dataset index (a `_row` column, as train-spm adds) counts once per category
    however often it is drawn (every epoch, and again after a resume); a row without one counts per draw.
    """

    counts: Counter = field(default_factory=Counter)  # per draw, rows without an index
    rows: dict[str, np.ndarray] = field(default_factory=dict)  # category -> one flag per dataset row

    def add(self, row: int | None, happened: Counter) -> None:
        """Record what happened to one drawn row (`happened`: its categories)."""
        if row is None:
            self.counts.update(happened)
            return
        for category in happened:
            flags = self.rows.get(category, np.zeros(0, bool))
            if row >= len(flags):  # grown by doubling: the dataset's size need not be known
                flags = np.concatenate([flags, np.zeros(max(row + 1 - len(flags), len(flags)), bool)])
                self.rows[category] = flags
            flags[row] = True

    def summary(self) -> dict[str, int]:
        total = Counter(self.counts)
        total.update({k: int(v.sum()) for k, v in self.rows.items()})
        return dict(sorted(total.items()))

    def state(self) -> dict:
        """JSON-able, for a checkpoint (a resumed run goes on counting) or for gathering across processes."""
        return dict(counts=dict(self.counts), rows={k: [len(v), base64.b64encode(np.packbits(v)).decode()]
                                                    for k, v in self.rows.items()})

    def merge(self, state: dict) -> None:
        """Add in another report's `state()`: per-draw counts add up, row flags are or-ed."""
        self.counts.update(state.get("counts", {}))
        for category, (n, packed) in state.get("rows", {}).items():
            other = np.unpackbits(np.frombuffer(base64.b64decode(packed), np.uint8), count=n).astype(bool)
            mine = self.rows.get(category, np.zeros(0, bool))
            size = max(len(mine), len(other))
            merged = np.zeros(size, bool)
            merged[: len(mine)] |= mine
            merged[: len(other)] |= other
            self.rows[category] = merged


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
            notes = DataReport()  # what happens to this row, recorded once per row below
            item = self._item(row, notes)
            if item is not None:
                keep.append(item)
                notes.counts["pairs used"] += 1
            notes.counts["rows seen"] += 1
            self.report.add(row.get("_row"), notes.counts)
        if not keep:
            return None
        img0, img1, captions, labels, weights = zip(*keep)
        return dict(img0=torch.stack(img0), img1=torch.stack(img1), captions=list(captions),
                    labels=torch.tensor(labels, dtype=torch.float32), weights=torch.tensor(weights, dtype=torch.float32))

    def _item(self, row: dict, notes: DataReport) -> tuple | None:
        """One row as (img0, img1, caption, label, weight), or None when it cannot be used (noted why)."""
        label = _label(row, notes)
        if label is None:
            return None
        img0 = _decode(row["jpg_0"], notes, self.resolution)
        img1 = _decode(row["jpg_1"], notes, self.resolution)
        if img0 is None or img1 is None:
            return None
        caption = row.get("caption") or ""
        if not caption.strip():
            notes.counts["empty caption (kept, unconditional)"] += 1
        elif len(caption.split()) > self.max_words:
            notes.counts["long caption (truncated by the tokenizer)"] += 1
        return img0, img1, caption, label, float(row.get("weight", 1.0))

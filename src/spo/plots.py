"""Pictures people would rather look at than read: captioned image grids."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def captioned_grid(images, captions: list[str], path: str | Path, cols: int = 8, cell: int = 128,
                   title: str | None = None) -> Path:
    """Save images (HxWx3 floats in [0, 1] or uint8) upscaled to `cell` px, each with its caption below."""
    font = ImageFont.load_default()
    rows = max(1, -(-len(images) // cols))
    text_h, title_h = 30, (20 if title else 0)
    canvas = Image.new("RGB", (cols * cell, title_h + rows * (cell + text_h)), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 4), title, fill="black", font=font)
    for i, (img, cap) in enumerate(zip(images, captions)):
        arr = np.asarray(img)
        if arr.dtype != np.uint8:
            arr = (np.clip(arr, 0, 1) * 255 + 0.5).astype(np.uint8)
        tile = Image.fromarray(arr).resize((cell, cell), Image.NEAREST)
        x, y = (i % cols) * cell, title_h + (i // cols) * (cell + text_h)
        canvas.paste(tile, (x, y))
        lines = textwrap.wrap(cap, width=cell // 6)[:2]
        draw.text((x + 2, y + cell + 1), "\n".join(lines), fill="black", font=font, spacing=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    canvas.save(tmp)
    tmp.replace(path)
    return path


def training_curves(metrics_jsonl: str | Path, path: str | Path,
                    keys=("loss", "reward_accuracy", "fraction_kept", "spm_score", "ratio_win", "pairs_per_s")) -> Path | None:
    """One small panel per metric against epoch, from a trainer's metrics.jsonl."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics_jsonl = Path(metrics_jsonl)
    if not metrics_jsonl.exists():
        return None
    rows = [json.loads(line) for line in metrics_jsonl.read_text().splitlines() if line.strip()]
    keys = [k for k in keys if any(k in r for r in rows)]
    if not rows or not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        xs = [r["epoch"] for r in rows if key in r]
        ax.plot(xs, [r[key] for r in rows if key in r], marker=".")
        ax.set_title(key, fontsize=9)
        readable_axes(ax, "epoch", key)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def readable_axes(ax, xlabel: str, ylabel: str) -> None:
    """Axis labels and plain tick values: matplotlib would print 0.99999..1.00001 as an offset plus
    1e-5 multiples ("1e-5+9.999e-1"), which nobody reads at a glance; epochs get whole-number ticks."""
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.ticklabel_format(axis="both", style="plain", useOffset=False)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.tick_params(labelsize=7)

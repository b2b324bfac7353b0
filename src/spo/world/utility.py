"""The embedded world's ground-truth preference: `utility(image, caption) -> float in [0, 1]`.

It is computed from pixels and the caption only, by analysis-by-synthesis: for every object the
caption asks for, fit the asked-for shape (centre and size) to the pixels of the asked-for colour,
then judge the fit, and compare the whole picture with a clean render of the fitted scene.

    utility = alignment * (0.4 + 0.6 * quality)

alignment (does the picture show what the caption says?) is the mean over requested objects of
    colour × (0.3 + 0.7 shape) × size × position × in_frame, with
    colour    the object's mean colour is clearly nearer the named colour than any other palette colour
    shape     soft IoU of the colour mask with the named shape, and its margin over the other shapes
    size      the fitted size lies in the range the size word asks for ("small", none, "large")
    position  the object's centre lies in the box the position phrase asks for
    in_frame  the object is not cut by the border
times (0.3 + 0.7 relation) for two-object captions (the first object is above/below/left/right of
the second).

quality (is it a good picture?) is a geometric mean of
    fidelity    closeness to a clean render of the fitted scene: noise, blur, clutter, gradients,
                high-frequency texture and over-saturation all move pixels away from it
    background  the background is a calm, unsaturated colour
    contrast    the objects stand out from the background

Every term is bounded to [0, 1] and flat at its best value, so a clean render of the caption scores
exactly 1 and no perturbation of it can score higher. Gating quality by alignment means a blank or
off-topic picture scores near 0 however clean it is.
"""

from __future__ import annotations

import numpy as np

from spo.world import scenes
from spo.world.scenes import COLORS, EXTENT, IMAGE_SIZE, SHAPES, Spec

EDGE_SOFTNESS = 0.15  # colour-distance margin over which a pixel goes from background to object
COLOR_SLACK = 0.5  # absolute RGB distance beyond which a pixel can never count as the named colour
_SIZE_GRID = np.arange(2.5, 13.01, 0.25)
_SS = 2  # supersampling used for fitting (rendering uses 4; the fit is tolerant of the difference)
_FGX, _FGY = scenes._grid(IMAGE_SIZE, _SS)

TERMS = ("colour", "shape", "size", "position", "in_frame", "relation", "alignment",
         "fidelity", "background", "contrast", "quality", "utility")


def _membership(img: np.ndarray, color: str, bg: np.ndarray) -> np.ndarray:
    """How much each pixel looks like the named colour rather than the background or another
    palette colour, in [0, 1].

    Relative, so a faded or tinted picture still shows its shapes; the absolute cap stops an image
    of one flat colour from counting as an object everywhere.
    """
    d_obj = np.linalg.norm(img - np.asarray(COLORS[color]), axis=-1)
    rivals = [bg] + [np.asarray(rgb) for name, rgb in COLORS.items() if name != color]
    d_bg = np.min([np.linalg.norm(img - r, axis=-1) for r in rivals], axis=0)
    relative = np.clip(0.5 + (d_bg - d_obj) / (2 * EDGE_SOFTNESS), 0, 1)
    absolute = np.clip(1 - d_obj / COLOR_SLACK, 0, 1) ** 0.5
    return relative * absolute


def _template_membership(alpha: np.ndarray, contrast: float) -> np.ndarray:
    """The membership a clean render with coverage `alpha` would give (zero outside the shape)."""
    return np.clip(0.5 + (2 * alpha - 1) * contrast / (2 * EDGE_SOFTNESS), 0, 1) * (alpha > 0)


def _flat_then_linear(excess: float, width: float) -> float:
    """1 while `excess` <= 0, falling linearly to 0 at `excess` == width."""
    return float(np.clip(1 - max(excess, 0.0) / width, 0, 1))


def _estimate_background(img: np.ndarray, palette: list[np.ndarray]) -> np.ndarray:
    """Median colour of the pixels that are not near any of the requested colours."""
    near = np.zeros(img.shape[:2], bool)
    for color in palette:
        near |= np.linalg.norm(img - color, axis=-1) < 0.3
    pixels = img[~near] if (~near).sum() >= 16 else img.reshape(-1, 3)
    return np.median(pixels, axis=0)


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    order = np.argsort(values)
    cum = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cum, cum[-1] / 2)])


def _robust_centre(mu: np.ndarray, window: float = 10.0) -> tuple[float, float]:
    """Mass centre of the membership near its weighted median: stray mass elsewhere (edges of other
    objects, clutter) does not drag the fitted shape off its object."""
    ys, xs = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] + 0.5
    w = mu.ravel()
    x0, y0 = _weighted_median(xs.ravel(), w), _weighted_median(ys.ravel(), w)
    near = mu * ((np.abs(xs - x0) <= window) & (np.abs(ys - y0) <= window))
    mass = near.sum()
    return float((near * xs).sum() / mass), float((near * ys).sum() / mass)


def _fit_shape(mu: np.ndarray, shape: str, contrast: float) -> tuple[float, float, float, float]:
    """Best (soft IoU, cx, cy, size) of `shape` against membership `mu`, searching sizes on a grid.

    The centre comes from the membership's mass centre; the template is what a clean render of the
    shape would give at the observed object/background contrast.
    """
    mass = mu.sum()
    if mass < 1e-6:
        return 0.0, IMAGE_SIZE / 2, IMAGE_SIZE / 2, float(_SIZE_GRID[0])
    mx, my = _robust_centre(mu)
    best = (-1.0, mx, my, float(_SIZE_GRID[0]))
    for size in _SIZE_GRID:
        # An up-pointing triangle's mass centre sits a third of its half-height below its box centre.
        cy = my - (EXTENT[shape] * size / 3 if shape == "triangle" else 0.0)
        iou = _soft_iou(mu, shape, mx, cy, size, contrast)
        if iou > best[0]:
            best = (float(iou), float(mx), float(cy), float(size))
    return best


def _soft_iou(mu: np.ndarray, shape: str, cx: float, cy: float, size: float, contrast: float) -> float:
    template = _template_membership(scenes.shape_mask(shape, cx, cy, size, _FGX, _FGY), contrast)
    return float(np.minimum(mu, template).sum() / max(np.maximum(mu, template).sum(), 1e-6))


def _refine(mu, shape, contrast, fit):
    """Local search around a grid fit, so that a clean render is matched to a fraction of a pixel."""
    best = fit
    for dx in (-0.3, 0.0, 0.3):
        for dy in (-0.3, 0.0, 0.3):
            for ds in (-0.125, 0.0, 0.125):
                cx, cy, size = fit[1] + dx, fit[2] + dy, fit[3] + ds
                iou = _soft_iou(mu, shape, cx, cy, size, contrast)
                if iou > best[0]:
                    best = (iou, cx, cy, size)
    return best


def _colour_identity(pixels: np.ndarray, color: str) -> float:
    """1 when the object's mean colour is clearly nearer the named colour than any other palette colour."""
    if len(pixels) == 0:
        return 0.0
    mean = pixels.mean(axis=0)
    d = {name: float(np.linalg.norm(mean - np.asarray(rgb))) for name, rgb in COLORS.items()}
    nearest_other = min(v for k, v in d.items() if k != color)
    return float(np.clip((nearest_other - d[color]) / 0.15, 0, 1))


def _object_terms(img, mu, color, shape, bg, size_range, position, placed_by_relation):
    contrast = float(np.linalg.norm(np.asarray(COLORS[color]) - bg))
    fits = {s: _fit_shape(mu, s, contrast) for s in SHAPES}
    iou, cx, cy, size = fits[shape] = _refine(mu, shape, contrast, fits[shape])
    other = max(fits[s][0] for s in SHAPES if s != shape)
    alpha = scenes.shape_mask(shape, cx, cy, size, _FGX, _FGY)
    colour = _colour_identity(img[alpha > 0.95], color) if mu.sum() > 1 else 0.0
    # Full credit when the named shape fits best; falling off as another shape fits clearly better
    # (small shapes on a 32 px canvas are hard to tell apart, so a near-tie is not punished).
    shape_score = _flat_then_linear(0.85 - iou, 0.45) * _flat_then_linear(other - iou, 0.2)
    lo, hi = size_range
    size_score = _flat_then_linear(max(lo - size, size - hi), 4.0)
    extent = EXTENT[shape] * size
    x0, x1, y0, y1 = scenes.position_box(position, extent + 0.5)
    off = max(x0 - cx, cx - x1, 0) + max(y0 - cy, cy - y1, 0)
    # In two-object captions the relation, not an absolute position, says where things go.
    position_score = 1.0 if placed_by_relation else _flat_then_linear(off - 0.5, 4.0)
    overflow = max(extent - cx, extent - cy, cx + extent - IMAGE_SIZE, cy + extent - IMAGE_SIZE, 0)
    in_frame = _flat_then_linear(overflow, 3.0)
    return dict(colour=colour, shape=shape_score, size=size_score, position=position_score,
                in_frame=in_frame, cx=cx, cy=cy, size_px=size)


def _relation_score(relation: str, a: dict, b: dict) -> float:
    dx, dy = b["cx"] - a["cx"], b["cy"] - a["cy"]
    along, across = {
        "above": (dy, dx), "below": (-dy, dx), "to the left of": (dx, dy), "to the right of": (-dx, dy),
    }[relation]
    return _flat_then_linear(9.0 - along, 5.0) * _flat_then_linear(abs(across) - 4.0, 4.0)


def _clean_render(spec: Spec, fitted: list[dict], bg: np.ndarray) -> np.ndarray:
    objs = tuple(
        scenes.Obj(shape, color, f["cx"], f["cy"], f["size_px"])
        for (color, shape), f in zip(spec.objects, fitted)
    )
    return scenes.render(scenes.Scene(objs, tuple(float(v) for v in bg)))


def _fidelity_rmse(img: np.ndarray, spec: Spec, fitted: list[dict], bg: np.ndarray) -> float:
    """RMSE to the closest clean render near the fit (coordinate descent on centre and size)."""
    fitted = [dict(f) for f in fitted]

    def rmse() -> float:
        return float(np.sqrt(((img - _clean_render(spec, fitted, bg)) ** 2).mean()))

    best = rmse()
    for step in (0.4, 0.2, 0.1, 0.05):
        for f in fitted:
            for key in ("cx", "cy", "size_px"):
                for sign in (1, -1):
                    f[key] += sign * step
                    trial = rmse()
                    if trial < best:
                        best = trial
                        break
                    f[key] -= sign * step
    return best


def utility_terms(image: np.ndarray, caption: str) -> dict[str, float]:
    """All terms of the utility for one HxWx3 float image in [0, 1] (or uint8)."""
    img = _as_float(image)
    spec = scenes.parse_caption(caption)
    if spec is None:
        raise ValueError(f"caption outside the world's grammar: {caption!r}")
    palette = [np.asarray(COLORS[c], np.float32) for c, _ in spec.objects]
    bg = _estimate_background(img, palette)
    masks = [_membership(img, color, bg) for color, _ in spec.objects]
    size_range = scenes.PAIR_SIZE_RANGE if spec.relation else scenes.SIZE_RANGES[spec.size_word]
    fitted = [
        _object_terms(img, mu, color, shape, bg, size_range, spec.position, spec.relation is not None)
        for mu, (color, shape) in zip(masks, spec.objects)
    ]
    keys = ("colour", "shape", "size", "position", "in_frame")
    terms = {k: float(np.mean([f[k] for f in fitted])) for k in keys}
    relation = _relation_score(spec.relation, *fitted) if spec.relation else 1.0
    terms["relation"] = relation
    # A blob of the right colour in the right place, or two right objects in the wrong arrangement,
    # is partly right: such near-misses keep some credit so that improvements are graded.
    per_object = [f["colour"] * (0.3 + 0.7 * f["shape"]) * f["size"] * f["position"] * f["in_frame"] for f in fitted]
    alignment = float(np.mean(per_object)) * (0.3 + 0.7 * relation)

    rmse = _fidelity_rmse(img, spec, fitted, bg)
    fidelity = float(np.exp(-((max(rmse - 0.01, 0.0) / 0.1) ** 2)))
    saturation = float(bg.max() - bg.min())
    background = _flat_then_linear(saturation - 0.1, 0.3)
    contrast = min(_flat_then_linear(0.35 - float(np.linalg.norm(c - bg)), 0.25) for c in palette)
    quality = fidelity**0.5 * background**0.25 * contrast**0.25
    terms.update(alignment=alignment, fidelity=fidelity, background=background, contrast=contrast,
                 quality=quality, utility=alignment * (0.4 + 0.6 * quality))
    return terms


def utility(image: np.ndarray, caption: str) -> float:
    return utility_terms(image, caption)["utility"]


def _utility_chunk(args):
    images, captions = args
    return [utility(img, cap) for img, cap in zip(images, captions)]


def utilities(images: np.ndarray, captions: list[str], workers: int | None = None) -> np.ndarray:
    """Ground-truth utility of many images, in parallel over processes."""
    import multiprocessing as mp
    import os
    from concurrent.futures import ProcessPoolExecutor

    from tqdm.auto import tqdm

    workers = workers or min(4, os.cpu_count() or 1)
    if workers <= 1 or len(images) <= 256:  # below this, starting a process pool costs more than it saves
        return np.asarray(_utility_chunk((images, captions)))
    chunks = [(images[i : i + 64], captions[i : i + 64]) for i in range(0, len(images), 64)]
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        results = list(tqdm(pool.map(_utility_chunk, chunks), total=len(chunks), desc="utility", leave=False))
    return np.asarray([u for r in results for u in r])


def _as_float(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"expected an HxWx3 image, got shape {img.shape}")
    if img.shape[:2] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"expected a {IMAGE_SIZE}x{IMAGE_SIZE} image, got {img.shape[:2]}")
    if img.dtype == np.uint8:
        return img.astype(np.float32) / 255.0
    return np.clip(img.astype(np.float32), 0, 1)

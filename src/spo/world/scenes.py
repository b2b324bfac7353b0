"""Procedural scenes of the embedded world: a renderer, a caption grammar, and quality degradations.

A scene is one or two flat-coloured shapes on a uniform background. Its caption comes from a small
grammar ("a large red circle on the left", "a blue square above a yellow triangle"). Base-model
training images are clean renders passed through random degradations (blur, noise, low contrast,
colour drift, clutter, off-centre placement), so the pre-training data spans good and bad pictures
the way web photographs do, and the captions never mention quality.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import numpy as np


IMAGE_SIZE = 32
SHAPES = ("circle", "square", "triangle", "diamond")
COLORS = {
    "red": (0.86, 0.16, 0.16),
    "green": (0.16, 0.71, 0.24),
    "blue": (0.16, 0.31, 0.86),
    "yellow": (0.95, 0.90, 0.20),
    "purple": (0.59, 0.24, 0.78),
    "orange": (0.95, 0.50, 0.10),
}
# Muted backgrounds far from every object colour: any of them counts as "clean".
BACKGROUNDS = ((0.12, 0.12, 0.14), (0.85, 0.85, 0.82), (0.45, 0.47, 0.50))
SIZE_WORDS = ("small", "large")
# Half-extent (pixels) ranges a size word asks for; None = no size word.
SIZE_RANGES = {"small": (3.5, 5.5), None: (5.5, 8.5), "large": (8.5, 10.5)}
# How far each shape reaches from its centre, in units of its half-extent `size`: the shapes are
# scaled to cover the same area as a circle of radius `size`, so that size words mean the same thing.
EXTENT = {"circle": 1.0, "square": 0.886, "diamond": 1.2533, "triangle": 1.2533}
PAIR_SIZE_RANGE = (3.5, 6.0)
POSITIONS = ("on the left", "on the right", "at the top", "at the bottom", "in the center")
# Boxes (x0, x1, y0, y1) where an object's centre must lie to satisfy a position phrase.
_C = IMAGE_SIZE / 2
POSITION_BOXES = {
    "on the left": (6.0, 12.0, _C - 3, _C + 3),
    "on the right": (IMAGE_SIZE - 12.0, IMAGE_SIZE - 6.0, _C - 3, _C + 3),
    "at the top": (_C - 3, _C + 3, 6.0, 12.0),
    "at the bottom": (_C - 3, _C + 3, IMAGE_SIZE - 12.0, IMAGE_SIZE - 6.0),
    "in the center": (_C - 3, _C + 3, _C - 3, _C + 3),
    None: (_C - 3, _C + 3, _C - 3, _C + 3),
}
RELATIONS = ("above", "below", "to the left of", "to the right of")


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    cx: float
    cy: float
    size: float  # half-extent in pixels


@dataclass(frozen=True)
class Spec:
    """What a caption asks for: one object (with optional size/position) or two related objects."""

    objects: tuple[tuple[str, str], ...]  # (color, shape) per object
    size_word: str | None = None
    position: str | None = None
    relation: str | None = None


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: tuple[float, float, float]


@dataclass(frozen=True)
class Degradation:
    """Quality defects applied after rendering; all zeros is a clean picture."""

    blur: float = 0.0  # gaussian sigma in pixels
    noise: float = 0.0  # std of additive gaussian noise
    low_contrast: float = 0.0  # blend factor toward the image mean
    color_drift: float = 0.0  # magnitude of a random per-channel colour shift
    clutter: int = 0  # number of faint random blobs in the background
    gradient: float = 0.0  # strength of a background lighting gradient


# ---------------------------------------------------------------- captions


def caption_of(spec: Spec) -> str:
    if spec.relation is not None:
        (c1, s1), (c2, s2) = spec.objects
        return f"a {c1} {s1} {spec.relation} a {c2} {s2}"
    (color, shape), = spec.objects
    words = ["a"] + ([spec.size_word] if spec.size_word else []) + [color, shape]
    if spec.position:
        words.append(spec.position)
    return " ".join(words)


_SINGLE = re.compile(
    r"^an? (?:(?P<size>small|large) )?(?P<color>\w+) (?P<shape>\w+)(?: (?P<pos>on the left|on the right|at the top|at the bottom|in the center))?$"
)
_PAIR = re.compile(
    r"^an? (?P<c1>\w+) (?P<s1>\w+) (?P<rel>above|below|to the left of|to the right of) an? (?P<c2>\w+) (?P<s2>\w+)$"
)


def parse_caption(caption: str) -> Spec | None:
    """Inverse of `caption_of`; None when the caption is outside the grammar."""
    text = " ".join(caption.lower().strip().rstrip(".").split())
    if m := _PAIR.match(text):
        objs = ((m["c1"], m["s1"]), (m["c2"], m["s2"]))
        if all(c in COLORS and s in SHAPES for c, s in objs) and objs[0][0] != objs[1][0]:
            return Spec(objects=objs, relation=m["rel"])
        return None
    if m := _SINGLE.match(text):
        if m["color"] in COLORS and m["shape"] in SHAPES:
            return Spec(objects=((m["color"], m["shape"]),), size_word=m["size"], position=m["pos"])
    return None


def outside_grammar(captions) -> list[str]:
    """The captions the world's grammar cannot parse (empty when every one is a world caption)."""
    return [c for c in captions if parse_caption(c) is None]


def all_specs() -> list[Spec]:
    """Every caption the grammar can say, in a fixed order."""
    specs = []
    for color in COLORS:
        for shape in SHAPES:
            for size in (None, *SIZE_WORDS):
                for pos in (None, *POSITIONS):
                    specs.append(Spec(objects=((color, shape),), size_word=size, position=pos))
    for c1 in COLORS:
        for s1 in SHAPES:
            for c2 in COLORS:
                if c2 == c1:
                    continue
                for s2 in SHAPES:
                    for rel in RELATIONS:
                        specs.append(Spec(objects=((c1, s1), (c2, s2)), relation=rel))
    return specs


def all_vocabulary() -> list[str]:
    words = {"a", "an"}
    for spec in all_specs():
        words.update(caption_of(spec).split())
    return sorted(words)


def position_box(position: str | None, extent: float) -> tuple[float, float, float, float]:
    """Where an object's centre must lie for a position phrase, moved inside the frame for big objects."""
    lo, hi = extent + 1.0, IMAGE_SIZE - extent - 1.0
    x0, x1, y0, y1 = POSITION_BOXES[position]

    def fit(a: float, b: float) -> tuple[float, float]:
        a, b = min(max(a, lo), hi), max(min(b, hi), lo)
        return (a, b) if a <= b else (b, a)

    return (*fit(x0, x1), *fit(y0, y1))


# ---------------------------------------------------------------- layout


def _pair_offsets(relation: str, gap: float) -> tuple[tuple[float, float], tuple[float, float]]:
    """Centres of (first, second) object for a relation, `gap` pixels apart."""
    c, h = IMAGE_SIZE / 2, gap / 2
    return {
        "above": ((c, c - h), (c, c + h)),
        "below": ((c, c + h), (c, c - h)),
        "to the left of": ((c - h, c), (c + h, c)),
        "to the right of": ((c + h, c), (c - h, c)),
    }[relation]


def layout(spec: Spec, rng: np.random.Generator) -> Scene:
    """A clean scene that satisfies the caption, with small random jitter inside the allowed ranges."""
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    if spec.relation is not None:
        gap = rng.uniform(13.0, 16.0)
        centres = _pair_offsets(spec.relation, gap)
        objs = []
        for (color, shape), (cx, cy) in zip(spec.objects, centres):
            size = rng.uniform(PAIR_SIZE_RANGE[0] + 0.25, PAIR_SIZE_RANGE[1] - 0.25)
            lo, hi = EXTENT[shape] * size + 1.0, IMAGE_SIZE - EXTENT[shape] * size - 1.0
            cx = float(np.clip(cx + rng.uniform(-1, 1), lo, hi))
            cy = float(np.clip(cy + rng.uniform(-1, 1), lo, hi))
            objs.append(Obj(shape, color, cx, cy, float(size)))
        return Scene(tuple(objs), background)
    (color, shape), = spec.objects
    lo, hi = SIZE_RANGES[spec.size_word]
    size = rng.uniform(lo + 0.25, hi - 0.25)
    x0, x1, y0, y1 = position_box(spec.position, EXTENT[shape] * size + 0.5)
    cx = rng.uniform(x0, x1) if x1 - x0 < 1 else rng.uniform(x0 + 0.5, x1 - 0.5)
    cy = rng.uniform(y0, y1) if y1 - y0 < 1 else rng.uniform(y0 + 0.5, y1 - 0.5)
    return Scene((Obj(shape, color, float(cx), float(cy), float(size)),), background)


# ---------------------------------------------------------------- rendering

_SUPERSAMPLE = 4


def _grid(n: int = IMAGE_SIZE, ss: int = _SUPERSAMPLE) -> tuple[np.ndarray, np.ndarray]:
    coords = (np.arange(n * ss) + 0.5) / ss
    return np.meshgrid(coords, coords, indexing="xy")


_GX, _GY = _grid()


def shape_mask(shape: str, cx: float, cy: float, size: float, gx=None, gy=None) -> np.ndarray:
    """Coverage in [0, 1] of each pixel by a shape centred at (cx, cy) with half-extent `size`.

    Anti-aliased by 4x4 supersampling. The triangle points up; its box centre is (cx, cy).
    """
    gx = _GX if gx is None else gx
    gy = _GY if gy is None else gy
    dx, dy = gx - cx, gy - cy
    if shape not in EXTENT:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    r = size * EXTENT[shape]
    if shape == "circle":
        inside = dx**2 + dy**2 <= r**2
    elif shape == "square":
        inside = (np.abs(dx) <= r) & (np.abs(dy) <= r)
    elif shape == "diamond":
        inside = np.abs(dx) + np.abs(dy) <= r
    else:  # triangle: apex at (0, -r), base from (-r, r) to (r, r)
        inside = (dy <= r) & (np.abs(dx) * 2 <= (dy + r))
    ss = gx.shape[0] // IMAGE_SIZE
    return inside.reshape(IMAGE_SIZE, ss, IMAGE_SIZE, ss).mean(axis=(1, 3))


def render(scene: Scene) -> np.ndarray:
    """float32 HxWx3 image in [0, 1]."""
    img = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
    img[:] = scene.background
    for obj in scene.objects:
        m = shape_mask(obj.shape, obj.cx, obj.cy, obj.size)[..., None]
        img = img * (1 - m) + np.asarray(COLORS[obj.color], np.float32) * m
    return img.astype(np.float32)


def _gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return img
    radius = max(1, int(np.ceil(3 * sigma)))
    x = np.arange(-radius, radius + 1)
    k = np.exp(-(x**2) / (2 * sigma**2))
    k /= k.sum()
    pad = np.pad(img, ((radius, radius), (radius, radius), (0, 0)), mode="edge")
    tmp = sum(k[i] * pad[:, i : i + IMAGE_SIZE] for i in range(len(k)))
    return sum(k[i] * tmp[i : i + IMAGE_SIZE] for i in range(len(k)))


def degrade(img: np.ndarray, scene: Scene, d: Degradation, rng: np.random.Generator) -> np.ndarray:
    out = img.copy()
    if d.gradient > 0:
        angle = rng.uniform(0, 2 * np.pi)
        gx, gy = np.meshgrid(np.linspace(-1, 1, IMAGE_SIZE), np.linspace(-1, 1, IMAGE_SIZE))
        out += (d.gradient * (np.cos(angle) * gx + np.sin(angle) * gy))[..., None] / 2
    for _ in range(d.clutter):
        color = rng.uniform(0, 1, 3)
        blob = shape_mask(SHAPES[rng.integers(len(SHAPES))], *rng.uniform(0, IMAGE_SIZE, 2), rng.uniform(1, 3))
        out = out * (1 - 0.6 * blob[..., None]) + 0.6 * blob[..., None] * color
    if d.color_drift > 0:
        out += rng.normal(0, d.color_drift, 3).astype(np.float32)
    out = _gaussian_blur(out, d.blur)
    if d.low_contrast > 0:
        out = out * (1 - d.low_contrast) + out.mean() * d.low_contrast
    if d.noise > 0:
        out += rng.normal(0, d.noise, out.shape)
    return np.clip(out, 0, 1).astype(np.float32)


def random_degradation(rng: np.random.Generator, strength: float) -> Degradation:
    """Each defect appears with probability `strength` and a random magnitude that grows with it."""

    def on() -> bool:
        return bool(rng.uniform() < strength)

    return Degradation(
        blur=rng.uniform(0.4, 1.4) if on() else 0.0,
        noise=rng.uniform(0.02, 0.12) if on() else 0.0,
        low_contrast=rng.uniform(0.2, 0.6) if on() else 0.0,
        color_drift=rng.uniform(0.05, 0.2) if on() else 0.0,
        clutter=int(rng.integers(1, 6)) if on() else 0,
        gradient=rng.uniform(0.2, 0.6) if on() else 0.0,
    )


def jitter_layout(scene: Scene, rng: np.random.Generator, amount: float) -> Scene:
    """Off-centre placement and size error: moves objects away from where the caption puts them."""
    objs = tuple(
        dataclasses.replace(
            o,
            cx=float(np.clip(o.cx + rng.normal(0, amount), 2, IMAGE_SIZE - 2)),
            cy=float(np.clip(o.cy + rng.normal(0, amount), 2, IMAGE_SIZE - 2)),
            size=float(np.clip(o.size * np.exp(rng.normal(0, amount / 12)), 2.5, 13)),
        )
        for o in scene.objects
    )
    return Scene(objs, scene.background)


def training_example(spec: Spec, rng: np.random.Generator) -> np.ndarray:
    """A pre-training image for a caption: a clean layout, then random misplacement and defects."""
    strength = rng.uniform(0, 0.8)  # the data's quality level; about one in six pictures is clean
    scene = layout(spec, rng)
    if rng.uniform() < strength:
        scene = jitter_layout(scene, rng, amount=rng.uniform(1.0, 4.0))
    return degrade(render(scene), scene, random_degradation(rng, strength), rng)

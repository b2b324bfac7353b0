"""The ground-truth utility must rank clean renders on top and resist cheap reward hacks."""

import dataclasses
import zlib

import numpy as np
import pytest

from spo.images import to_uint8
from spo.world import scenes
from spo.world.utility import utility, utility_terms

N_SCENES = 25
# The shape fit is a grid search refined to ~0.05 px, so equal pictures can differ by this much.
FIT_PRECISION = 1e-3


def _random_scenes(seed, n=N_SCENES):
    rng = np.random.default_rng(seed)
    specs = scenes.all_specs()
    for _ in range(n):
        spec = specs[rng.integers(len(specs))]
        scene = scenes.layout(spec, rng)
        yield spec, scenes.caption_of(spec), scene, scenes.render(scene), rng


def test_clean_renders_sit_at_the_top_of_the_scale():
    u = np.array([utility(img, cap) for _, cap, _, img, _ in _random_scenes(0, 40)])
    assert u.min() > 0.8
    assert np.median(u) > 0.99


def _recolour(scene, rng):
    objs = []
    for o in scene.objects:
        other = [c for c in scenes.COLORS if c != o.color and all(c != p.color for p in scene.objects)]
        objs.append(dataclasses.replace(o, color=other[rng.integers(len(other))]))
    return scenes.Scene(tuple(objs), scene.background)


def _swap_shape(scene, rng):
    objs = []
    for o in scene.objects:
        other = [s for s in scenes.SHAPES if s != o.shape]
        objs.append(dataclasses.replace(o, shape=other[rng.integers(len(other))]))
    return scenes.Scene(tuple(objs), scene.background)


def _rescale(factor):
    return lambda scene, rng: scenes.Scene(
        tuple(dataclasses.replace(o, size=o.size * factor) for o in scene.objects), scene.background)


def _shift(scene, rng):
    dx, dy = rng.choice([-1, 1], 2) * rng.uniform(3, 7, 2)
    return scenes.Scene(tuple(dataclasses.replace(o, cx=o.cx + dx, cy=o.cy + dy) for o in scene.objects), scene.background)


def _background(scene, rng):
    return scenes.Scene(scene.objects, tuple(rng.uniform(0, 1, 3)))


SCENE_EDITS = {"recolour": _recolour, "shape swap": _swap_shape, "shrink": _rescale(0.5), "grow": _rescale(1.6),
               "shift": _shift, "background": _background}
PIXEL_EDITS = {
    "blur": scenes.Degradation(blur=1.2), "noise": scenes.Degradation(noise=0.08),
    "low contrast": scenes.Degradation(low_contrast=0.5), "colour drift": scenes.Degradation(color_drift=0.15),
    "clutter": scenes.Degradation(clutter=4), "gradient": scenes.Degradation(gradient=0.5),
}


@pytest.mark.parametrize("name", list(SCENE_EDITS) + list(PIXEL_EDITS))
def test_no_perturbation_of_a_clean_render_scores_higher(name):
    worse = 0
    for _, cap, scene, img, rng in _random_scenes(zlib.crc32(name.encode()) % 1000):
        if name in SCENE_EDITS:
            edited = scenes.render(SCENE_EDITS[name](scene, rng))
        else:
            edited = scenes.degrade(img, scene, PIXEL_EDITS[name], rng)
        u_clean, u_edit = utility(img, cap), utility(edited, cap)
        assert u_edit <= u_clean + FIT_PRECISION, (name, cap, u_edit, u_clean)
        worse += u_edit < u_clean - 0.02
    # The edit is noticed (not just tolerated) in most scenes.
    assert worse >= 0.7 * N_SCENES, (name, worse)


@pytest.mark.parametrize("edit", ["blur", "noise", "recolour"])
def test_utility_ranks_clean_above_degraded_for_many_scenes(edit):
    for _, cap, scene, img, rng in _random_scenes(7, 30):
        if edit == "recolour":
            bad = scenes.render(_recolour(scene, rng))
        else:
            bad = scenes.degrade(img, scene, PIXEL_EDITS[edit], rng)
        assert utility(img, cap) > utility(bad, cap), (edit, cap)


def _adversarial(caption, rng):
    spec = scenes.parse_caption(caption)
    color = np.asarray(scenes.COLORS[spec.objects[0][0]], np.float32)
    yy, xx = np.mgrid[0:32, 0:32]
    checker = ((yy // 2 + xx // 2) % 2).astype(np.float32)[..., None]
    return {
        "noise": rng.uniform(0, 1, (32, 32, 3)),
        "saturated noise": rng.integers(0, 2, (32, 32, 3)).astype(np.float32),
        "checkerboard": np.clip(checker * color + (1 - checker) * 0.1, 0, 1),
        "colour checkerboard": checker * color + (1 - checker) * (1 - color),
        "blank": np.full((32, 32, 3), 0.5, np.float32),
        "colour smeared everywhere": np.broadcast_to(color, (32, 32, 3)).copy(),
        "colour smeared with noise": np.clip(color + rng.normal(0, 0.1, (32, 32, 3)), 0, 1),
    }


def test_adversarial_images_score_far_below_a_clean_render():
    for _, cap, _, img, rng in _random_scenes(3, 15):
        clean = utility(img, cap)
        for name, adv in _adversarial(cap, rng).items():
            u = utility(adv, cap)
            assert u < 0.3 and u < clean - 0.5, (name, cap, u, clean)


def test_terms_are_bounded_and_uint8_matches_float():
    for _, cap, scene, img, rng in _random_scenes(11, 10):
        noisy = scenes.degrade(img, scene, scenes.Degradation(noise=0.05, blur=0.7), rng)
        terms = utility_terms(noisy, cap)
        assert all(0.0 <= v <= 1.0 for v in terms.values()), terms
        u8 = to_uint8(noisy)
        assert utility(u8, cap) == pytest.approx(utility(u8.astype(np.float32) / 255, cap))


def test_bad_inputs_are_refused_clearly():
    img = np.zeros((32, 32, 3), np.float32)
    with pytest.raises(ValueError, match="grammar"):
        utility(img, "a photo of a cat")
    with pytest.raises(ValueError, match="32x32"):
        utility(np.zeros((64, 64, 3)), "a red circle")

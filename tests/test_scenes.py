import numpy as np
import pytest

from spo.world import scenes


def test_every_caption_parses_back_to_its_spec():
    specs = scenes.all_specs()
    assert len(specs) == len({scenes.caption_of(s) for s in specs})  # captions are unique
    for spec in specs:
        assert scenes.parse_caption(scenes.caption_of(spec)) == spec


def test_grammar_covers_every_word_kind():
    words = set(scenes.all_vocabulary())
    for group in (scenes.SHAPES, scenes.COLORS, scenes.SIZE_WORDS):
        assert set(group) <= words
    captions = [scenes.caption_of(s) for s in scenes.all_specs()]
    for phrase in scenes.POSITIONS + scenes.RELATIONS:
        assert any(phrase in c for c in captions)


@pytest.mark.parametrize("text", ["a red cat", "a red circle above a red square", "", "two blue squares"])
def test_captions_outside_the_grammar_are_rejected(text):
    assert scenes.parse_caption(text) is None


def test_parse_is_forgiving_about_case_spacing_and_full_stop():
    assert scenes.parse_caption("  A Large  RED circle on the left. ") == scenes.Spec(
        objects=(("red", "circle"),), size_word="large", position="on the left")


def test_rendering_and_training_examples_are_deterministic():
    spec = scenes.all_specs()[123]
    a = scenes.training_example(spec, np.random.default_rng(5))
    b = scenes.training_example(spec, np.random.default_rng(5))
    c = scenes.training_example(spec, np.random.default_rng(6))
    assert a.shape == (32, 32, 3) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("shape", scenes.SHAPES)
def test_shapes_have_the_area_of_a_circle_of_the_same_size(shape):
    area = scenes.shape_mask(shape, 16.0, 16.0, 6.0).sum()
    assert area == pytest.approx(np.pi * 36, rel=0.03)


def test_clean_render_puts_the_object_colour_where_the_caption_says():
    spec = scenes.parse_caption("a large blue square on the right")
    scene = scenes.layout(spec, np.random.default_rng(0))
    img = scenes.render(scene)
    obj = scene.objects[0]
    assert obj.cx > 16
    np.testing.assert_allclose(img[int(obj.cy), int(obj.cx)], scenes.COLORS["blue"], atol=1e-6)
    np.testing.assert_allclose(img[1, 1], scene.background, atol=1e-6)


def test_degradations_change_the_picture_and_stay_in_range():
    rng = np.random.default_rng(0)
    spec = scenes.parse_caption("a red circle")
    scene = scenes.layout(spec, rng)
    clean = scenes.render(scene)
    for d in (scenes.Degradation(blur=1.0), scenes.Degradation(noise=0.1), scenes.Degradation(low_contrast=0.5),
              scenes.Degradation(color_drift=0.2), scenes.Degradation(clutter=4), scenes.Degradation(gradient=0.5)):
        out = scenes.degrade(clean, scene, d, rng)
        assert out.min() >= 0 and out.max() <= 1
        assert np.abs(out - clean).mean() > 1e-3, d
    np.testing.assert_array_equal(scenes.degrade(clean, scene, scenes.Degradation(), rng), clean)


def test_pretraining_data_spans_a_range_of_quality():
    from spo.world.utility import utility

    rng = np.random.default_rng(1)
    specs = scenes.all_specs()
    u = []
    for _ in range(60):
        spec = specs[rng.integers(len(specs))]
        u.append(utility(scenes.training_example(spec, rng), scenes.caption_of(spec)))
    u = np.array(u)
    assert (u > 0.9).mean() > 0.1  # some clean pictures
    assert (u < 0.5).mean() > 0.2  # and many poor ones

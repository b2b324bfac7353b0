"""`spo evaluate`: model specs, the image cache (re-scoring never regenerates), fixed seeds, the
report files and their numbers, checked against the world's ground truth recomputed from the images."""

import csv
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from spo.cli import cli
from spo.errors import SPOError
from spo.evaluation import ModelSpec, Sampler, image_key, parse_model_spec

N_PROMPTS, STEPS = 3, 2


@pytest.fixture(scope="module")
def lora_dir(tiny_world, tmp_path_factory):
    """A random (non-zero) LoRA on the tiny world's UNet, saved the way diffusers reads it."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    out = tmp_path_factory.mktemp("lora")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_world / "sd")
    torch.manual_seed(0)
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False,
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    StableDiffusionPipeline.save_lora_weights(str(out), unet_lora_layers=layers)
    return out


def _evaluate(out, *args):
    return CliRunner().invoke(cli, ["evaluate", "--num-prompts", str(N_PROMPTS), "--steps", str(STEPS),
                                    "--out", str(out), *map(str, args)])


@pytest.fixture(scope="module")
def first_run(tiny_world, lora_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluate")
    result = _evaluate(out, "--model", f"base={tiny_world / 'sd'}", "--model", f"lora={tiny_world / 'sd'}+{lora_dir}",
                       "--scorer", "world-utility")
    assert result.exit_code == 0, result.output
    return out


def _read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _cached_images(out):
    return sorted((out / "cache").rglob("*.png"))


def test_model_specs():
    assert parse_model_spec("base=world:sd") == ModelSpec("base", "world:sd", None)
    assert parse_model_spec("hub/model-id") == ModelSpec("model-id", "hub/model-id", None)
    with pytest.raises(SPOError, match="NAME=BASE"):
        parse_model_spec("spo=world:sd+")
    with pytest.raises(SPOError, match="does not exist"):
        parse_model_spec("spo=world:sd+/no/such/lora")


def test_cache_key_covers_model_prompt_seed_and_every_sampler_setting(tmp_path):
    (tmp_path / "w.bin").write_bytes(b"1")
    model = ModelSpec("m", str(tmp_path))
    identity = model.identity()
    key = image_key(identity, "a red circle", 0, Sampler())
    others = [image_key(identity, "a blue circle", 0, Sampler()), image_key(identity, "a red circle", 1, Sampler()),
              image_key(identity, "a red circle", 0, Sampler(steps=19)),
              image_key(identity, "a red circle", 0, Sampler(guidance=7.5)),
              image_key(identity, "a red circle", 0, Sampler(eta=1.0)),
              image_key(ModelSpec("other name", str(tmp_path)).identity(), "a red circle", 0, Sampler())]
    assert key not in others[:-1] and others[-1] == key  # the display name is not part of the model
    (tmp_path / "w.bin").write_bytes(b"22")  # retrained in place: the old images must not be reused
    assert image_key(model.identity(), "a red circle", 0, Sampler()) != key


def test_reports_hold_settings_and_numbers_that_match_the_images(first_run, tiny_world, lora_dir):
    from spo.prompts import load_prompts
    from spo.world.utility import utility

    out = first_run
    for name in ("results.json", "results.csv", "results.md", "per_prompt.csv", "grid.png"):
        assert (out / name).stat().st_size > 0, name
    report = json.loads((out / "results.json").read_text())
    s = report["settings"]
    assert s["sampler"] | {"seeds": None, "batch_size": None} == dict(
        steps=STEPS, guidance=5.0, eta=0.0, seed=0, scheduler="DDIM", seeds=None, batch_size=None)
    assert s["prompts"] == {"source": "world:test", "n": N_PROMPTS} and s["baseline"] == "base"
    assert [m["identity"]["spec"] for m in s["models"]] == [str(tiny_world / "sd"), f"{tiny_world / 'sd'}+{lora_dir}"]
    assert all(m["identity"]["pretrained_fingerprint"] for m in s["models"])

    prompts = load_prompts("world:test")[:N_PROMPTS]
    rows = _read_csv(out / "per_prompt.csv")
    assert [(r["model"], r["prompt"], int(r["seed"])) for r in rows] == \
        [(m, p, i) for m in ("base", "lora") for i, p in enumerate(prompts)]
    # The ground truth recomputed from the cached PNGs: the scores are those of the images on disk.
    pngs = {json.loads(Image.open(p).text["spo"])["seed"]: p for p in _cached_images(out)
            if json.loads(Image.open(p).text["spo"])["model"]["spec"] == str(tiny_world / "sd")}
    for r in rows[:N_PROMPTS]:
        image = np.asarray(Image.open(pngs[int(r["seed"])]).convert("RGB"), np.float32) / 255
        assert float(r["world-utility"]) == pytest.approx(utility(image, r["prompt"]), abs=1e-9)
    for model in ("base", "lora"):
        u = [float(r["world-utility"]) for r in rows if r["model"] == model]
        assert report["results"][model]["world-utility"]["mean"] == pytest.approx(np.mean(u))
    diff = report["vs_baseline"]["lora"]["world-utility"]
    assert diff["n"] == N_PROMPTS and diff["diff"] == pytest.approx(
        report["results"]["lora"]["world-utility"]["mean"] - report["results"]["base"]["world-utility"]["mean"])
    assert "base" not in report["vs_baseline"]
    summary = _read_csv(out / "results.csv")
    assert {(r["model"], r["scorer"]) for r in summary} == {("base", "world-utility"), ("lora", "world-utility")}
    assert all(r["steps"] == str(STEPS) and r["prompts"] == "world:test" and r["n_prompts"] == str(N_PROMPTS)
               for r in summary)
    assert "| lora | world-utility |" in (out / "results.md").read_text()


def test_the_lora_is_applied_and_image_i_uses_seed_plus_i(first_run, tiny_world, lora_dir):
    from spo.generation import generate, load_model
    from spo.prompts import load_prompts

    meta = {p: json.loads(Image.open(p).text["spo"]) for p in _cached_images(first_run)}
    assert len(meta) == 2 * N_PROMPTS
    by = {(m["model"]["spec"].endswith(str(lora_dir)), m["seed"]): p for p, m in meta.items()}
    pixels = {k: np.asarray(Image.open(p), np.float32) / 255 for k, p in by.items()}
    assert np.abs(pixels[(True, 2)] - pixels[(False, 2)]).mean() > 1e-3  # LoRA images differ from the base's
    prompt = load_prompts("world:test")[2]
    direct = generate(load_model(str(tiny_world / "sd")), [prompt], seed=2, steps=STEPS)[0]
    assert np.abs(pixels[(False, 2)] - direct).max() <= 1 / 255 + 1e-6  # only the 8-bit rounding differs


def test_rescoring_with_another_scorer_never_calls_the_pipeline(first_run, tiny_world, lora_dir, monkeypatch):
    from spo import generation

    def forbidden(*args, **kwargs):
        raise AssertionError("the pipeline was used although every image is cached")

    monkeypatch.setattr(generation, "load_model", forbidden)
    monkeypatch.setattr(generation, "generate", forbidden)
    before = _cached_images(first_run)
    models = ["--model", f"base={tiny_world / 'sd'}", "--model", f"lora={tiny_world / 'sd'}+{lora_dir}"]
    result = _evaluate(first_run, *models, "--scorer", f"world-pickscore={tiny_world / 'pickscore'}")
    assert result.exit_code == 0, result.output
    assert _cached_images(first_run) == before
    rows = _read_csv(first_run / "per_prompt.csv")
    assert len(rows) == 2 * N_PROMPTS and all(np.isfinite(float(r["world-pickscore"])) for r in rows)


def test_only_missing_images_are_generated_on_their_own_seeds(tiny_world, tmp_path, monkeypatch):
    from spo import generation

    calls = []
    real = generation.generate

    def spy(pipe, prompts, seed, *args, **kwargs):
        calls.append((list(prompts), seed))
        return real(pipe, prompts, seed, *args, **kwargs)

    monkeypatch.setattr(generation, "generate", spy)
    args = ["--model", f"base={tiny_world / 'sd'}", "--scorer", "world-utility", "--seed", "7",
            "--cache-dir", tmp_path / "cache"]
    assert _evaluate(tmp_path / "a", *args).exit_code == 0
    assert [seed for _, seed in calls] == [7]
    calls.clear()
    result = CliRunner().invoke(cli, ["evaluate", "--num-prompts", "5", "--steps", str(STEPS), "--batch-size", "1",
                                      "--out", str(tmp_path / "b"), *map(str, args)])
    assert result.exit_code == 0, result.output
    assert [(len(p), seed) for p, seed in calls] == [(1, 10), (1, 11)]  # only prompts 3 and 4, on seeds 7 + 3, 7 + 4


def test_unknown_scorer_and_duplicate_models_fail_before_any_work(tiny_world, tmp_path):
    result = _evaluate(tmp_path / "o", "--scorer", "pickscorez")
    assert isinstance(result.exception, SPOError) and "unknown scorer 'pickscorez'" in str(result.exception)
    result = _evaluate(tmp_path / "o", "--model", f"a={tiny_world / 'sd'}", "--model", f"a={tiny_world / 'sd'}")
    assert isinstance(result.exception, SPOError) and "given twice" in str(result.exception)
    assert not (tmp_path / "o" / "results.json").exists()


def test_a_damaged_or_foreign_cached_image_is_drawn_again_never_scored(tiny_world, tmp_path, monkeypatch):
    """Truncated, empty, wrong-size and other-key PNGs in the cache are regenerated (and said so in one line);
    the scores then equal those of a clean run, and the intact entry is not drawn again."""
    from spo import generation
    from spo.evaluation import expected_size

    args = ["--model", f"base={tiny_world / 'sd'}", "--scorer", "world-utility", "--batch-size", "1",
            "--cache-dir", tmp_path / "cache"]

    def run(out):
        result = CliRunner().invoke(cli, ["evaluate", "--num-prompts", "5", "--steps", str(STEPS), "--out",
                                          str(out), *map(str, args)])
        assert result.exit_code == 0, result.output
        return result.output

    run(tmp_path / "clean")
    by_seed = {json.loads(Image.open(p).text["spo"])["seed"]: p for p in sorted((tmp_path / "cache").rglob("*.png"))}
    clean = {seed: p.read_bytes() for seed, p in by_seed.items()}
    size = Image.open(by_seed[0]).size
    assert expected_size(ModelSpec("base", str(tiny_world / "sd"))) == size

    by_seed[0].write_bytes(clean[0][: len(clean[0]) // 2])  # truncated
    by_seed[1].write_bytes(b"")  # empty
    with Image.open(by_seed[2]) as im:  # right metadata, wrong size
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        info.add_text("spo", im.text["spo"])
        im.resize((size[0] * 2, size[1] * 2)).save(by_seed[2], pnginfo=info)
    by_seed[3].write_bytes(clean[4])  # a valid image of this model, but of another prompt and seed

    calls = []
    real = generation.generate

    def spy(pipe, prompts, seed, *a, **k):
        calls.append(seed)
        return real(pipe, prompts, seed, *a, **k)

    monkeypatch.setattr(generation, "generate", spy)
    log = run(tmp_path / "again")
    assert sorted(calls) == [0, 1, 2, 3]  # seed 4 was intact
    line = next(line for line in log.splitlines() if "failed verification" in line)
    assert "regenerating 4 cached images" in line and "2 undecodable" in line and "1 wrong size" in line \
        and "1 written under other settings" in line
    assert {seed: p.read_bytes() for seed, p in by_seed.items()} == clean
    assert _read_csv(tmp_path / "again" / "per_prompt.csv") == _read_csv(tmp_path / "clean" / "per_prompt.csv")

"""What a user meets first: config discovery, friendly refusals, the top-level API, the demo from anywhere."""

import subprocess
import sys

import pytest
import yaml

from spo.config import SPOConfig, load_config


def _spo(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "spo.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=900, cwd=cwd)


def test_print_config_round_trips_to_the_same_digest(tmp_path):
    proc = _spo("train", "--config", "world", "--print-config", "train.num_epochs=3", "sample.num_candidates=2")
    assert proc.returncode == 0, proc.stderr
    (tmp_path / "printed.yaml").write_text(proc.stdout)
    printed = load_config(SPOConfig, tmp_path / "printed.yaml")
    direct = load_config(SPOConfig, "world", ["train.num_epochs=3", "sample.num_candidates=2"])
    assert printed.digest() == direct.digest() and printed.train.num_epochs == 3


@pytest.mark.parametrize("override, hint", [
    ("train.lr=1e-4", "did you mean train.learning_rate?"),
    ("learning_rate=1e-4", "did you mean train.learning_rate?"),
    ("train.learnig_rate=1e-4", "did you mean train.learning_rate?"),
    ("sample.beta=1", "did you mean train.beta or dpo.beta?"),
])
def test_unknown_fields_get_a_did_you_mean(override, hint):
    with pytest.raises(Exception, match=hint.replace("?", r"\?")):
        load_config(SPOConfig, "world", [override])


def test_a_yaml_path_without_config_gets_a_hint_and_no_config_a_warning():
    proc = _spo("train", "configs/world.yaml")
    assert proc.returncode != 0 and "pass it as --config configs/world.yaml" in proc.stderr
    proc = _spo("train", "--print-config")
    assert proc.returncode == 0
    proc = _spo("train", "log.output_dir=/nonexistent-root-dir/x", "train.num_epochs=0")
    assert "no --config given" in proc.stderr


def test_help_lists_every_field():
    out = _spo("train", "--help").stdout
    assert "sample.keep_rule" in out and "train.lr_scheduler" in out and "log.checkpointing_steps" in out
    assert "data.relabel_ties" in _spo("train-spm", "--help").stdout


def test_top_level_api():
    import spo

    assert spo.Trainer.__name__ == "Trainer" and spo.load_config is load_config and spo.SPOConfig is SPOConfig
    with pytest.raises(AttributeError):
        spo.NoSuchThing  # noqa: B018


def test_shipped_recipes_resolve_by_name_outside_the_repository(tmp_path):
    proc = _spo("train", "--config", "sd15", "--print-config", cwd=tmp_path)
    assert proc.returncode == 0 and yaml.safe_load(proc.stdout)["prompts"] == "spo:4k"
    proc = _spo("train", "--config", "configs/world.yaml", "--print-config", cwd=tmp_path)  # the demo's default
    assert proc.returncode == 0, proc.stderr


def test_tensorboard_gets_per_step_scalars_and_validation_images(tiny_world, tiny_spm, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from conftest import tiny_spo_args
    from spo.trainer import Trainer

    out = tmp_path / "tb"
    cfg = load_config(SPOConfig, None, tiny_spo_args(tiny_world, tiny_spm, out, "sample.batches_per_epoch=2",
                                                      "train.num_epochs=1", "log.report_to=tensorboard",
                                                      "log.validation_prompts=[a red circle, a blue square]",
                                                      "log.validation_steps=1"))
    tr = Trainer(cfg, log=lambda m: None).setup()
    tr.train()
    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents.*")).parent),
                              size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert len(events.Scalars("train/loss")) == tr.global_step >= 2  # one point per optimizer step
    assert "sample/fraction_kept" in events.Tags()["scalars"]
    assert events.Images("validation")  # and the validation images
    assert sorted(p.name for p in (out / "validation").iterdir())  # as PNG grids in the run folder too


def test_a_missing_tracker_fails_before_any_work(monkeypatch):
    import importlib.util

    from spo.errors import SPOError
    from spo.runtime import check_tracker

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(SPOError, match="needs wandb"):
        check_tracker("wandb")
    check_tracker("tensorboard")


def test_win_rate_ci_comes_from_one_joint_bootstrap_over_prompts():
    """Half wins, half exact ties: win rate 0.75; each prompt scores 1 or 0.5, so the CI is about ±0.05."""
    from spo.evaluation import paired_difference

    after = [1.0] * 50 + [0.0] * 50
    r = paired_difference(after, [0.0] * 100)
    lo, hi = r["win_rate_ci95"]
    assert r["win_rate"] == pytest.approx(0.75) and lo < 0.75 < hi
    assert hi - lo < 0.13  # resampling wins and ties separately gave about 0.27


def test_generate_checks_every_lora_path_and_name_before_generating(tmp_path):
    (tmp_path / "a" / "lora").mkdir(parents=True)
    (tmp_path / "b" / "lora").mkdir(parents=True)
    proc = _spo("generate", "--prompt", "a red circle", "--lora", tmp_path / "a" / "lora", "--lora",
                tmp_path / "missing", "--out", tmp_path / "out")
    assert proc.returncode != 0 and "is not a directory" in proc.stderr and not (tmp_path / "out" / "base").exists()
    proc = _spo("generate", "--prompt", "a red circle", "--lora", tmp_path / "a" / "lora", "--lora",
                tmp_path / "b" / "lora", "--out", tmp_path / "out")
    assert proc.returncode != 0 and "--lora NAME=PATH" in proc.stderr


def test_a_lora_folder_carries_its_base_model_recipe_and_model_card(tiny_world, tiny_spm, tmp_path):
    import json

    from conftest import tiny_spo_args
    from spo.trainer import Trainer

    cfg = load_config(SPOConfig, None, tiny_spo_args(tiny_world, tiny_spm, tmp_path / "r", "train.num_epochs=1"))
    lora = Trainer(cfg, log=lambda m: None).setup().train()
    info = json.loads((lora / "spo_lora.json").read_text())
    assert info["base_model"] == str(tiny_world / "sd") and info["config_digest"] == cfg.digest()
    card = (lora / "README.md").read_text()
    assert card.startswith("---\nbase_model: ") and "load_lora_weights" in card
    assert load_config(SPOConfig, lora / "training_config.yaml").digest() == cfg.digest()


def test_world_build_force_never_empties_a_folder_that_is_not_a_world(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    proc = _spo("world", "build", "--tiny", "--force", "--out", mine)
    assert proc.returncode != 0 and "not a world's" in proc.stderr and "Traceback" not in proc.stderr
    assert (mine / "thesis.tex").read_text() == "years of work"

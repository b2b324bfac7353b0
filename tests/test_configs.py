"""Every shipped config loads and validates; the paper recipes say what the authors ran."""

from pathlib import Path

import pytest

from spo.config import LatentJudgeTrainConfig, SPMTrainConfig, SPOConfig, field_help, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cls = (SPMTrainConfig if path.name.startswith("spm_") else
           LatentJudgeTrainConfig if path.name.startswith("latent_judge_") else SPOConfig)
    cfg = load_config(cls, path)
    assert cfg.log.output_dir.startswith("runs/")


def test_the_sd15_recipe_is_the_authors():
    cfg = load_config(SPOConfig, CONFIGS / "sd15.yaml")
    s, t, m = cfg.sample, cfg.train, cfg.model
    assert (s.num_candidates, s.threshold, s.keep_rule, s.divert_start_step, s.num_steps) == (4, 0.3, "best_worst", 4, 20)
    assert (s.batch_size, s.batches_per_epoch, t.batch_size, t.gradient_accumulation_steps) == (10, 0, 10, 1)
    assert (t.learning_rate, t.max_grad_norm, t.lr_scheduler, t.num_epochs) == (6e-5, 0.0, "constant", 10)
    assert (m.lora_rank, m.lora_alpha, t.beta, t.eps) == (4, 4.0, 10.0, 0.1)


def test_every_field_has_a_one_line_help():
    for cls in (SPOConfig, SPMTrainConfig, LatentJudgeTrainConfig):
        rows = field_help(cls)
        assert rows and all(help_text and "\n" not in help_text for _, help_text, _ in rows), cls


@pytest.mark.parametrize("override, message", [
    ("train.learning_rate=-1", "train.learning_rate must be > 0"),
    ("train.learning_rate=nan", "must be a finite number"),
    ("sample.guidance_scale=nan", "must be a finite number"),
    ("log.checkpointing_epochs=0", "log.checkpointing_epochs must be >= 1"),
    ("log.checkpoints_total_limit=0", "log.checkpoints_total_limit must be >= 1"),
    ("train.seed=-1", "train.seed must be >= 0"),
    ("sample.keep_rule=softmax", "sample.keep_rule must be one of best_worst, kway"),
    ("train.lr_scheduler=step", "train.lr_scheduler must be one of"),
])
def test_numeric_and_choice_fields_are_validated(override, message):
    with pytest.raises(Exception, match=message.replace("(", r"\(")):
        load_config(SPOConfig, CONFIGS / "world.yaml", [override])


def test_spm_config_ranges():
    with pytest.raises(Exception, match="train.t_min <= train.t_max"):
        load_config(SPMTrainConfig, CONFIGS / "spm_world.yaml", ["train.t_min=10", "train.t_max=5"])
    with pytest.raises(Exception, match="log.log_every must be >= 1"):
        load_config(SPMTrainConfig, CONFIGS / "spm_world.yaml", ["log.log_every=0"])


def test_resume_changes_name_the_fields_and_ignore_settings_added_later_at_their_default():
    from spo.config import SPOConfig, load_config, resume_changes, to_plain

    cfg = load_config(SPOConfig, "configs/world.yaml", [])
    saved = to_plain(cfg)
    assert resume_changes(saved, cfg) == []
    longer = load_config(SPOConfig, "configs/world.yaml", ["train.num_epochs=99", "log.log_every=7"])
    assert resume_changes(saved, longer) == []  # the run's length and log.* may change on resume
    changed = load_config(SPOConfig, "configs/world.yaml", ["train.learning_rate=0.5", "sample.num_candidates=8"])
    assert resume_changes(saved, changed) == ["sample.num_candidates: 4 -> 8", "train.learning_rate: 0.0005 -> 0.5"]
    del saved["model"]["init_lora"]  # a run started before the setting existed
    assert resume_changes(saved, cfg) == []
    assert resume_changes(saved, load_config(SPOConfig, "configs/world.yaml", ["model.init_lora=x"])) == [
        "model.init_lora: (unset) -> 'x'"]

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


def test_a_yaml_path_without_config_gets_a_hint_and_no_config_a_warning(tmp_path):
    proc = _spo("train", "configs/world.yaml")
    assert proc.returncode != 0 and "pass it as --config configs/world.yaml" in proc.stderr
    proc = _spo("train", "--print-config")
    assert proc.returncode == 0
    (tmp_path / "file").write_text("")  # the run then stops at once, after the config has loaded (and warned)
    proc = _spo("train", f"log.output_dir={tmp_path / 'file' / 'sub' / 'x'}")
    assert "no --config given" in proc.stderr and "cannot write" in proc.stderr
    proc = _spo("train", "train.num_epochs=0")  # a config that does not load is refused in one line
    assert proc.stderr.strip().splitlines() == ["error: train.num_epochs must be >= 1, got 0"]


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


# ------------------------------------------------------------------ long runs and hand-off


@pytest.fixture(scope="module")
def pushed_run(tiny_world, tiny_spm, tmp_path_factory):
    """A one-epoch tiny run with log.push_to_hub on, the hub calls recorded instead of made."""
    import huggingface_hub

    from conftest import tiny_spo_args
    from spo.trainer import Trainer

    out, calls = tmp_path_factory.mktemp("pushed") / "run", []
    cfg = load_config(SPOConfig, None, tiny_spo_args(tiny_world, tiny_spm, out, "train.num_epochs=1",
                                                      "log.push_to_hub=true", "log.hub_repo_id=alice/spo-tiny"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(huggingface_hub, "create_repo", lambda *a, **k: calls.append(("create_repo", a, k)))
        mp.setattr(huggingface_hub, "upload_folder", lambda *a, **k: calls.append(("upload_folder", a, k)))
        lora = Trainer(cfg, log=lambda m: None).setup().train()
    return cfg, lora, calls


def test_init_lora_starts_from_the_saved_adapters_and_refuses_mismatches(pushed_run, tiny_world, tiny_spm, tmp_path):
    import torch
    from safetensors.torch import load_file

    from conftest import tiny_spo_args
    from spo.errors import SPOError
    from spo.trainer import Trainer, save_lora

    _, lora, _ = pushed_run
    args = tiny_spo_args(tiny_world, tiny_spm, tmp_path / "continued", f"model.init_lora={lora}")
    tr = Trainer(load_config(SPOConfig, None, args), log=lambda m: None).setup()
    save_lora(tr.acc.unwrap_model(tr.unet), tmp_path, 4, 4.0)  # what the policy holds before any step
    saved, now = (load_file(str(d / "pytorch_lora_weights.safetensors")) for d in (lora, tmp_path))
    assert saved.keys() == now.keys() and all(torch.equal(saved[k], now[k]) for k in saved)
    assert any(k.endswith("lora.up.weight") and now[k].abs().sum() > 0 for k in now)  # fresh adapters have B = 0
    assert len(tr.trainable) == len(saved) and all(p.requires_grad and p.dtype == torch.float32 for p in tr.trainable)

    for extra, message in [(["model.lora_rank=8"], "set model.lora_rank=4"),
                           (["model.lora_targets=to_q,to_k"], "set model.lora_targets=to_k,to_q,to_v,to_out.0"),
                           ([f"model.pretrained={tiny_world / 'clip'}"], "was trained on"),
                           (["model.init_lora=/nonexistent/lora"], "is not a LoRA folder")]:
        cfg = load_config(SPOConfig, None, args + extra)
        with pytest.raises(SPOError, match=message):
            Trainer(cfg, log=lambda m: None).setup()
    with pytest.raises(SPOError, match="needs model.use_lora=true"):
        load_config(SPOConfig, None, args + ["model.use_lora=false"])


def test_tracker_project_and_run_name_reach_the_trackers(tiny_world, tiny_spm, tmp_path):
    from types import SimpleNamespace

    from conftest import tiny_spo_args
    from spo.config import LogConfig
    from spo.runtime import init_trackers, run_name
    from spo.trainer import Trainer

    out = tmp_path / "run"
    cfg = load_config(SPOConfig, None, tiny_spo_args(tiny_world, tiny_spm, out, "train.num_epochs=1",
                                                      "log.report_to=tensorboard", "log.run_name=lr-sweep-1"))
    Trainer(cfg, log=lambda m: None).setup().train()
    events = (out / "logs").rglob("events.out.tfevents.*")
    assert {p.relative_to(out / "logs").parts[0] for p in events} == {"lr-sweep-1"}
    assert run_name(LogConfig(output_dir="runs/spo-sd15/")) == "spo-sd15"  # the default: the run folder's name

    seen = {}
    record = lambda project, config, init_kwargs: seen.update(project=project, **init_kwargs)  # noqa: E731
    fake = SimpleNamespace(is_main_process=True, log_with=["wandb"], logging_dir=str(tmp_path), init_trackers=record)
    init_trackers(fake, "my-study", {"a": 1}, "wandb", "lr-sweep-1")
    assert seen == {"project": "my-study", "wandb": {"name": "lr-sweep-1"}}


def test_run_summary_names_every_output_and_its_snippet_loads_the_lora(pushed_run, tiny_world):
    from spo.trainer import run_summary

    import copy

    cfg, lora, _ = pushed_run
    cfg = copy.deepcopy(cfg)
    cfg.log.report_to, cfg.log.validation_prompts = "tensorboard", ["a red circle"]
    out = lora.parent
    text = run_summary(cfg, lora)
    for where in (lora, out / "checkpoints", out / "metrics.jsonl", out / "curves.png", out / "validation",
                  out / "logs" / out.name, "https://huggingface.co/alice/spo-tiny"):
        assert str(where) in text
    snippet = text.split("load it in diffusers:\n")[1]
    assert f'pipe = DiffusionPipeline.from_pretrained("{tiny_world / "sd"}")' in snippet
    assert f'pipe.load_lora_weights("{lora.resolve()}")' in snippet
    code = "\n".join(line.strip() for line in snippet.splitlines() if "image = pipe(" not in line)
    namespace = {}
    exec(code, namespace)  # ready to paste: stock diffusers loads the base and the LoRA from it
    assert namespace["pipe"].get_active_adapters()


def test_curves_show_plain_tick_values_and_labelled_axes():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from spo.plots import readable_axes

    fig, (before, after) = plt.subplots(1, 2)
    for ax in (before, after):
        ax.plot([1, 2, 3], [0.99999, 1.0, 1.00001])
    readable_axes(after, "epoch", "reward_accuracy")
    fig.canvas.draw()
    assert before.yaxis.get_major_formatter().get_offset() != ""  # what matplotlib does unasked
    assert after.yaxis.get_major_formatter().get_offset() == ""
    assert not any("e" in t.get_text() for t in after.get_yticklabels())
    assert (after.get_xlabel(), after.get_ylabel()) == ("epoch", "reward_accuracy")
    plt.close(fig)


def test_adamw8bit_without_bitsandbytes_fails_before_any_work(monkeypatch, tmp_path):
    from spo.errors import SPOError
    from spo.trainer import Trainer

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails, as where it is not installed
    cfg = load_config(SPOConfig, "world", ["train.optimizer=adamw8bit", f"log.output_dir={tmp_path / 'run'}"])
    with pytest.raises(SPOError, match="pip install bitsandbytes"):
        Trainer(cfg, log=lambda m: None).setup()
    assert not (tmp_path / "run").exists()
    with pytest.raises(SPOError, match="train.optimizer must be one of adamw, adamw8bit"):
        load_config(SPOConfig, "world", ["train.optimizer=sgd"])


def test_push_uploads_exactly_the_lora_folder_and_dry_run_lists_it(pushed_run, tmp_path, monkeypatch):
    import shutil

    import huggingface_hub
    from click.testing import CliRunner
    from safetensors.torch import load_file, save_file

    from spo.cli import cli
    from spo.errors import SPOError
    from spo.hub import push_lora

    cfg, lora, calls = pushed_run
    files = ["pytorch_lora_weights.safetensors", "README.md", "spo_lora.json", "training_config.yaml"]
    assert calls == [("create_repo", ("alice/spo-tiny",), {"private": False, "exist_ok": True}),
                     ("upload_folder", (), {"repo_id": "alice/spo-tiny", "folder_path": str(lora), "allow_patterns": files,
                                            "commit_message": f"Upload SPO LoRA from {lora.parent.name}"})]

    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **k: pytest.fail("a dry run uploads nothing"))
    result = CliRunner().invoke(cli, ["push", str(lora.parent), "--repo-id", "bob/x", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert [line.strip() for line in result.output.splitlines() if line.startswith("  ")] == files
    assert f"would upload 4 files of {lora} to bob/x" in result.output

    with pytest.raises(SPOError, match="USER/NAME"):
        push_lora(lora.parent, "no-slash", dry_run=True)
    with pytest.raises(SPOError, match="push_to_hub=true needs log.hub_repo_id"):
        load_config(SPOConfig, "world", ["log.push_to_hub=true"])
    broken = tmp_path / "broken"
    shutil.copytree(lora, broken)
    (broken / "README.md").unlink()
    with pytest.raises(SPOError, match="lacks README.md"):
        push_lora(broken, "bob/x", dry_run=True)
    (broken / "README.md").write_text("card")
    weights = load_file(str(broken / "pytorch_lora_weights.safetensors"))
    save_file({k: v * float("nan") for k, v in weights.items()}, str(broken / "pytorch_lora_weights.safetensors"))
    with pytest.raises(SPOError, match="NaN"):
        push_lora(broken, "bob/x", dry_run=True)

"""Every mistake a user can make on the command line, one row each: exit code != 0, one line on stderr
that names the offending input (never a traceback), and the files already in the folders involved untouched.

Rows run the real entry point `spo.cli.main` in-process (the same code as the `spo` script, much faster);
`test_the_installed_command_agrees` runs a few of them as a subprocess too.
"""

import subprocess
import sys

import pytest

from spo.cli import main

TRAIN = ["train", "--config", "world", "model.pretrained={world}/sd", "model.spm=scorer:world-utility",
         "log.output_dir={prior}", "log.report_to=none", "train.num_epochs=1", "--overwrite"]
SPM = ["train-spm", "data.dataset={world}/preference", "model.diffusion_model={world}/sd",
       "model.base={world}/pickscore", "log.output_dir={prior}", "log.report_to=none", "train.max_steps=1",
       "--overwrite"]
GEN = ["generate", "--pretrained", "{world}/sd", "--prompt", "a red circle", "--steps", "1", "--out", "{prior}"]
SAMPLE = ["world", "sample", "--world", "{world}", "--steps", "1", "-n", "1", "--out", "{prior}"]
EVAL = ["evaluate", "--model", "base={world}/sd", "--num-prompts", "1", "--steps", "1", "--out", "{prior}"]

# (row id, arguments, a fragment the one-line message must contain, fails before loading any model)
ROWS = [
    ("checkpointing_epochs=0", TRAIN + ["log.checkpointing_epochs=0"], "log.checkpointing_epochs", True),
    ("train-spm checkpointing_steps<0", SPM + ["log.checkpointing_steps=-1"], "log.checkpointing_steps", True),
    ("log_every=0", TRAIN + ["log.log_every=0"], "log.log_every", True),
    ("learning_rate=inf", TRAIN + ["train.learning_rate=inf"], "train.learning_rate", True),
    ("learning_rate=-1", TRAIN + ["train.learning_rate=-1"], "train.learning_rate", True),
    ("guidance_scale=nan", TRAIN + ["sample.guidance_scale=nan"], "sample.guidance_scale", True),
    ("generate --guidance nan", GEN + ["--guidance", "nan"], "--guidance", True),
    ("world sample --guidance nan", SAMPLE + ["--guidance", "nan"], "--guidance", True),
    ("evaluate --guidance inf", EVAL + ["--guidance", "inf"], "--guidance", True),
    ("evaluate-spm --guidance nan", ["evaluate-spm", "--guidance", "nan", "--out", "{prior}"], "--guidance", True),
    ("train.seed=-1", TRAIN + ["train.seed=-1"], "train.seed", True),
    ("generate --seed -1", GEN + ["--seed", "-1"], "--seed", True),
    ("evaluate --seed -1", EVAL + ["--seed", "-1"], "--seed", True),
    ("world sample --seed -1", SAMPLE + ["--seed", "-1"], "--seed", True),
    ("override of a group's leaf", TRAIN + ["train.num_epochs.x=1"], "train.num_epochs", True),
    ("conflicting overrides", TRAIN + ["train.num_epochs=1", "train.num_epochs.x=1"], "train.num_epochs.x=1", True),
    ("bad YAML in an override", TRAIN + ["train.learning_rate=[1,"], "train.learning_rate=[1,", True),
    ("binary --config", ["train", "--config", "{binary}"], "binary.yaml", True),
    ("missing --config", ["train", "--config", "{tmp}/nope.yaml"], "nope.yaml", True),
    ("evaluate --device bogus", EVAL + ["--device", "bogus"], "--device bogus", True),
    ("train --method bogus", TRAIN + ["--method", "bogus"], "--method", True),
    ("model.spm: empty folder", TRAIN + ["model.spm={tmp}/empty_spm"], "empty_spm", False),
    ("model.spm: garbage config.json", TRAIN + ["model.spm={tmp}/garbage_clip"], "garbage_clip", False),
    ("model.spm: garbage spm_config.json", TRAIN + ["model.spm={tmp}/garbage_spm"], "spm_config.json", False),
    ("generate --lora with a bad spo_lora.json", GEN + ["--lora", "{tmp}/bad_lora"], "spo_lora.json", True),
    ("unmatched model.lora_targets", TRAIN + ["model.lora_targets=[to_q,nosuchmodule]"], "nosuchmodule", False),
    ("train-spm train.t_max=1000", SPM + ["train.t_max=1000"], "train.t_max", False),
    ("checkpoints_total_limit=0", TRAIN + ["log.checkpoints_total_limit=0"], "log.checkpoints_total_limit", True),
    ("unknown key", TRAIN + ["train.nosuch=1"], "train.nosuch", True),
    ("YAML path without --config", ["train", "configs/world.yaml"], "--config configs/world.yaml", True),
    ("evaluate a missing LoRA", ["evaluate", "--model", "x={world}/sd+{tmp}/missing_lora", "--out", "{prior}"],
     "missing_lora", True),
    ("demo over a folder it did not write", ["demo", "--out", "{tmp}/thesis", "--overwrite"], "did not write", True),
    ("demo over an earlier demo, no --overwrite", ["demo", "--out", "{tmp}/old_demo"], "--overwrite", True),
]


@pytest.fixture
def places(tmp_path, tiny_world):
    """Folders a user points the commands at, each already holding files that must survive."""
    prior = tmp_path / "prior"  # an earlier run (train and train-spm markers), and the user's notes
    (prior / "lora").mkdir(parents=True)
    (prior / "run.json").write_text('{"digest": "earlier"}')
    (prior / "config.yaml").write_text("train:\n  num_epochs: 3\n")
    (prior / "notes.txt").write_text("do not lose me")
    (prior / "lora" / "pytorch_lora_weights.safetensors").write_bytes(b"\x00weights" * 64)
    (tmp_path / "binary.yaml").write_bytes(bytes(range(256)) * 8)
    (tmp_path / "empty_spm").mkdir()
    (tmp_path / "garbage_clip").mkdir()
    (tmp_path / "garbage_clip" / "config.json").write_text("{not json")
    (tmp_path / "garbage_spm").mkdir()
    (tmp_path / "garbage_spm" / "spm_config.json").write_text("{not json")
    (tmp_path / "bad_lora").mkdir()
    (tmp_path / "bad_lora" / "spo_lora.json").write_text("{not json")
    (tmp_path / "bad_lora" / "pytorch_lora_weights.safetensors").write_bytes(b"\x00" * 64)
    (tmp_path / "thesis" / "train").mkdir(parents=True)
    (tmp_path / "thesis" / "train" / "thesis.tex").write_text("years of work")
    (tmp_path / "old_demo" / "train").mkdir(parents=True)
    (tmp_path / "old_demo" / "demo.json").write_text("{}")
    (tmp_path / "old_demo" / "report.md").write_text("# SPO on the embedded world: base vs tuned\n")
    (tmp_path / "old_demo" / "train" / "run.json").write_text('{"digest": "earlier"}')
    return dict(world=tiny_world, prior=prior, tmp=tmp_path, binary=tmp_path / "binary.yaml")


def _snapshot(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _assert_one_line_refusal(code, err, fragment, early):
    assert code not in (0, None), err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err  # one message, the last thing said
    assert fragment in errors[0], errors[0]
    if early:  # refused before any model was loaded: nothing else on stderr at all
        assert lines == errors, err


@pytest.mark.parametrize("row, args, fragment, early", ROWS, ids=[r[0] for r in ROWS])
def test_a_bad_input_is_one_line_and_touches_nothing(row, args, fragment, early, places, capsys):
    before = _snapshot(places["tmp"])
    with pytest.raises(SystemExit) as exit_:
        main([a.format(**places) for a in args])
    _assert_one_line_refusal(exit_.value.code, capsys.readouterr().err, fragment, early)
    assert _snapshot(places["tmp"]) == before  # no file changed, none removed, none added


@pytest.mark.parametrize("row", ["bad YAML in an override", "generate --guidance nan", "binary --config"])
def test_the_installed_command_agrees(row, places):
    _, args, fragment, early = next(r for r in ROWS if r[0] == row)
    proc = subprocess.run([sys.executable, "-m", "spo.cli", *(a.format(**places) for a in args)],
                          capture_output=True, text=True, timeout=300)
    _assert_one_line_refusal(proc.returncode, proc.stderr, fragment, early)
    assert proc.stdout == ""


def test_demo_replaces_only_an_earlier_demo_and_only_when_asked(tmp_path):
    from spo.demo import check_demo_output
    from spo.errors import SPOError

    check_demo_output(tmp_path / "fresh", overwrite=False)  # nothing there yet
    old = tmp_path / "old"
    (old / "train").mkdir(parents=True)
    (old / "train" / "run.json").write_text("{}")
    with pytest.raises(SPOError, match="did not write"):
        check_demo_output(old, overwrite=True)  # no marker: never replaced
    (old / "report.md").write_text("# SPO on the embedded world: base vs tuned\n")  # a demo from before the marker
    check_demo_output(old, overwrite=True)  # the Trainer then replaces train/ once the new run has loaded
    (old / "report.md").unlink()
    (old / "demo.json").write_text("{}")
    check_demo_output(old, overwrite=True)
    with pytest.raises(SPOError, match="--overwrite"):
        check_demo_output(old, overwrite=False)

"""The command line: help, a working sample run, and one-line errors (never a traceback) on bad input."""

import json
import shutil
import subprocess
import sys

from click.testing import CliRunner

from spo.cli import cli


def run_spo(*args):
    return subprocess.run([sys.executable, "-m", "spo.cli", *map(str, args)], capture_output=True, text=True, timeout=300)


def test_help_lists_the_world_commands():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for command in ("world", "demo"):
        assert command in result.output
    result = CliRunner().invoke(cli, ["world", "--help"])
    for command in ("build", "sample", "info"):
        assert command in result.output


def test_world_sample_writes_a_grid_and_scores(tiny_world, tmp_path):
    result = CliRunner().invoke(cli, ["world", "sample", "--world", str(tiny_world), "--steps", "2", "--out",
                                      str(tmp_path / "s"), "--prompt", "a red circle", "--prompt", "a large blue square"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["n"] == 2 and 0 <= summary["utility_mean"] <= 1
    assert (tmp_path / "s" / "samples.png").stat().st_size > 0


def _assert_one_line_error(proc, *fragments):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    for fragment in fragments:
        assert fragment in proc.stderr


def test_missing_world_directory(tmp_path):
    _assert_one_line_error(run_spo("world", "info", "--world", tmp_path / "nope"), "does not exist", "spo world build")


def test_corrupt_world_manifest(tiny_world, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_world, broken)
    (broken / "world.json").write_text("{not json")
    _assert_one_line_error(run_spo("world", "info", "--world", broken), "corrupt")


def test_corrupt_model_weights(tiny_world, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_world, broken)
    weights = next((broken / "sd" / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    proc = run_spo("world", "sample", "--world", broken, "--steps", "1", "-n", "1", "--out", tmp_path / "o")
    _assert_one_line_error(proc, "could not load", "--force")


def test_unknown_option():
    proc = run_spo("world", "build", "--bogus")
    assert proc.returncode == 2 and "No such option" in proc.stderr and "Traceback" not in proc.stderr


def test_unwritable_output_path(tiny_world, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = run_spo("world", "sample", "--world", tiny_world, "--out", blocker / "sub", "-n", "1", "--steps", "1")
    _assert_one_line_error(proc, "cannot write")


def test_prompt_outside_the_grammar(tiny_world, tmp_path):
    proc = run_spo("world", "sample", "--world", tiny_world, "--prompt", "a cat", "--out", tmp_path / "o")
    _assert_one_line_error(proc, "outside the world's grammar")

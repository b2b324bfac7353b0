"""Reliability: one run per folder (the run lock), checkpoint manifests with fallback on resume, a full disk
or a permission problem said in one line, and train-spm's data report (distinct rows, written as it goes)."""

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from conftest import tiny_spo_args
from spo.config import SPOConfig, load_config
from spo.errors import SPOError
from spo.runtime import LOCK_NAME, RunLock, rotate_checkpoints, verify_manifest, write_manifest
from spo.trainer import Trainer


def _trainer(world, spm, out, *extra, log=None, **kw):
    cfg = load_config(SPOConfig, None, tiny_spo_args(world, spm, out, *extra))
    return Trainer(cfg, log=log or (lambda m: None), **kw).setup()


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------------ one run per folder


def test_a_second_process_is_refused_a_locked_folder_and_touches_nothing(tiny_world, tiny_spm, tmp_path):
    run, world = tmp_path / "run", tmp_path / "world"
    for folder, marker in ((run, "run.json"), (world, "world.json")):
        folder.mkdir()
        (folder / marker).write_text("{}")
        (folder / "weights.bin").write_bytes(b"\x01" * 64)
    before = {f: _files(f) for f in (run, world)}
    commands = [
        ["train", *tiny_spo_args(tiny_world, tiny_spm, run, "train.num_epochs=1"), "--overwrite"],
        ["world", "build", "--tiny", "--force", "--out", str(world)],
    ]
    with RunLock(run), RunLock(world, option="--out"):
        for argv in commands:
            proc = subprocess.run([sys.executable, "-m", "spo.cli", *argv], capture_output=True, text=True, timeout=300)
            lines = proc.stderr.strip().splitlines()
            assert proc.returncode != 0, proc.stderr
            assert f"is in use by pid {os.getpid()} on {socket.gethostname()} since" in lines[-1], proc.stderr
            assert "Traceback" not in proc.stderr
    assert {f: _files(f) for f in (run, world)} == before  # --overwrite and --force deleted nothing
    assert not (run / LOCK_NAME).exists() and not (world / LOCK_NAME).exists()


def test_a_stale_lock_is_taken_over_and_another_hosts_lock_is_refused(tmp_path):
    notes = []
    dead = _dead_pid()
    (tmp_path / LOCK_NAME).write_text(json.dumps(dict(pid=dead, host=socket.gethostname(), started="then")))
    lock = RunLock(tmp_path, log=notes.append).acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert len(notes) == 1 and f"pid {dead}, no longer running" in notes[0]
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()

    (tmp_path / LOCK_NAME).write_text(json.dumps(dict(pid=dead, host="elsewhere", started="then")))
    with pytest.raises(SPOError, match=f"in use by pid {dead} on elsewhere since then; wait for it") as exc:
        RunLock(tmp_path).acquire()
    assert "\n" not in str(exc.value) and "delete" in str(exc.value)
    assert json.loads((tmp_path / LOCK_NAME).read_text())["host"] == "elsewhere"  # left as it was


def test_the_lock_is_released_after_a_run_an_error_and_an_interrupt(tiny_world, tiny_spm, tmp_path, monkeypatch):
    out = tmp_path / "run"
    tr = _trainer(tiny_world, tiny_spm, out, "train.num_epochs=1")
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    tr.train()
    assert not (out / LOCK_NAME).exists()
    with pytest.raises(SPOError, match="already holds a run"):  # an error in setup
        _trainer(tiny_world, tiny_spm, out, "train.num_epochs=1")
    assert not (out / LOCK_NAME).exists()

    tr = _trainer(tiny_world, tiny_spm, out, "train.num_epochs=2", resume="latest")

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(tr, "train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tr.train()
    assert not (out / LOCK_NAME).exists()
    missing = tmp_path / "never"
    with pytest.raises(SPOError):  # a run that stops before writing anything leaves no folder behind
        _trainer(tiny_world, tiny_spm, missing, "train.num_epochs=1", resume="latest")
    assert not missing.exists()


# ------------------------------------------------------------------ manifests and fallback


def test_resume_latest_skips_a_damaged_checkpoint_and_ends_like_the_uninterrupted_run(tiny_world, tiny_spm, tmp_path):
    out = tmp_path / "run"
    _trainer(tiny_world, tiny_spm, out, "log.checkpoints_total_limit=3").train()  # epoch-1, epoch-2
    lora = load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))
    losses = _losses(out)
    newest = out / "checkpoints" / "epoch-2"
    assert verify_manifest(newest) is None and verify_manifest(out / "checkpoints" / "epoch-1") is None
    spare = tmp_path / "spare"
    shutil.copytree(out, spare)

    weights = newest / "trainable.safetensors"  # one flipped byte in the middle of the weights
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    logs = []
    tr = _trainer(tiny_world, tiny_spm, out, "log.checkpoints_total_limit=3", resume="latest", log=logs.append)
    assert tr.epoch == 1
    assert "[resume] skipping checkpoint epoch-2: trainable.safetensors does not match its sha256 checksum" in logs
    tr.train()
    resumed = load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))
    for name, value in lora.items():  # epoch 2 trained again from epoch-1: the same weights
        torch.testing.assert_close(resumed[name], value, rtol=1e-5, atol=1e-7)
    assert _losses(out) == pytest.approx(losses, rel=1e-5)

    (spare / "checkpoints" / "epoch-2" / "optimizer.pt").unlink()  # a lost file
    logs = []
    tr = _trainer(tiny_world, tiny_spm, spare, resume="latest", log=logs.append)
    assert tr.epoch == 1 and "[resume] skipping checkpoint epoch-2: optimizer.pt is missing" in logs
    tr.lock.release()
    with pytest.raises(SPOError, match="cannot resume from .*epoch-2: optimizer.pt is missing; name another"):
        _trainer(tiny_world, tiny_spm, spare, resume=str(spare / "checkpoints" / "epoch-2"))
    (spare / "checkpoints" / "epoch-1" / "manifest.json").write_text("{")
    with pytest.raises(SPOError, match=r"no intact checkpoint .*epoch-2: optimizer.pt is missing; epoch-1: manifest"):
        _trainer(tiny_world, tiny_spm, spare, resume="latest")

    # a checkpoint written before manifests existed still resumes, with a warning
    legacy = spare / "checkpoints" / "epoch-1"
    (legacy / "manifest.json").unlink()
    state = json.loads((legacy / "state.json").read_text())
    del state["manifest"]
    (legacy / "state.json").write_text(json.dumps(state))
    logs = []
    tr = _trainer(tiny_world, tiny_spm, spare, resume="latest", log=logs.append)
    assert tr.epoch == 1 and any("epoch-1 has no manifest.json" in line for line in logs)
    tr.lock.release()


def test_rotation_never_deletes_the_checkpoint_just_written(tmp_path):
    for name in ("epoch-1", "epoch-2", "epoch-3"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
    # resumed from epoch-1 past a damaged epoch-2 and epoch-3; epoch-2 was just written again
    rotate_checkpoints(tmp_path, "epoch", 1, keep=tmp_path / "checkpoints" / "epoch-2")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch-2"]


def test_manifest_names_what_is_wrong(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.bin").write_bytes(b"abc")
    write_manifest(tmp_path)
    assert verify_manifest(tmp_path) is None
    (tmp_path / "sub" / "a.bin").write_bytes(b"abcd")
    assert verify_manifest(tmp_path) == "sub/a.bin is 4 bytes, its manifest says 3"


# ------------------------------------------------------------------ a full disk, a read-only folder


def test_a_full_disk_while_saving_fails_in_one_line_and_keeps_the_previous_checkpoint(tiny_world, tiny_spm, tmp_path,
                                                                                      monkeypatch):
    out = tmp_path / "run"
    _trainer(tiny_world, tiny_spm, out, "train.num_epochs=1").train()
    previous = _files(out / "checkpoints" / "epoch-1")
    real_save = torch.save

    def full_disk(obj, path, *a, **k):
        if "optimizer" in str(path):
            Path(path).write_bytes(b"\0" * 1000)  # part of the file made it to disk
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(obj, path, *a, **k)

    tr = _trainer(tiny_world, tiny_spm, out, "train.num_epochs=2", resume="latest")
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(SPOError) as exc:
        tr.train()
    message = str(exc.value)
    assert "\n" not in message and message.startswith(f"could not write {out / 'checkpoints' / 'epoch-2'}: no space")
    assert "while writing optimizer.pt after" in message and "removed epoch-2.partial" in message
    assert "--resume latest" in message
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch-1"]  # no .partial left
    assert _files(out / "checkpoints" / "epoch-1") == previous
    assert verify_manifest(out / "checkpoints" / "epoch-1") is None
    assert not (out / LOCK_NAME).exists()


def test_a_read_only_file_is_said_in_one_line_and_other_errors_pass_through(tmp_path, monkeypatch):
    from spo.files import atomic_directory, atomic_write_text

    target = tmp_path / "report.json"
    target.write_text("old")

    def read_only(self, data):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Path, "write_bytes", read_only)
    with pytest.raises(SPOError, match="could not write .*report.json: read-only file system after 0 of 3 bytes"):
        atomic_write_text(target, "new")
    monkeypatch.undo()
    assert target.read_text() == "old" and not (tmp_path / "report.json.tmp").exists()

    with pytest.raises(ValueError, match="not a disk problem"):
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "x").write_text("x")
            raise ValueError("not a disk problem")
    assert list(tmp_path.iterdir()) == [target]


# ------------------------------------------------------------------ train-spm's data report


def test_data_report_counts_distinct_rows_not_draws():
    import io

    from PIL import Image

    from spo.preference.data import DataReport, PairCollator

    buf = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buf, format="PNG")
    ok = buf.getvalue()
    rows = [dict(caption="a", jpg_0=ok, jpg_1=ok, label_0=1.0, label_1=0.0, _row=0),
            dict(caption="a", jpg_0=b"bad", jpg_1=ok, label_0=1.0, label_1=0.0, _row=1)]
    collate = PairCollator(resolution=32)
    for _ in range(3):  # three epochs over the same two rows
        collate(rows)
    expected = {"pairs used": 1, "rows seen": 2, "skipped: undecodable image": 1}
    assert collate.report.summary() == expected
    other = DataReport()  # another process (or a checkpoint) saw row 5 too
    other.add(5, {"rows seen": 1})
    collate.report.merge(json.loads(json.dumps(other.state())))
    collate.report.merge(collate.report.state())  # merging what it already knows counts nothing twice
    assert collate.report.summary() == dict(expected, **{"rows seen": 3})


def test_train_spm_data_report_is_written_as_the_run_goes(tiny_world, tmp_path, monkeypatch):
    from spo.cli import cli
    from spo.preference.spm import StepAwareCLIP

    def killed(*a, **k):
        raise RuntimeError("killed")

    monkeypatch.setattr(StepAwareCLIP, "save_pretrained", killed)  # the run dies before its final save
    out = tmp_path / "spm"
    result = CliRunner().invoke(cli, [
        "train-spm", f"data.dataset={tiny_world / 'preference'}", f"model.diffusion_model={tiny_world / 'sd'}",
        f"model.base={tiny_world / 'pickscore'}", f"log.output_dir={out}", "train.batch_size=4", "train.max_steps=5",
        "log.log_every=2", "log.checkpointing_steps=0", "log.report_to=none"])
    assert isinstance(result.exception, RuntimeError)
    report = json.loads((out / "data_report.json").read_text())
    # 5 steps of 4 = 20 draws from the 12 training pairs: every pair counted once
    assert report["steps"] == 5 and report["rows seen"] == 12 and report["pairs used"] == 12
    assert json.loads((out / "checkpoints" / "step-5" / "data_report.json").read_text())["rows"]
    assert not (out / LOCK_NAME).exists()

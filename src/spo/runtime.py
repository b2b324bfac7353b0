"""Run scaffolding shared by every trainer (`spo train`, `spo train-spm`): the accelerator, trackers,
random streams, checkpoint discovery and rotation, output-folder guard, fingerprints, the run lock (one run
per folder) and checkpoint manifests (sizes and sha256 of every file, verified on resume).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import re
import resource
import shutil
import socket
import tempfile
import time
import uuid
from pathlib import Path

import torch

from spo.errors import SPOError
from spo.files import keep_newest


TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_tracker(report_to: str) -> None:
    """Fail before any work when the tracker's package is missing (accelerate would only warn)."""
    import importlib.util

    names = list(TRACKER_PACKAGES) if report_to == "all" else [report_to] if report_to in TRACKER_PACKAGES else []
    missing = [n for n in names if importlib.util.find_spec(TRACKER_PACKAGES[n]) is None]
    if missing:
        raise SPOError(f"log.report_to={report_to} needs {' and '.join(missing)} (pip install {' '.join(missing)}), "
                       f"or set log.report_to=none")


def make_accelerator(out: Path, mixed_precision: str, gradient_accumulation_steps: int, report_to: str):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    check_tracker(report_to)

    return Accelerator(
        cpu=not torch.cuda.is_available(),  # so that a multi-process launch on CPUs forms one group
        mixed_precision=mixed_precision, gradient_accumulation_steps=gradient_accumulation_steps,
        log_with=None if report_to == "none" else report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")))


def flat_config(plain: dict, prefix: str = "") -> dict:
    """Nested config dict -> {"group.field": scalar}, the form trackers accept as hyperparameters."""
    out = {}
    for k, v in plain.items():
        if isinstance(v, dict):
            out.update(flat_config(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float, str, bool)):
            out[prefix + k] = v
    return out


def init_trackers(accelerator, project: str, plain_config: dict, report_to: str, run_name: str = "") -> None:
    """Start the trackers: wandb's project `project` and run `run_name`; TensorBoard in logs/<run_name>."""
    if report_to == "none" or not accelerator.is_main_process:
        return
    if run_name:
        from accelerate.tracking import TensorBoardTracker

        # accelerate would name the TensorBoard folder after the project: one folder per run reads better
        # in `tensorboard --logdir OUT/logs` and keeps a resumed run in its own folder.
        accelerator.log_with = [TensorBoardTracker(run_name, accelerator.logging_dir) if str(t) == "tensorboard"
                                else t for t in accelerator.log_with]
    accelerator.init_trackers(project, config=flat_config(plain_config),
                              init_kwargs={"wandb": {"name": run_name}} if run_name else None)


def run_name(log_cfg) -> str:
    """The tracker run name: log.run_name, or the output folder's name."""
    return log_cfg.run_name or Path(log_cfg.output_dir).resolve().name


# Every random stream of a run has a named purpose; adding one = appending a name (never reorder).
PURPOSES = ("sample", "share", "shuffle", "dpo_order", "dpo_noise", "spm_noise", "prompt_order")


def stream(seed: int, epoch: int, rank: int, purpose: str, index: int = 0) -> torch.Generator:
    """The generator of one (seed, epoch, process, purpose, index) random stream.

    The five numbers go through numpy's SeedSequence (a hash designed for exactly this), so no two
    streams of a run share a seed, unlike any arithmetic mix of small integers.
    """
    import numpy as np

    entropy = [seed, epoch, rank, PURPOSES.index(purpose), index]
    hi, lo = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed((int(hi) << 32 | int(lo)) & 0x7FFF_FFFF_FFFF_FFFF)


def numbered(out: Path, prefix: str) -> list[Path]:
    """Checkpoint folders `<prefix>-N[-word-M...]` under out/checkpoints (never `.partial` ones), oldest first.

    Ordered by their numbers as a tuple: epoch-2 < epoch-2-round-5 < epoch-3.
    """
    found = [p for p in (out / "checkpoints").glob(f"{prefix}-*") if re.fullmatch(rf"{prefix}-\d+(-[a-z]+-\d+)*", p.name)]
    return sorted(found, key=lambda p: tuple(int(n) for n in re.findall(r"\d+", p.name)))


def rotate_checkpoints(out: Path, prefix: str, limit: int, keep: Path | None = None) -> None:
    """Keep the `limit` newest checkpoints, and always `keep` (the one just written): after a resume that fell
    back past a damaged checkpoint, that damaged one is numbered newer but must not outlive the intact one."""
    if keep is None:
        keep_newest(numbered(out, prefix), limit)
    else:
        keep_newest([p for p in numbered(out, prefix) if p != keep], limit - 1)


def check_output_dir(out: Path, marker: str, overwrite: bool, resume: bool) -> None:
    """Refuse, before any work, to write over a run unless asked (--overwrite) or continuing it (--resume)."""
    if resume or overwrite or not (out / marker).exists():
        return
    raise SPOError(f"{out} already holds a run; pass --overwrite to replace it, "
                   f"--resume to continue it, or choose another log.output_dir")


def replace_old_run(out: Path, marker: str, overwrite: bool, resume: bool, accelerator) -> None:
    """--overwrite: delete the old run, only now that the new one has loaded everything it needs, and only
    a folder that carries our marker file (never a folder of someone else's files)."""
    if resume or not overwrite or not (out / marker).exists():
        return
    if accelerator.is_main_process:
        for child in out.iterdir():
            if child.name != LOCK_NAME:  # the lock this run holds stays until the run ends
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    accelerator.wait_for_everyone()


def assert_finite(state: dict[str, torch.Tensor], what: str) -> None:
    """Never write non-finite weights: a NaN LoRA draws black images and looks like a result."""
    bad = [name for name, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise SPOError(f"refusing to save {what}: {len(bad)} tensors hold NaN/inf (e.g. {bad[0]}); lower the "
                       f"learning rate or use mixed_precision=bf16/no, and resume from the last good checkpoint")


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def weights_fingerprint(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------- one run per folder

LOCK_NAME = ".spo.lock"


class RunLock:
    """One run per output folder: `<dir>/.spo.lock` says who holds it (pid, host, start time).

    The file is created with O_CREAT|O_EXCL, so of two runs started on one folder only one gets it; the
    other stops with a one-line error before it touches anything. A lock whose process is gone (same host,
    pid not running) is taken over, and so is one an earlier object of this same process still holds (a
    Trainer set up and never trained, in a notebook). `active=False` (the other processes of a
    multi-process launch: the launch is one run, its main process locks) makes every call a no-op.
    """

    def __init__(self, directory: str | Path, option: str = "log.output_dir", log=print, active: bool = True):
        self.dir, self.option, self.log, self.active = Path(directory), option, log, active
        self.path = self.dir / LOCK_NAME
        self.record = dict(pid=os.getpid(), host=socket.gethostname(), started=time.strftime("%Y-%m-%d %H:%M:%S"),
                           token=uuid.uuid4().hex)
        self.held = self.created_dir = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> "RunLock":
        if not self.active or self.held:
            return self
        self.created_dir = not self.dir.exists()
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SPOError(f"cannot create {self.dir}: {exc.strerror or exc}; pick another {self.option}") from None
        with _lock_guard(self.path):
            holder = _read_lock(self.path)
            if holder != {} or not self._create():
                holder = holder if holder != {} else _read_lock(self.path)  # {}: another host's, just made
                why = self._stale(holder)
                if why is None:
                    self._refuse(holder)
                self._take_over(holder, why)
        self.held = True
        atexit.register(self.release)  # a process that never reaches release() still frees the folder
        return self

    def release(self) -> None:
        """Remove the lock file if it is still ours (never one a later run took over)."""
        if not self.held:
            return
        self.held = False
        atexit.unregister(self.release)
        try:
            with _lock_guard(self.path):
                if (_read_lock(self.path, wait=False) or {}).get("token") == self.record["token"]:
                    self.path.unlink()
            if self.created_dir:
                self.dir.rmdir()  # a run that stopped before writing anything leaves no empty folder behind
        except OSError:
            pass  # the folder is gone or not empty: nothing left to undo

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:  # another host's run, between our read and now
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(self.record))
        return True

    def _stale(self, holder: dict | None) -> str | None:
        """Why `holder`'s lock may be taken over (None: it is a live run's)."""
        if holder is None:
            return "an unreadable lock file"
        if holder.get("host") != self.record["host"]:
            return None  # another machine's process: we cannot tell whether it runs
        if holder.get("pid") == os.getpid():
            return "this process's own earlier lock"
        return None if _pid_alive(holder.get("pid")) else f"pid {holder.get('pid')}, no longer running"

    def _take_over(self, holder: dict | None, why: str) -> None:
        tmp = self.path.with_name(f"{LOCK_NAME}.{self.record['token']}")
        tmp.write_text(json.dumps(self.record))
        os.replace(tmp, self.path)  # atomic: never a moment without a lock file
        mine = _read_lock(self.path, wait=False) or {}
        if mine.get("token") != self.record["token"]:  # another host replaced it meanwhile
            self._refuse(mine)
        since = f" (since {holder.get('started')})" if holder else ""
        self.log(f"[lock] {self.dir}: took over a stale lock: {why}{since}")

    def _refuse(self, holder: dict) -> None:
        elsewhere = holder.get("host") != self.record["host"]
        raise SPOError(f"{self.dir} is in use by pid {holder.get('pid', '?')} on {holder.get('host', '?')} since "
                       f"{holder.get('started', '?')}; wait for it, or pick another {self.option}"
                       + (f" (if that run is gone, delete {self.path})" if elsewhere else ""))


def _lock_guard(path: Path):
    """A host-local mutex around reading, creating, taking over and removing one lock file, so that two
    processes that both find a stale lock cannot both take it over. (Takeover is same-host only, so a
    mutex in this host's temp folder suffices.)"""
    from filelock import FileLock  # a dependency of torch

    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    return FileLock(Path(tempfile.gettempdir()) / f"spo-lock-{key}.guard", timeout=60)


def _read_lock(path: Path, wait: bool = True) -> dict | None:
    """The lock's record, {} when there is no lock, None when it stays unreadable (a writer died mid-write).

    A lock just created by another host may still be empty for a moment, hence the short retries.
    """
    for _ in range(10 if wait else 1):
        try:
            record = json.loads(path.read_text())
            if isinstance(record, dict):
                return record
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            pass
        if wait:
            time.sleep(0.1)
    return None


def _pid_alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0 or os.name == "nt":  # on Windows signal 0 would be a Ctrl-C
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, someone else's
        return True
    return True


# ---------------------------------------------------------------- checkpoint manifests

MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: Path) -> Path:
    """The last file of a checkpoint: every other file's relative path, size and sha256, so that a resume
    can tell a complete checkpoint from one damaged since (a flipped bit, a truncated copy, a lost file)."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {p.relative_to(directory).as_posix(): dict(size=p.stat().st_size, sha256=_sha256(p)) for p in files}
    path = directory / MANIFEST
    path.write_text(json.dumps(dict(format=1, files=entries), indent=1))
    return path


def verify_manifest(directory: Path) -> str | None:
    """Why `directory` is not the checkpoint its manifest describes; None when every file is intact."""
    try:
        entries = json.loads((directory / MANIFEST).read_text())["files"]
        items = list(entries.items())
    except FileNotFoundError:
        return f"{MANIFEST} is missing"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"{MANIFEST} is unreadable ({type(exc).__name__})"
    for rel, want in items:
        path = directory / rel
        try:
            if (size := path.stat().st_size) != want["size"]:
                return f"{rel} is {size} bytes, its manifest says {want['size']}"
            if _sha256(path) != want["sha256"]:
                return f"{rel} does not match its sha256 checksum"
        except FileNotFoundError:
            return f"{rel} is missing"
        except OSError as exc:
            return f"{rel} is unreadable ({exc.strerror or exc})"
    return None


def checkpoint_problem(ckpt: Path, marker: str, log=print) -> str | None:
    """Why `ckpt` cannot be resumed from; None when it can.

    A checkpoint whose marker file (written just before the manifest) does not promise a manifest was
    written by an earlier version: it is accepted unverified, with a warning, so that old runs still resume.
    """
    if not ckpt.is_dir():
        return "no such checkpoint folder"
    try:
        state = json.loads((ckpt / marker).read_text())
    except FileNotFoundError:
        state = None
    except (OSError, ValueError):
        state = {}
    if (ckpt / MANIFEST).exists() or (isinstance(state, dict) and state.get("manifest")):
        return verify_manifest(ckpt)
    if state is None:
        return f"{marker} is missing (its save never finished)"
    if not isinstance(state, dict) or not state:
        return f"{marker} is unreadable"
    log(f"[resume] warning: {ckpt.name} has no {MANIFEST} (written by an earlier spo version); its files are not "
        f"verified")
    return None


def resume_checkpoint(out: Path, prefix: str, marker: str, where: str, log=print) -> Path:
    """The checkpoint `--resume WHERE` continues from, verified against its manifest.

    "latest": the newest intact `<prefix>-N` under out/checkpoints; each damaged newer one is skipped with
    one log line saying why. A named folder that is damaged is refused: the user asked for that one.
    """
    if where != "latest":
        ckpt = Path(where)
        if (problem := checkpoint_problem(ckpt, marker, log)) is not None:
            raise SPOError(f"cannot resume from {ckpt}: {problem}; name another checkpoint, or pass --resume latest "
                           f"for the newest intact one")
        return ckpt
    skipped = []
    for ckpt in reversed(numbered(out, prefix)):
        if (problem := checkpoint_problem(ckpt, marker, log)) is None:
            return ckpt
        log(f"[resume] skipping checkpoint {ckpt.name}: {problem}")
        skipped.append(f"{ckpt.name}: {problem}")
    found = f" ({'; '.join(skipped)})" if skipped else ""
    raise SPOError(f"no intact checkpoint to resume from in {out / 'checkpoints'}{found}; start the run again "
                   f"without --resume (with --overwrite)")


def is_main_process() -> bool:
    """Whether this is its launch's main process, asked before any Accelerator exists (the one
    make_accelerator builds later shares this state)."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available()).is_main_process

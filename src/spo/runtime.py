"""Run scaffolding shared by every trainer (`spo train`, `spo train-spm`): the accelerator, trackers,
random streams, checkpoint discovery and rotation, output-folder guard, fingerprints.
"""

from __future__ import annotations

import hashlib
import re
import resource
import shutil
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


def init_trackers(accelerator, project: str, plain_config: dict, report_to: str) -> None:
    if report_to != "none" and accelerator.is_main_process:
        accelerator.init_trackers(project, config=flat_config(plain_config))


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


def latest_checkpoint(out: Path, prefix: str, marker: str) -> Path | None:
    """The newest `<prefix>-N` checkpoint that holds `marker` (the file written last)."""
    done = [p for p in numbered(out, prefix) if (p / marker).is_file()]
    return done[-1] if done else None


def rotate_checkpoints(out: Path, prefix: str, limit: int) -> None:
    keep_newest(numbered(out, prefix), limit)


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
        shutil.rmtree(out)
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

"""Writing files and directories so that a crash never leaves one that looks complete."""

from __future__ import annotations

import errno
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from spo.errors import SPOError

# Failures a user fixes outside the program (free space, permissions), said as such instead of a traceback.
DISK_ERRORS = {errno.ENOSPC: "no space left on device", getattr(errno, "EDQUOT", -1): "disk quota exceeded",
               errno.EACCES: "permission denied", errno.EROFS: "read-only file system"}


@contextmanager
def atomic_directory(final: str | Path):
    """Yield `<final>.partial` to write into; it replaces `final` only if the block finishes.

    A block that fails leaves no `.partial` behind; a full disk or a permission problem becomes a one-line
    SPOError (saying what was being written) instead of a traceback.
    """
    final = Path(final)
    tmp = final.with_name(final.name + ".partial")
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        yield tmp
    except BaseException as exc:
        written = _bytes_under(tmp)
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-written folder behind
        if (why := disk_error(exc)) is None:
            raise
        raise SPOError(f"could not write {final}: {why}{_at(exc, tmp)} after {written} bytes; removed {tmp.name}, and "
                       f"what was complete before (e.g. the previous checkpoint) is intact; free space or fix "
                       f"permissions, then run again (training continues with --resume latest)") from None
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` whole or not at all: a temporary name in the same directory, then a rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")  # same directory, so the rename never crosses file systems
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException as exc:
        written = tmp.stat().st_size if tmp.is_file() else 0
        tmp.unlink(missing_ok=True)
        if (why := disk_error(exc)) is None:
            raise
        raise SPOError(f"could not write {path}: {why} after {written} of {len(data)} bytes; removed {tmp.name}, and "
                       f"{path.name} keeps its previous content (if any); free space or fix permissions, then run "
                       f"again") from None
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """`atomic_write_bytes` for text (UTF-8)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def keep_newest(directories: list[Path], limit: int) -> None:
    """Delete all but the `limit` last of `directories` (given oldest first)."""
    for old in directories[: max(0, len(directories) - limit)]:
        shutil.rmtree(old)


def disk_error(exc: BaseException) -> str | None:
    """What a failed write ran into when the user has to fix it (space, quota, permissions), else None.

    safetensors and torch.save report an OS error inside their own exception's text, hence the text match.
    """
    if isinstance(exc, OSError) and exc.errno in DISK_ERRORS:
        return DISK_ERRORS[exc.errno]
    text = str(exc)
    for known in ("No space left on device", "Disk quota exceeded", "Read-only file system"):
        if known in text:
            return known.lower()
    return None


def _at(exc: BaseException, tmp: Path) -> str:
    """' while writing NAME' for the file the OS error names, relative to the folder being written."""
    name = getattr(exc, "filename", None)
    if not name:
        return ""
    try:
        rel = Path(name).relative_to(tmp)
        return f" while writing {rel}" if rel != Path(".") else ""
    except ValueError:
        return f" while writing {name}"


def _bytes_under(directory: Path) -> int:
    """How much was written into `directory` before a failure (0 when it is gone or unreadable)."""
    total = 0
    for p in directory.rglob("*") if directory.is_dir() else []:
        try:
            total += p.stat().st_size if p.is_file() else 0
        except OSError:
            pass
    return total

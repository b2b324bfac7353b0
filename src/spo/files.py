"""Writing files and directories so that a crash never leaves one that looks complete."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_directory(final: str | Path):
    """Yield `<final>.partial` to write into; it replaces `final` only if the block finishes."""
    final = Path(final)
    tmp = final.with_name(final.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    yield tmp
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` whole or not at all: a temporary name in the same directory, then a rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")  # same directory, so the rename never crosses file systems
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """`atomic_write_bytes` for text (UTF-8)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def keep_newest(directories: list[Path], limit: int) -> None:
    """Delete all but the `limit` last of `directories` (given oldest first)."""
    for old in directories[: max(0, len(directories) - limit)]:
        shutil.rmtree(old)

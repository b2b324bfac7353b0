"""Writing directories so that a crash never leaves one that looks complete."""

from __future__ import annotations

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


def keep_newest(directories: list[Path], limit: int) -> None:
    """Delete all but the `limit` last of `directories` (given oldest first)."""
    for old in directories[: max(0, len(directories) - limit)]:
        shutil.rmtree(old)

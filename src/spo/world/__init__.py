"""The embedded world: a small, fully local stand-in for "Stable Diffusion + human preferences"
in which the true preference is known (see README, "The embedded world")."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from spo.errors import SPOError

REQUIRED = ("tokenizer", "clip", "sd", "preference", "pickscore")  # spm is added by `spo train-spm`


def default_world_dir() -> Path:
    """The world shipped inside the package (built by `spo world build`)."""
    return Path(str(resources.files("spo") / "assets" / "world"))


def resolve(value: str) -> str:
    """"world:NAME" -> the path of artifact NAME in the packaged world; anything else unchanged."""
    if isinstance(value, str) and value.startswith("world:"):
        return str(default_world_dir() / value[len("world:"):])
    return value


def open_world(path: str | Path | None = None) -> Path:
    """Check that a world directory is complete and return it; raise SPOError saying how to fix it."""
    world = Path(path) if path is not None else default_world_dir()
    hint = f"rebuild it with `spo world build --out {world}`"
    if not world.is_dir():
        raise SPOError(f"world directory {world} does not exist; {hint}")
    manifest = world / "world.json"
    try:
        json.loads(manifest.read_text())
    except FileNotFoundError:
        raise SPOError(f"{world} is not a complete world (no world.json); {hint}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise SPOError(f"{manifest} is corrupt; {hint}") from None
    missing = [name for name in REQUIRED if not (world / name).is_dir()]
    if missing:
        raise SPOError(f"world {world} is missing {', '.join(missing)}; {hint}")
    return world


def load_pipeline(world: Path):
    """The world's StableDiffusionPipeline, loaded exactly as a hub checkpoint would be."""
    from spo.models import load_pipeline as load_sd

    try:
        return load_sd(world / "sd")
    except SPOError as exc:
        raise SPOError(f"{exc}; rebuild with `spo world build --out {world} --force`") from None

"""Plug-ins: packages that add named things to the core without the core importing them.

A plug-in is a module with a `register()` function, declared in its package's metadata under the
entry-point group `spo.plugins` (the embedded world declares `world = "spo.world.plugin:register"`).
`register()` adds, for example, a path prefix ("world:sd" -> a directory) or named prompt sets.
The core asks this module, and this module loads the declared plug-ins the first time it is asked;
nothing in the core names a plug-in.
"""

from __future__ import annotations

from typing import Callable

from spo.errors import SPOError

PATH_PREFIXES: dict[str, Callable[[str], str]] = {}  # "world" -> fn("sd") -> "/.../assets/world/sd"
PROMPT_SETS: dict[str, Callable[[str], list[str]]] = {}  # "world" -> fn("test") -> prompts
_loaded = False


def register_path_prefix(prefix: str, to_path: Callable[[str], str]) -> None:
    PATH_PREFIXES[prefix] = to_path


def register_prompt_sets(prefix: str, load: Callable[[str], list[str]]) -> None:
    PROMPT_SETS[prefix] = load


def load_plugins() -> None:
    """Call `register()` of every installed `spo.plugins` entry point, once per process."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group="spo.plugins"):
        ep.load()()


def _split(value) -> tuple[str, str] | None:
    if not isinstance(value, str) or ":" not in value or "/" in value.split(":", 1)[0]:
        return None
    prefix, name = value.split(":", 1)
    return (prefix, name) if prefix and len(prefix) > 1 else None  # "C:" (a drive) is not a prefix


def resolve(value: str) -> str:
    """"PREFIX:NAME" -> the path a plug-in gives it; anything else unchanged."""
    parts = _split(value)
    if parts is None:
        return value
    load_plugins()
    prefix, name = parts
    return PATH_PREFIXES[prefix](name) if prefix in PATH_PREFIXES else value


def named_prompts(value: str) -> list[str] | None:
    """The prompts of a plug-in's named set ("world:test"), or None when no plug-in owns the prefix."""
    parts = _split(value)
    if parts is None:
        return None
    load_plugins()
    prefix, name = parts
    if prefix not in PROMPT_SETS:
        return None
    return PROMPT_SETS[prefix](name)


def require_known(value: str, what: str) -> None:
    """Fail early for "PREFIX:NAME" whose prefix no installed plug-in owns."""
    parts = _split(value)
    if parts is not None:
        load_plugins()
        if parts[0] not in PATH_PREFIXES and parts[0] not in PROMPT_SETS and parts[0] not in ("spo", "http", "https"):
            raise SPOError(f"{what} {value!r}: no installed plug-in handles the prefix {parts[0]!r}")

"""Plug-ins: packages that add named things to the core without the core importing them.

A plug-in is a module with a `register()` function, declared in its package's metadata under the
entry-point group `spo.plugins` (the embedded world declares `world = "spo.world.plugin:register"`).
`register()` adds, with the `register_*` functions below:

- a path prefix ("world:sd" -> a directory), read by `resolve`;
- named prompt sets ("world:test" -> prompts), read by `named_prompts`;
- scorers by name (`spo.scorers.load_scorer("world-utility")`), read by `scorers`;
- the default scorers for prompts it owns (`spo evaluate` without --scorer), read by `default_scorers`;
- reference judges for `spo evaluate-spm` on preference pairs it owns, read by `spm_references`.

The core asks this module, and this module loads the declared plug-ins the first time it is asked;
nothing in the core names a plug-in. Everything is a plain dict or list of functions.
"""

from __future__ import annotations

from typing import Any, Callable

from spo.errors import SPOError

PATH_PREFIXES: dict[str, Callable[[str], str]] = {}  # "world" -> fn("sd") -> "/.../assets/world/sd"
PROMPT_SETS: dict[str, Callable[[str], list[str]]] = {}  # "world" -> fn("test") -> prompts
SCORERS: dict[str, Callable[..., Any]] = {}  # "world-utility" -> factory(weights, device, **options) -> scorer
# fn(prompts) -> scorer specs when the plug-in owns every prompt, else None
DEFAULT_SCORERS: list[Callable[[list[str]], list[str] | None]] = []
# fn(pairs) -> {"reference_judges": {name: judge(x0_images, captions) -> scores}, "ceiling": accuracy}, either
# key optional, {} for pairs the plug-in does not know; see spo.preference.evaluate_spm.evaluate_spm
SPM_REFERENCES: list[Callable[[Any], dict]] = []
_loaded = False


def register_path_prefix(prefix: str, to_path: Callable[[str], str]) -> None:
    PATH_PREFIXES[prefix] = to_path


def register_prompt_sets(prefix: str, load: Callable[[str], list[str]]) -> None:
    PROMPT_SETS[prefix] = load


def register_scorer(name: str, factory: Callable[..., Any]) -> None:
    """`factory(weights: str | None, device: str, **options)` returns a scorer (`name`, `score(images, prompts)`)."""
    SCORERS[name] = factory


def register_default_scorers(choose: Callable[[list[str]], list[str] | None]) -> None:
    DEFAULT_SCORERS.append(choose)


def register_spm_references(references: Callable[[Any], dict]) -> None:
    SPM_REFERENCES.append(references)


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


def scorers() -> dict[str, Callable[..., Any]]:
    """Scorer factories the plug-ins add, by name."""
    load_plugins()
    return SCORERS


def default_scorers(prompts: list[str]) -> list[str] | None:
    """The first plug-in's choice of scorers for these prompts, or None when no plug-in owns them."""
    load_plugins()
    for choose in DEFAULT_SCORERS:
        if chosen := choose(prompts):
            return chosen
    return None


def spm_references(pairs) -> dict:
    """The first plug-in's reference judges and label ceiling for these preference pairs, as keyword
    arguments of `evaluate_spm`; {} when no plug-in knows them."""
    load_plugins()
    for references in SPM_REFERENCES:
        if found := references(pairs):
            return found
    return {}

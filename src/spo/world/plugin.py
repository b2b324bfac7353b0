"""The embedded world as a plug-in of the core: `world:NAME` paths and `world:SPLIT` prompt sets.

Declared in pyproject.toml under the `spo.plugins` entry-point group; `spo.plugins` calls
`register()` the first time the core meets a prefixed name.
"""

from __future__ import annotations

from spo import plugins


def _path(name: str) -> str:
    from spo.world import default_world_dir

    return str(default_world_dir() / name)


def _prompts(split: str) -> list[str]:
    from spo.errors import SPOError
    from spo.world.prompts import SPLITS, split_prompts

    if split not in SPLITS:
        raise SPOError(f"unknown world prompt split {split!r}; choose one of {', '.join(SPLITS)}")
    return split_prompts(0)[split]


def register() -> None:
    plugins.register_path_prefix("world", _path)
    plugins.register_prompt_sets("world", _prompts)

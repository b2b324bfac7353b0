"""The embedded world as a plug-in of the core: `world:NAME` paths, `world:SPLIT` prompt sets, the
`world-utility` and `world-pickscore` scorers (the defaults on world prompts), and the reference judges
of `spo evaluate-spm` on world pairs.

Declared in pyproject.toml under the `spo.plugins` entry-point group; `spo.plugins` calls
`register()` the first time the core asks for a plug-in's contribution. The functions registered
here import the world only when called, so registering costs nothing.
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


def _world_utility(weights, device, **options):
    from spo.world.scorers import world_utility

    return world_utility(weights, device, **options)


def _world_utility_logit(weights, device, **options):
    from spo.world.scorers import world_utility_logit

    return world_utility_logit(weights, device, **options)


def _world_pickscore(weights, device, **options):
    from spo.world.scorers import world_pickscore

    return world_pickscore(weights, device, **options)


def _default_scorers(prompts: list[str]) -> list[str] | None:
    from spo.world.scorers import default_scorers

    return default_scorers(prompts)


def _spm_references(pairs) -> dict:
    from spo.world.scorers import spm_references

    return spm_references(pairs)


def register() -> None:
    plugins.register_path_prefix("world", _path)
    plugins.register_prompt_sets("world", _prompts)
    plugins.register_scorer("world-utility", _world_utility)
    plugins.register_scorer("world-utility-logit", _world_utility_logit)
    plugins.register_scorer("world-pickscore", _world_pickscore)
    plugins.register_default_scorers(_default_scorers)
    plugins.register_spm_references(_spm_references)

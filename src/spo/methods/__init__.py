"""Training methods by name. A method owns how its training data is produced and its batch loss;
the trainer (`spo.trainer`) is generic. Adding a method = one module here + one `register_method`.

A method is a class built as `cls(cfg)` (the whole `SPOConfig`) with:
  load_data(trainer)            before the models load (prompts, datasets); fail early on bad data
  load_models(trainer)          after the diffusion model loads (judges, ...) onto trainer.acc.device
  batches(trainer, epoch, start) yields the epoch's training micro-batches from position `start` (it may
                                sample in between), and a `SafePoint(position)` wherever the epoch could
                                stop and later restart at `position` (a checkpoint or a clean stop)
  loss(trainer, batch)          -> (scalar loss, {metric: float}) under autocast, with gradients
  epoch_metrics()               -> {metric: value} of the epoch just finished (pairs, sampling stats)
"""

from __future__ import annotations

from spo.errors import SPOError
from spo.methods.base import SafePoint

__all__ = ["METHODS", "SafePoint", "get_method", "register_method"]

METHODS: dict[str, type] = {}


def register_method(name: str, cls: type) -> None:
    METHODS[name] = cls


def get_method(name: str) -> type:
    _register_builtin()
    if name not in METHODS:
        raise SPOError(f"method must be one of {', '.join(sorted(METHODS))}, got {name!r}")
    return METHODS[name]


def _register_builtin() -> None:
    from spo.methods.diffusion_dpo import DiffusionDPO
    from spo.methods.spo import SPO

    METHODS.setdefault("spo", SPO)
    METHODS.setdefault("diffusion-dpo", DiffusionDPO)

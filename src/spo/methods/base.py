"""What methods and the trainer share: the safe-point marker of a method's batch stream."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SafePoint:
    """Yielded by `Method.batches` between batches: the epoch can be checkpointed and restarted here."""

    position: int  # what `batches(trainer, epoch, start=position)` needs to continue from this point

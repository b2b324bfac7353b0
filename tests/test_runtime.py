"""Run scaffolding: named random streams never coincide."""

import itertools

import torch

from spo.runtime import PURPOSES, stream


def test_no_two_named_streams_coincide_over_a_grid_of_ranks_purposes_epochs_and_indices():
    seen = {}
    for seed, epoch, rank, purpose, index in itertools.product((0, 1), range(8), range(8), PURPOSES, range(6)):
        first = int(torch.randint(2**62, (1,), generator=stream(seed, epoch, rank, purpose, index)))
        key = (seed, epoch, rank, purpose, index)
        assert first not in seen, f"{key} draws the same numbers as {seen[first]}"
        seen[first] = key
    # the old arithmetic mix collided here: (rank=2, purpose=1) == (rank=0, purpose=15)
    assert len(seen) == 2 * 8 * 8 * len(PURPOSES) * 6


def test_a_stream_is_reproducible():
    a = torch.rand(4, generator=stream(3, 2, 1, "sample"))
    b = torch.rand(4, generator=stream(3, 2, 1, "sample"))
    assert torch.equal(a, b)

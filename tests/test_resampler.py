"""Step-wise resampler invariants, with the tiny world's model and a controllable fake scorer."""

import pytest
import torch

from spo.models import Diffusion, load_pipeline
from spo.resampler import resample


class FakeSPM(torch.nn.Module):
    """Scores an image by its mean brightness (times `scale`); records the timesteps it was asked about."""

    def __init__(self, scale=100.0):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(scale), requires_grad=False)
        self.seen_t = []

    def forward(self, images, captions, t):
        self.seen_t += t.tolist()
        return self.scale * images.mean(dim=(1, 2, 3))


@pytest.fixture(scope="module")
def diffusion(tiny_world):
    return Diffusion(load_pipeline(tiny_world / "sd"))


def _run(diffusion, spm, prompts, threshold=0.0, k=4, steps=6, divert=2, seed=0, inner=0):
    return resample(diffusion, spm, prompts, num_steps=steps, guidance=5.0, eta=1.0, num_candidates=k,
                    threshold=threshold, divert_start_step=divert, generator=torch.Generator().manual_seed(seed),
                    inner_steps=inner)


def test_pairs_come_from_diverted_steps_and_share_x_t(diffusion):
    prompts = ["a red circle", "a blue square above a yellow triangle", "a small green diamond"]
    result = _run(diffusion, FakeSPM(), prompts)
    pairs = result.pairs
    assert len(pairs) == len(prompts) * (6 - 2)  # threshold 0: every diverted step of every prompt
    assert pairs.step_index.min() >= 2
    assert set(pairs.prompt_index.tolist()) == {0, 1, 2}
    # win and lose are different draws from the same Gaussian around the shared x_t
    assert not torch.equal(pairs.win, pairs.lose)
    assert pairs.win.shape == pairs.lose.shape == pairs.x_t.shape
    # the winner is the brighter candidate after decoding, by construction of the fake scorer
    assert (pairs.gap > 0).all()
    assert result.final_latents.shape == (3, 4, 16, 16)


def test_each_candidate_is_scored_at_the_next_timestep_and_the_last_at_zero(diffusion):
    spm = FakeSPM()
    result = _run(diffusion, spm, ["a red circle"], steps=4, divert=1, k=3)
    sched_t = [t for t, _ in diffusion.schedule(4)]
    expected = [t for t in sched_t[2:] for _ in range(3)] + [0, 0, 0]
    assert spm.seen_t == expected
    assert [s.timestep for s in result.stats] == sched_t[1:]


def test_threshold_is_respected_and_counts_add_up(diffusion):
    prompts = ["a red circle"] * 4
    for threshold in (0.0, 0.3, 0.9):
        result = _run(diffusion, FakeSPM(scale=5.0), prompts, threshold=threshold)
        assert (result.pairs.gap > threshold).all()
        assert len(result.pairs) == sum(s.kept for s in result.stats)
        assert sum(s.candidates for s in result.stats) == len(prompts) * 4
    assert len(_run(diffusion, FakeSPM(scale=5.0), prompts, threshold=0.9).pairs) < len(
        _run(diffusion, FakeSPM(scale=5.0), prompts, threshold=0.0).pairs)


def test_continuation_is_chosen_uniformly_not_greedily(diffusion):
    result = _run(diffusion, FakeSPM(), ["a red circle"] * 24, k=4, steps=10, divert=2)
    counts = torch.tensor([s.chosen_rank_counts for s in result.stats]).sum(0).float()
    n = counts.sum()
    assert n == 24 * 8
    expected = n / 4
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 16.3, counts  # chi-square, 3 dof, p = 0.001


def test_same_generator_gives_the_same_pairs(diffusion):
    a = _run(diffusion, FakeSPM(), ["a red circle", "a blue square"], seed=3)
    b = _run(diffusion, FakeSPM(), ["a red circle", "a blue square"], seed=3)
    torch.testing.assert_close(a.pairs.win, b.pairs.win)
    torch.testing.assert_close(a.final_latents, b.final_latents)


def test_inner_steps_keep_every_transition_of_the_best_and_worst_chains(diffusion):
    result = _run(diffusion, FakeSPM(), ["a red circle", "a blue square"], steps=6, divert=1, inner=1)
    p = result.pairs
    assert [s.step_index for s in result.stats] == [1, 3, 5]  # branch every 2 steps
    assert len(p) == 2 * 5  # every diverted transition of both prompts
    assert int(p.shared.sum()) == 2 * 3  # only the first transition of a chain shares x_t
    assert torch.equal(p.x_t[p.shared], p.x_t_lose[p.shared])
    for prompt in (0, 1):
        rows = (p.prompt_index == prompt).nonzero().flatten()
        by_step = {int(p.step_index[r]): r for r in rows}
        for first, second in ((1, 2), (3, 4)):  # the chain continues from its own previous state
            assert torch.equal(p.x_t[by_step[second]], p.win[by_step[first]])
            assert torch.equal(p.x_t_lose[by_step[second]], p.lose[by_step[first]])

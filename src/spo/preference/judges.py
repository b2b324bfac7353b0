"""Step judges: what scores the resampler's candidates, `judge(images, captions, t) -> scores`.

`images` are decoded x0-predictions in [-1, 1] (B, 3, H, W), `t` the timestep they were predicted at.
A step-aware preference model uses t; any image scorer of the registry (`spo.scorers`) can judge too,
blind to t — the paper's "naive" ablation, or, with a ground truth such as the embedded world's
utility, an oracle that separates how good the judge is from how good the algorithm is.
"""

from __future__ import annotations

import torch

SCORER_PREFIX = "scorer:"


class ScorerJudge(torch.nn.Module):
    """A registry scorer (`score(images HxWx3 in [0, 1], prompts)`) as a step judge; ignores t."""

    def __init__(self, scorer):
        super().__init__()
        self.scorer = scorer

    def forward(self, images: torch.Tensor, captions: list[str], t: torch.Tensor) -> torch.Tensor:
        pixels = ((images.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
        return torch.as_tensor(self.scorer.score(pixels, list(captions)), dtype=torch.float32, device=images.device)


def load_step_judge(spec: str, device) -> torch.nn.Module:
    """`scorer:NAME[=WEIGHTS]` -> a registry scorer as judge; anything else -> an SPM / CLIP (see load_scorer_model)."""
    if spec.startswith(SCORER_PREFIX):
        from spo.scorers import load_scorer

        return ScorerJudge(load_scorer(spec[len(SCORER_PREFIX):], device=str(device)))
    from spo.plugins import resolve
    from spo.preference.spm import load_scorer_model

    return load_scorer_model(resolve(spec)).eval().requires_grad_(False).to(device)

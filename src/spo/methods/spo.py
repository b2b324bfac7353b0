"""The SPO loss: DPO on a single denoising transition, with the ratio clipped in log space."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def spo_loss(log_ratio_win: torch.Tensor, log_ratio_lose: torch.Tensor, beta: float, eps: float):
    """−log σ(β (clip(log r_w) − clip(log r_l))), clip to [log(1−ε), log(1+ε)].

    Clipping the log-ratio (never exp-then-clamp) keeps the loss and its gradient finite however far
    the policy drifts: outside the band the gradient is exactly zero instead of 0 × inf.
    Returns the mean loss and the per-pair implicit reward margin β (log r_w − log r_l) before clipping.
    """
    lo, hi = math.log(1 - eps), math.log(1 + eps)
    wd = torch.float64 if log_ratio_win.dtype == torch.float64 else torch.float32
    clipped_w = log_ratio_win.to(wd).clamp(lo, hi)
    clipped_l = log_ratio_lose.to(wd).clamp(lo, hi)
    loss = -F.logsigmoid(beta * (clipped_w - clipped_l))
    return loss.mean(), beta * (log_ratio_win.to(wd) - log_ratio_lose.to(wd)).detach()

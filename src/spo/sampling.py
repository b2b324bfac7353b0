"""Diffusion maths as pure functions of tensors: x0-prediction and the noising of clean latents."""

from __future__ import annotations

import torch


def alphas_cumprod_at(scheduler, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """ᾱ_t for per-sample timesteps, shaped to broadcast against `like` (B, C, H, W)."""
    ac = scheduler.alphas_cumprod.to(device=like.device, dtype=torch.float32)[t.long().to(like.device)]
    return ac.view(-1, *([1] * (like.ndim - 1)))


def add_noise(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε."""
    a = alphas_cumprod_at(scheduler, t, x0)
    return (a.sqrt() * x0.float() + (1 - a).sqrt() * noise.float()).to(x0.dtype)


def predict_x0(scheduler, x_t: torch.Tensor, model_output: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The model's estimate of the clean sample at x_t, for epsilon-, v- and sample-prediction models."""
    a = alphas_cumprod_at(scheduler, t, x_t)
    x, out = x_t.float(), model_output.float()
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        x0 = (x - (1 - a).sqrt() * out) / a.sqrt()
    elif kind == "v_prediction":
        x0 = a.sqrt() * x - (1 - a).sqrt() * out
    elif kind == "sample":
        x0 = out
    else:
        raise ValueError(f"unsupported prediction_type {kind!r}")
    return x0.to(x_t.dtype)

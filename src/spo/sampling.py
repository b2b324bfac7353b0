"""Diffusion maths as pure functions of tensors: x0-prediction and the noising of clean latents."""

from __future__ import annotations

import math

import torch


def work_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64 (reference computations), else float32 (never half)."""
    return torch.float64 if any(x.dtype == torch.float64 for x in tensors) else torch.float32


def alphas_cumprod_at(scheduler, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """ᾱ_t for per-sample timesteps, shaped to broadcast against `like` (B, C, H, W)."""
    ac = scheduler.alphas_cumprod.to(device=like.device, dtype=work_dtype(like))[t.long().to(like.device)]
    return ac.view(-1, *([1] * (like.ndim - 1)))


def add_noise(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε."""
    wd = work_dtype(x0, noise)
    a = alphas_cumprod_at(scheduler, t, x0.to(wd))
    return (a.sqrt() * x0.to(wd) + (1 - a).sqrt() * noise.to(wd)).to(x0.dtype)


def predict_x0(scheduler, x_t: torch.Tensor, model_output: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The model's estimate of the clean sample at x_t, for epsilon-, v- and sample-prediction models."""
    wd = work_dtype(x_t, model_output)
    x, out = x_t.to(wd), model_output.to(wd)
    a = alphas_cumprod_at(scheduler, t, x)
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


# ------------------------------------------------------------------ DDIM as a Gaussian transition


def ddim_schedule(scheduler, num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The DDIM sampling schedule for `num_steps`: timesteps t_i and the step each leads to (−1 = the end).

    Computed on a copy of the scheduler, so the caller's scheduler state never decides the maths.
    """
    s = type(scheduler).from_config(scheduler.config)
    s.set_timesteps(num_steps)
    t = s.timesteps.long()
    return t, t - scheduler.config.num_train_timesteps // num_steps


def _alpha_prev(scheduler, prev_t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    ac = scheduler.alphas_cumprod.to(device=like.device, dtype=like.dtype)
    final = torch.as_tensor(float(scheduler.final_alpha_cumprod), device=like.device, dtype=like.dtype)
    prev = prev_t.to(like.device).long()
    a = torch.where(prev >= 0, ac[prev.clamp(min=0)], final)
    return a.view(-1, *([1] * (like.ndim - 1)))


def ddim_transition(scheduler, model_output: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor,
                    x_t: torch.Tensor, eta: float):
    """Mean and std of the DDIM transition p(x_{t_prev} | x_t) (Song et al. eq. 12), and the x0-prediction.

    Per-sample timesteps `t` and the steps they lead to, `t_prev` (B,; negative = the final step). Follows diffusers' DDIMScheduler.step exactly (same mean, and the
    same sample for the same noise), computed in float32 even for half-precision model outputs.
    """
    wd = work_dtype(x_t, model_output)
    x, out = x_t.to(wd), model_output.to(wd)
    a_t = alphas_cumprod_at(scheduler, t, x)
    a_prev = _alpha_prev(scheduler, torch.as_tensor(t_prev).to(x.device), x)
    x0 = predict_x0(scheduler, x, out, t)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        eps = out
    elif kind == "v_prediction":
        eps = a_t.sqrt() * out + (1 - a_t).sqrt() * x
    else:
        eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
    if scheduler.config.clip_sample:
        r = scheduler.config.clip_sample_range
        x0 = x0.clamp(-r, r)
        eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = eta * variance.clamp(min=0).sqrt()
    mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).clamp(min=0).sqrt() * eps
    return mean, std, x0


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, std²), averaged over all but the batch dimension (as DDPO/SPO do)."""
    wd = work_dtype(x, mean, std)
    x, mean, std = x.to(wd), mean.to(wd), std.to(wd)
    lp = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return lp.mean(dim=tuple(range(1, x.ndim)))


def transition_log_ratio(x: torch.Tensor, mean_policy: torch.Tensor, mean_ref: torch.Tensor,
                         std: torch.Tensor) -> torch.Tensor:
    """log p_θ(x) − log p_ref(x) for two Gaussians of the same std, in closed form and fp32.

    ((μ_θ − μ_ref)·(2x − μ_θ − μ_ref)) / (2σ²), averaged like `gaussian_log_prob`. Subtracting two
    large log-probs instead loses most digits at the last, low-σ steps.
    """
    wd = work_dtype(x, mean_policy, mean_ref, std)
    x, mp, mr, std = x.to(wd), mean_policy.to(wd), mean_ref.to(wd), std.to(wd)
    per_dim = (mp - mr) * (2 * x - mp - mr) / (2 * std**2)
    return per_dim.mean(dim=tuple(range(1, x.ndim)))


def denoising_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet is trained to output at (x_t, t): ε, v or x0, by the scheduler's prediction type."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, t)
    if kind == "sample":
        return latents
    raise ValueError(f"unsupported prediction_type {kind!r}")

"""Rectified-flow maths as pure functions of tensors: noising, x0-prediction and two Gaussian transitions.

Flow time t in [0, 1], t = 1 is pure noise: x_t = (1 − t)·x0 + t·ε, and the model predicts the velocity
v = ε − x0 (diffusers calls t the sigma and feeds the network 1000·t). The ODE sampler (Euler, as
diffusers' flow-matching scheduler steps) has no transition density; SPO needs one, so each step here is a
Gaussian with a closed-form mean and std whose chain keeps the ODE's marginals (Flow-GRPO's SDE), or the
DDIM-style posterior step. Both reduce to the Euler step at zero noise. Log-probs and log-ratios are
`spo.sampling.gaussian_log_prob` / `transition_log_ratio`, as for DDIM. Per-sample `t`, `t_prev` (B,)
with t_prev < t; results in float32 (float64 when an input is float64), never half.
"""

from __future__ import annotations

import torch

from spo.sampling import work_dtype


def _per_sample(t, like: torch.Tensor) -> torch.Tensor:
    """Per-sample times (B,) (or a number) shaped (B, 1, ...) to broadcast against `like`."""
    t = torch.as_tensor(t, device=like.device).to(like.dtype)
    return t.reshape(-1, *([1] * (like.ndim - 1)))


def flow_noised(x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
    """x_t = (1 − t)·x0 + t·ε."""
    wd = work_dtype(x0, noise)
    x0w = x0.to(wd)
    s = _per_sample(t, x0w)
    return ((1 - s) * x0w + s * noise.to(wd)).to(x0.dtype)


def flow_x0(x_t: torch.Tensor, velocity: torch.Tensor, t) -> torch.Tensor:
    """The clean-sample estimate x0 = x_t − t·v."""
    wd = work_dtype(x_t, velocity)
    x = x_t.to(wd)
    return (x - _per_sample(t, x) * velocity.to(wd)).to(x_t.dtype)


def flow_sde_transition(velocity: torch.Tensor, t, t_prev, x_t: torch.Tensor, noise_level: float):
    """Mean, std and x0-prediction of Flow-GRPO's SDE step x_t -> x_{t_prev} (Liu et al. 2025, arXiv 2505.05470).

    With σ_t = a·sqrt(t / (1 − t)) and dt = t_prev − t < 0:
        mean = x_t + (v + σ_t² / (2t) · (x_t + (1 − t)·v))·dt,   std = σ_t·sqrt(−dt),
    where x_t + (1 − t)·v is the noise estimate ε̂. The reverse SDE with this diffusion has the ODE's
    marginals; a = 0 is the Euler step. σ_t is infinite at t = 1: there the 1 − t inside it is taken at
    t_prev (Flow-GRPO's use of the schedule's second sigma, for any step that starts at t = 1).
    """
    wd = work_dtype(x_t, velocity)
    x, v = x_t.to(wd), velocity.to(wd)
    s, s_prev = _per_sample(t, x), _per_sample(t_prev, x)
    dt = s_prev - s
    s_sigma = torch.where(s >= 1, s_prev, s)  # where σ_t's 1 − t is evaluated
    drift_scale = noise_level**2 / (2 * (1 - s_sigma))  # σ_t² / (2t), with t cancelled
    mean = x + (v + drift_scale * (x + (1 - s) * v)) * dt
    std = noise_level * (s / (1 - s_sigma)).sqrt() * (-dt).clamp(min=0).sqrt()
    return mean, std, x - s * v


def flow_ddim_transition(velocity: torch.Tensor, t, t_prev, x_t: torch.Tensor, eta: float):
    """Mean, std and x0-prediction of the DDIM-style flow step (Song et al. eq. 12 with α = 1 − t, σ = t):

        x_{t_prev} = (1 − t_prev)·x̂0 + sqrt(t_prev² − s²)·ε̂ + s·z,
        s = eta · t_prev · sqrt(1 − ((1 − t)·t_prev / ((1 − t_prev)·t))²),

    x̂0 = x_t − t·v and ε̂ = x_t + (1 − t)·v. eta = 1 is the posterior q(x_{t_prev} | x_t, x̂0); eta = 0 the
    Euler step. The step to t_prev = 0 is deterministic at any eta (s = 0).
    """
    wd = work_dtype(x_t, velocity)
    x, v = x_t.to(wd), velocity.to(wd)
    s, s_prev = _per_sample(t, x), _per_sample(t_prev, x)
    x0, eps = x - s * v, x + (1 - s) * v
    ratio = (1 - s) * s_prev / ((1 - s_prev) * s)
    std = eta * s_prev * (1 - ratio**2).clamp(min=0).sqrt()
    mean = (1 - s_prev) * x0 + (s_prev**2 - std**2).clamp(min=0).sqrt() * eps
    return mean, std, x0


FLOW_SAMPLERS = {"sde": flow_sde_transition, "ddim": flow_ddim_transition}

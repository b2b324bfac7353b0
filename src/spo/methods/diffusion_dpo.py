"""The Diffusion-DPO baseline (Wallace et al. 2023): offline DPO on preference pairs of final images.

For a pair (winner, loser) of clean latents, one random t and one noise draw shared by both: the
loss asks the policy to denoise the winner better, and the loser worse, than the frozen reference:

    −log σ(−β/2 · [(‖ε_θ(x_t^w) − ε‖² − ‖ε_ref(x_t^w) − ε‖²) − (‖ε_θ(x_t^l) − ε‖² − ‖ε_ref(x_t^l) − ε‖²)])

with ‖·‖² the per-sample mean squared error, as in the authors' training script. The label is the
final image's preference, applied at whatever t was drawn — the contrast SPO's step-wise labels make.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


def per_sample_mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (output.float() - target.float()).pow(2).flatten(1).mean(1)


def diffusion_dpo_loss(policy_err_win, policy_err_lose, ref_err_win, ref_err_lose, beta: float):
    """Mean loss, and the per-pair implicit reward margin (> 0 when the policy prefers the winner)."""
    margin = -0.5 * beta * ((policy_err_win - ref_err_win) - (policy_err_lose - ref_err_lose))
    return -F.logsigmoid(margin).mean(), margin.detach()

"""Preference pairs seen at a timestep: both images noised with the same noise, one guided step, decoded.

The SPM's training input and its evaluation input; the resampler reaches the same images through
`Diffusion.x0_images` on its own latents.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def noisy_x0_images(diffusion, images_0: torch.Tensor, images_1: torch.Tensor, captions: list[str],
                    t: torch.Tensor, guidance: float, generator: torch.Generator | None = None):
    """Both images noised with the same noise to x_t, denoised once (CFG) and decoded: images in [-1, 1]."""
    latents = diffusion.encode_images(torch.cat([images_0, images_1]))
    noise = torch.randn(latents[: len(images_0)].shape, generator=generator, dtype=torch.float32).to(latents)
    t2 = torch.cat([t, t]).to(latents.device)
    x_t = diffusion.noised(latents, torch.cat([noise, noise]), t2)
    cond, uncond = diffusion.encode_prompts(captions + captions)
    decoded, _ = diffusion.x0_images(x_t, t2, cond, uncond, guidance)
    return decoded.chunk(2)

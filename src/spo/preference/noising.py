"""Preference pairs seen at a timestep: both images noised with the same noise, one guided step, decoded.

The SPM's training input and its evaluation input; the resampler reaches the same images through
`Diffusion.x0_images` on its own latents. `noisy_latents` alone is what a latent step judge sees.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def noisy_latents(diffusion, images_0: torch.Tensor, images_1: torch.Tensor, t: torch.Tensor,
                  generator: torch.Generator | None = None):
    """Both images VAE-encoded and noised with the same noise: x_t of images_0 then images_1, and t twice."""
    latents = diffusion.encode_images(torch.cat([images_0, images_1]))
    noise = torch.randn(latents[: len(images_0)].shape, generator=generator, dtype=torch.float32).to(latents)
    t2 = torch.cat([t, t]).to(latents.device)
    return diffusion.noised(latents, torch.cat([noise, noise]), t2), t2


@torch.no_grad()
def x0_images_of(diffusion, x_t: torch.Tensor, t2: torch.Tensor, captions: list[str], guidance: float):
    """One guided step (CFG) from the stacked x_t of `noisy_latents`, decoded: images in [-1, 1], in two halves."""
    cond, uncond = diffusion.encode_prompts(captions + captions)
    decoded, _ = diffusion.x0_images(x_t, t2, cond, uncond, guidance)
    return decoded.chunk(2)


@torch.no_grad()
def noisy_x0_images(diffusion, images_0: torch.Tensor, images_1: torch.Tensor, captions: list[str],
                    t: torch.Tensor, guidance: float, generator: torch.Generator | None = None):
    """Both images noised with the same noise to x_t, denoised once (CFG) and decoded: images in [-1, 1]."""
    x_t, t2 = noisy_latents(diffusion, images_0, images_1, t, generator)
    return x0_images_of(diffusion, x_t, t2, captions, guidance)

"""Loading diffusion pipelines, and the few operations the library needs from one.

`Diffusion` is the model-family adapter: everything that differs between model families (text
encoding, conditioning, resolution) lives here, and the rest of the library only calls its methods.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from spo.errors import SPOError


def load_pipeline(path_or_id: str | Path, dtype: torch.dtype | None = None):
    """A StableDiffusionPipeline from a hub id or a local directory, with a clear error on failure."""
    from diffusers import StableDiffusionPipeline

    local = Path(path_or_id)
    if local.exists() and not (local / "model_index.json").is_file():
        raise SPOError(f"{local} is not a diffusers pipeline directory (no model_index.json)")
    if local.exists():
        cls_name = json.loads((local / "model_index.json").read_text()).get("_class_name", "")
        if "XL" in cls_name:
            raise SPOError(f"{local} holds a {cls_name}; SDXL checkpoints are not supported yet")
    kwargs = {"torch_dtype": dtype} if dtype is not None else {}
    try:
        pipe = StableDiffusionPipeline.from_pretrained(str(path_or_id), safety_checker=None,
                                                       requires_safety_checker=False, **kwargs)
    except Exception as exc:  # diffusers raises many exception types for missing or corrupt models
        raise SPOError(f"could not load a Stable Diffusion pipeline from {path_or_id!r} "
                       f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def guided_output(unet, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
                  guidance: float) -> torch.Tensor:
    """One UNet call on the doubled batch, combined with classifier-free guidance."""
    if guidance == 1.0:
        return unet(x_t, t, cond).sample
    both = unet(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([uncond, cond])).sample
    out_uncond, out_cond = both.chunk(2)
    return out_uncond + guidance * (out_cond - out_uncond)


@dataclass
class Diffusion:
    """A frozen-or-trainable SD-family model seen through the operations SPM and SPO need."""

    pipe: object

    @property
    def unet(self):
        return self.pipe.unet

    @property
    def vae(self):
        return self.pipe.vae

    @property
    def scheduler(self):
        return self.pipe.scheduler

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    @property
    def resolution(self) -> int:
        return self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(conditional, unconditional) text embeddings for classifier-free guidance."""
        cond, uncond = self.pipe.encode_prompt(list(prompts), self.device, 1, True, negative_prompt=None)
        return cond, uncond

    def guided_output(self, x_t, t, cond, uncond, guidance: float) -> torch.Tensor:
        return guided_output(self.unet, x_t, t, cond, uncond, guidance)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> scaled latents (posterior mean)."""
        images = images.to(device=self.device, dtype=self.vae.dtype)
        return self.vae.encode(images).latent_dist.mean * self.vae.config.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1]."""
        return self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample.clamp(-1, 1)

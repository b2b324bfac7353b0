"""Generating images with fixed seeds, from a base pipeline with or without a LoRA."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from spo.errors import SPOError


def load_model(pretrained: str, lora: str | Path | None = None, vae: str | Path | None = None):
    """An SD or SDXL pipeline from `pretrained` (hub id / dir / world:sd), with a LoRA dir or full-pipeline
    dir applied; `vae` replaces the pipeline's VAE (e.g. madebyollin/sdxl-vae-fp16-fix)."""
    from spo.models import Diffusion, load_pipeline
    from spo.world import resolve

    vae = resolve(str(vae)) if vae else None
    if lora and (Path(lora) / "model_index.json").is_file():  # a full fine-tuning output is a pipeline itself
        return load_pipeline(lora, vae=vae)
    pipe = load_pipeline(resolve(pretrained), vae=vae)
    if lora:
        if not Path(lora).is_dir():
            raise SPOError(f"LoRA directory {lora} does not exist")
        info = Path(lora) / "spo_lora.json"
        trained_on = json.loads(info.read_text()).get("family", "sd") if info.is_file() else None
        if trained_on and trained_on != Diffusion(pipe).family:
            raise SPOError(f"LoRA {lora} was trained on an {trained_on.upper()} model but {pretrained} is "
                           f"{Diffusion(pipe).family.upper()}; give --pretrained the model it was trained from")
        try:
            pipe.load_lora_weights(str(lora))
        except Exception as exc:
            raise SPOError(f"could not load LoRA weights from {lora}: {str(exc).splitlines()[0][:200]}") from None
    return pipe


@torch.no_grad()
def generate(pipe, prompts: list[str], seed: int, steps: int = 20, guidance: float = 5.0, eta: float = 0.0,
             batch: int = 32, desc: str = "generate") -> np.ndarray:
    """HxWx3 float images in [0, 1]; image i uses seed `seed + i`, so models compare image for image."""
    out = []
    for start in tqdm(range(0, len(prompts), batch), desc=desc, leave=False):
        chunk = prompts[start : start + batch]
        gens = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        result = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, eta=eta, generator=gens,
                      output_type="np")
        out.append(result.images)
    if not out:
        raise SPOError("no prompts to generate")
    return np.concatenate(out)

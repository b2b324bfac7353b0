"""Generating images with fixed seeds, from a base pipeline with or without a LoRA."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from spo.errors import SPOError
from spo.lora import lora_info


def load_model(pretrained: str, lora: str | Path | None = None, vae: str | Path | None = None):
    """An SD, SDXL, SD3 or FLUX pipeline from `pretrained` (hub id / dir / world:sd), with a LoRA dir or full-pipeline
    dir applied; `vae` replaces the pipeline's VAE (e.g. madebyollin/sdxl-vae-fp16-fix)."""
    from spo.models import load_pipeline, pipeline_family
    from spo.plugins import resolve

    vae = resolve(str(vae)) if vae else None
    if lora and (Path(lora) / "model_index.json").is_file():  # a full fine-tuning output is a pipeline itself
        return load_pipeline(lora, vae=vae)
    pipe = load_pipeline(resolve(pretrained), vae=vae)
    if lora:
        if not Path(lora).is_dir():
            raise SPOError(f"LoRA directory {lora} does not exist")
        info = lora_info(Path(lora))
        trained_on = info.get("family", "sd") if info is not None else None
        if trained_on and trained_on != pipeline_family(pipe):
            article = "an" if trained_on.startswith("s") else "a"  # SD is read letter by letter, FLUX as a word
            raise SPOError(f"LoRA {lora} was trained on {article} {trained_on.upper()} model but {pretrained} is "
                           f"{pipeline_family(pipe).upper()}; give --pretrained the model it was trained from")
        try:
            pipe.load_lora_weights(str(lora))
        except Exception as exc:
            raise SPOError(f"could not load LoRA weights from {lora}: {str(exc).splitlines()[0][:200]}") from None
    return pipe


@torch.no_grad()
def generate(pipe, prompts: list[str], seed: int, steps: int = 20, guidance: float = 5.0, eta: float = 0.0,
             batch: int = 32, desc: str = "generate") -> np.ndarray:
    """HxWx3 float images in [0, 1]; image i uses seed `seed + i`, so models compare image for image.

    Flow pipelines (SD3, FLUX) sample with their ODE (Euler) and take no eta: there eta must be 0."""
    import inspect

    from spo.models import call_defaults

    takes_eta = "eta" in inspect.signature(pipe.__call__).parameters
    if eta and not takes_eta:
        raise SPOError(f"{type(pipe).__name__} samples with its ODE and takes no eta; use eta 0")
    out = []
    for start in tqdm(range(0, len(prompts), batch), desc=desc, leave=False):
        chunk = prompts[start : start + batch]
        gens = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        result = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=gens, output_type="np",
                      **({"eta": eta} if takes_eta else {}), **call_defaults(pipe))
        out.append(result.images)
    if not out:
        raise SPOError("no prompts to generate")
    return np.concatenate(out)


def generate_to_folder(pretrained: str, models: list[tuple[str, str | Path | None]], prompts: list[str], out: Path,
                       seed: int, steps: int, guidance: float, eta: float, vae: str | None = None) -> Path:
    """`spo generate`: each (name, LoRA or None) model's images as out/<name>/NNNN.png, all from the same
    seeds, and a captioned grid of the first prompts, one row per model; returns the grid's path."""
    rows = []
    for name, lora in models:
        images = generate(load_model(pretrained, lora, vae=vae), prompts, seed, steps, guidance, eta, desc=name)
        _write_pngs(images, out / name)
        rows.append(images)
    names = [name for name, _ in models]
    return _side_by_side(rows, names, prompts, out / "grid.png",
                         title=f"rows: {', '.join(names)}; seeds {seed}+i; {steps} steps, guidance {guidance:g}")


def _write_pngs(images: np.ndarray, folder: Path) -> None:
    from PIL import Image

    from spo.images import to_uint8

    folder.mkdir(exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(to_uint8(image)).save(folder / f"{i:04d}.png")


def _side_by_side(rows: list[np.ndarray], names: list[str], prompts: list[str], path: Path, title: str) -> Path:
    """The first (up to 8) prompts of every model, one row per model."""
    from spo.plots import captioned_grid

    cols = min(len(prompts), 8)
    images = [image for row in rows for image in row[:cols]]
    labels = [f"{name}: {p}" for name in names for p in prompts[:cols]]
    return captioned_grid(images, labels, path, cols=cols, title=title)

"""Pieces the build stages, the preference data and the report all use: the models' pixel range,
caption tokens, and the world CLIP's PickScore-style scores."""

from __future__ import annotations

import numpy as np
import torch

from spo.clip import image_embeds, text_embeds


def to_model_range(images_uint8: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1], the range of Stable Diffusion's VAE and our CLIP's processor."""
    return torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """Caption token ids padded to the tokenizer's full length, as the world's models were trained."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


@torch.no_grad()
def clip_scores(clip, tokenizer, captions: list[str], pixels: torch.Tensor, batch: int = 256) -> np.ndarray:
    """PickScore-style scores: logit_scale * cos(text, image), images in [-1, 1]."""
    out = []
    for i in range(0, len(captions), batch):
        t = text_embeds(clip, tokenize(tokenizer, captions[i : i + batch]))
        v = image_embeds(clip, pixels[i : i + batch])
        out.append((clip.logit_scale.exp() * (t * v).sum(-1)).numpy())
    return np.concatenate(out) if out else np.zeros(0)

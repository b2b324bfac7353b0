"""Projected, L2-normalised CLIP embeddings of a transformers `CLIPModel`, the one place they are computed.

Taken explicitly through the towers and projections rather than `get_image_features` /
`get_text_features`: transformers 5 returns output objects from those, transformers 4 tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def image_embeds(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Normalised image embeddings of pixels already prepared for the model's vision tower."""
    pooled = model.vision_model(pixel_values=pixel_values).pooler_output
    return F.normalize(model.visual_projection(pooled), dim=-1)


def text_embeds(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Normalised text embeddings of token ids."""
    pooled = model.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
    return F.normalize(model.text_projection(pooled), dim=-1)

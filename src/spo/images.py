"""Image arrays and tensors: 8-bit conversion, the models' [-1, 1] range, CLIP-style resize and centre crop."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Float images in [0, 1] -> uint8, rounded to nearest."""
    return (np.clip(images, 0, 1) * 255 + 0.5).astype(np.uint8)


def to_model_pixels(images: np.ndarray) -> torch.Tensor:
    """Float NHWC images in [0, 1] -> a float NCHW tensor in [-1, 1], the range of SD's VAE and the world's CLIP."""
    import torch  # here, not at the top: the world's utility workers import this module and need no torch

    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() * 2 - 1


def resize_center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """NCHW images in [0, 1] -> shortest side `size` (bicubic, antialiased), centre crop to `size`x`size`.

    Done on tensors, not PIL, so a scorer runs inside the sampling loop without leaving the device.
    """
    import torch.nn.functional as F

    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[..., top : top + size, left : left + size]

"""Image tensors for the scorers: CLIP-style resize and centre crop, on the device, batched."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def resize_center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """NCHW images in [0, 1] -> shortest side `size` (bicubic, antialiased), centre crop to `size`x`size`.

    Done on tensors, not PIL, so a scorer runs inside the sampling loop without leaving the device.
    """
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[..., top : top + size, left : left + size]

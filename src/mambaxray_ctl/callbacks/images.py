"""Pictures for TensorBoard and the heat-map pages: model inputs back to pixels, thumbnails, tiles, and
a heat map laid over a grey X-ray.

The DataModules normalise every image as ``(x − mean) / std`` per channel
(:class:`~mambaxray_ctl.data.images.Normalize`, the DataModule's ``normalize``); :func:`unnormalize`
inverts it. Images here are float tensors ``(3, H, W)`` in ``[0, 1]``; :func:`overlay` works on
numpy arrays and returns an 8-bit RGB picture.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from mambaxray_ctl.data.images import Normalize, resize

# "Jet"-like colour ramp of the heat (blue, cyan, green, yellow, red at 0, ¼, ½, ¾, 1).
_RAMP_AT = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_RAMP_RGB = np.array([[0, 0, 1], [0, 1, 1], [0, 1, 0], [1, 1, 0], [1, 0, 0]], dtype=np.float64)
MAX_OPACITY = 0.6  # of the colour where the heat is at its maximum; where it is 0 the X-ray shows as is


def unnormalize(images: Tensor, normalize: Normalize) -> Tensor:
    """Model inputs (..., 3, H, W), normalised by ``normalize``, back to float32 pixels in [0, 1] (CPU)."""
    if images.ndim < 3 or images.shape[-3] != 3:
        raise ValueError(f"expected images (..., 3, H, W), got shape {tuple(images.shape)}")
    return (images.detach().float().cpu() * normalize.std + normalize.mean).clamp_(0.0, 1.0)


def thumbnails(images: Tensor, normalize: Normalize, size: int) -> list[Tensor]:
    """Normalised model inputs (N, 3, H, W) → N pictures (3, size, size) in [0, 1]."""
    return [resize(image, size) for image in unnormalize(images, normalize)]


def tile(rows: Sequence[Sequence[Tensor]]) -> Tensor:
    """Pictures (C, H, W) of one size, row by row, as one picture (C, rows·H, columns·W)."""
    if not rows or any(len(row) != len(rows[0]) for row in rows) or not rows[0]:
        raise ValueError("tile needs a non-empty, rectangular list of rows")
    return torch.cat([torch.cat(list(row), dim=-1) for row in rows], dim=-2)


def gray(image: Tensor) -> np.ndarray:
    """A picture (C, H, W) in [0, 1] → its grey levels (H, W), the mean of its channels."""
    return image.float().mean(dim=0).cpu().numpy()


def heat_colors(heat: np.ndarray) -> np.ndarray:
    """Heat in [0, 1] (any shape) → RGB in [0, 1] (shape + (3,)) on the blue-to-red ramp."""
    flat = np.clip(heat, 0.0, 1.0).reshape(-1)
    rgb = np.stack([np.interp(flat, _RAMP_AT, _RAMP_RGB[:, c]) for c in range(3)], axis=-1)
    return rgb.reshape(*heat.shape, 3)


def overlay(image_gray: np.ndarray, heat: np.ndarray, vmax: float | None = None) -> np.ndarray:
    """A heat map over a grey X-ray, as an RGB picture (H, W, 3) uint8.

    ``image_gray``: (H, W), float in [0, 1] or uint8. ``heat``: (h, w), finite, ≥ 0, on any grid (a
    patch grid, e.g. 14×14): each cell is stretched over its block of the picture (nearest neighbour,
    so the cells the map scores stay visible as cells). The heat is divided by ``vmax`` (default its
    maximum; pass the maximum over several views to put them on one scale) and shown as a blue-to-red
    colour whose opacity grows with the heat, up to :data:`MAX_OPACITY`: a zero map leaves the X-ray
    as it is.
    """
    image = np.asarray(image_gray)
    heat = np.asarray(heat, dtype=np.float64)
    if image.ndim != 2 or heat.ndim != 2:
        raise ValueError(f"overlay takes a 2-D image and a 2-D heat map, got {image.shape} and {heat.shape}")
    if not np.isfinite(heat).all() or (heat < 0).any():
        raise ValueError("the heat map must be finite and non-negative")
    base = image.astype(np.float64) / 255.0 if image.dtype == np.uint8 else image.astype(np.float64)
    base = np.clip(base, 0.0, 1.0)
    scale = float(heat.max()) if vmax is None else float(vmax)
    if scale < 0 or not np.isfinite(scale):
        raise ValueError(f"vmax must be finite and non-negative, got {vmax}")
    level = heat / scale if scale > 0 else np.zeros_like(heat)
    height, width = base.shape
    cells = Image.fromarray(level.astype(np.float32)).resize((width, height), Image.Resampling.NEAREST)
    level = np.clip(np.asarray(cells, dtype=np.float64), 0.0, 1.0)
    alpha = (MAX_OPACITY * level)[..., None]
    rgb = (1.0 - alpha) * base[..., None] + alpha * heat_colors(level)
    return np.rint(rgb * 255.0).astype(np.uint8)

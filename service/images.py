"""Samples -> PNG bytes: quantise, upscale nearest-neighbour for display, tile n > 1 into a grid.

Runs in a thread pool, never inside the step loop.
"""
from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image


def to_uint8(x: torch.Tensor, data_range: tuple[float, float]) -> np.ndarray:
    """[C, H, W] in data_range -> uint8 [H, W] (C = 1) or [H, W, C]."""
    lo, hi = data_range
    a = ((x.detach().float().cpu() - lo) * (255.0 / (hi - lo))).round().clamp(0, 255).to(torch.uint8).numpy()
    return a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)


def _upscale(a: np.ndarray, scale: int) -> np.ndarray:
    return a if scale == 1 else a.repeat(scale, 0).repeat(scale, 1)


def png(a: np.ndarray, scale: int = 1) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_upscale(a, scale)).save(buf, format="PNG")
    return buf.getvalue()


def grid(arrays: list[np.ndarray], gap: int = 1) -> np.ndarray:
    """Tile images row-major into a near-square grid with a `gap`-pixel black border between."""
    n = len(arrays)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    h, w = arrays[0].shape[:2]
    out = np.zeros((rows * h + (rows - 1) * gap, cols * w + (cols - 1) * gap, *arrays[0].shape[2:]), np.uint8)
    for i, a in enumerate(arrays):
        r, c = divmod(i, cols)
        out[r * (h + gap): r * (h + gap) + h, c * (w + gap): c * (w + gap) + w] = a
    return out


def encode(samples: list[torch.Tensor], data_range, scale: int, as_grid: bool) -> list[bytes]:
    """One PNG (the image, or the grid of all) when as_grid, else one PNG per sample."""
    arrays = [to_uint8(x, data_range) for x in samples]
    if as_grid:
        return [png(arrays[0] if len(arrays) == 1 else grid(arrays), scale)]
    return [png(a, scale) for a in arrays]


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))

"""Pixels: quantise samples to uint8 (on their device), tile n > 1 into a grid, upscale for display.

`quantize` runs on the worker's device; the rest runs in the API process's encoder pool
(`service.encode`), never inside the step loop or on the event loop.
"""
from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image


def quantize(x: torch.Tensor, data_range: tuple[float, float]) -> torch.Tensor:
    """Samples [B, C, H, W] in data_range -> uint8 [B, H, W, C] on the same device (round to nearest)."""
    lo, hi = data_range
    q = ((x.float() - lo) * (255.0 / (hi - lo))).round_().clamp_(0, 255).to(torch.uint8)
    return q.permute(0, 2, 3, 1).contiguous()


def to_uint8(x: torch.Tensor, data_range: tuple[float, float]) -> np.ndarray:
    """One sample [C, H, W] -> uint8 [H, W] (C = 1) or [H, W, C] on the host."""
    a = quantize(x[None], data_range)[0].cpu().numpy()
    return a[..., 0] if a.shape[-1] == 1 else a


def upscale(a: np.ndarray, scale: int) -> np.ndarray:
    return a if scale == 1 else a.repeat(scale, 0).repeat(scale, 1)


def grid(arrays, gap: int = 1) -> np.ndarray:
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


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))

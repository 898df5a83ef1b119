"""The fused per-step update, and the dispatcher between its Triton and torch implementations.

For every sample i (one row of `y`), with D_i = the conditional output d[i] and, when
uncond[i] >= 0, U_i = d[uncond[i]]:

    g_i          = U_i + w_i * (D_i - U_i)        (D_i alone when uncond[i] < 0)
    h_i          = hx_i * y_i + hd_i * g_i        (the history entry: the solver's basis quantity)
    hist[i, slot_i] = h_i
    y_i         <- c_i * y_i + sum_j b[i, j] * hist[i, (slot_i - j) mod W]

`y` and `hist` are updated in place; arithmetic is float32 (float64 for float64 states).
Shapes: y [B, D]; d [R, D] with R >= B; uncond, slot [B] int64; w, hx, hd, c [B] float32;
b [B, W] float32; hist [B, W, D].
"""
from __future__ import annotations

import os

import torch


def fused_update_torch(y, d, uncond, w, hx, hd, c, b, hist, slot):
    B, W = b.shape
    f = torch.promote_types(y.dtype, torch.float32)  # float64 states stay float64 (tests)
    dc = d[:B].to(f)
    guided = (uncond >= 0)[:, None]
    du = d[uncond.clamp(min=0)].to(f)
    g = torch.where(guided, du + w[:, None] * (dc - du), dc)
    y32 = y.to(f)
    h = hx[:, None] * y32 + hd[:, None] * g
    rows = torch.arange(B, device=y.device)
    hist[rows, slot] = h.to(hist.dtype)
    acc = c[:, None] * y32 + b[:, 0, None] * h  # the fresh entry from registers, not re-read
    for j in range(1, W):
        acc = acc + b[:, j, None] * hist[rows, (slot - j) % W].to(f)
    y.copy_(acc)


UPDATES = ("auto", "torch", "triton")


def _triton():
    try:
        from .triton_update import fused_update_triton
    except Exception:  # triton missing or unusable on this platform
        return None
    return fused_update_triton


def fused_update(y, d, uncond, w, hx, hd, c, b, hist, slot):
    """Triton on CUDA, torch elsewhere (same semantics; `update_fn("triton")` runs the kernel on the
    CPU too, in Triton's interpreter)."""
    if y.is_cuda:
        kernel = _triton()
        if kernel is not None:
            return kernel(y, d, uncond, w, hx, hd, c, b, hist, slot)
    return fused_update_torch(y, d, uncond, w, hx, hd, c, b, hist, slot)


def update_fn(kind: str | None = None):
    """The update for a setting: 'auto' (Triton on CUDA, torch elsewhere), 'torch', or 'triton'
    (the kernel on every device: compiled on CUDA, interpreted on the CPU, where it exercises every
    CUDA-only path of the kernel's callers). None reads STRIDE_UPDATE (default 'auto')."""
    kind = (kind or os.environ.get("STRIDE_UPDATE") or "auto").lower()
    if kind == "auto":
        return fused_update
    if kind == "torch":
        return fused_update_torch
    if kind == "triton":
        kernel = _triton()
        if kernel is None:
            raise ValueError("update 'triton' needs the triton package (pip install triton)")
        return kernel
    raise ValueError(f"update must be one of {', '.join(UPDATES)}; got {kind!r}")

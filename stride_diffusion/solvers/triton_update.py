"""The fused per-step update as one Triton kernel (semantics: `solvers.update`).

The update is memory-bound: done as separate torch ops it reads and writes the state several
times. Here each program owns one sample and one block of its row; it reads y, the D (and U) row
and the W-1 older history entries once, and writes the new history entry and y once.
Coefficients are per sample, so requests on different solvers or steps share one launch.

The model output `d` may be a row-strided view (a learned-sigma network's first C of 2C channels,
or a batch bucket's static output): the kernel takes its row stride instead of a copy.

CUDA tensors run the compiled kernel; CPU tensors run the same kernel in Triton's interpreter
(numpy, one program at a time: for tests and `update=triton` on the CPU, never for speed).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _update_kernel(y_ptr, d_ptr, uncond_ptr, w_ptr, hx_ptr, hd_ptr, c_ptr, b_ptr, hist_ptr, slot_ptr,
                   D, d_row, W: tl.constexpr, BLOCK: tl.constexpr, F: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    off = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = off < D
    y = tl.load(y_ptr + i * D + off, mask=m).to(F)
    g = tl.load(d_ptr + i * d_row + off, mask=m).to(F)
    u = tl.load(uncond_ptr + i)
    if u >= 0:  # per-sample guidance; U is not read otherwise
        du = tl.load(d_ptr + u * d_row + off, mask=m).to(F)
        g = du + tl.load(w_ptr + i) * (g - du)
    h = tl.load(hx_ptr + i) * y + tl.load(hd_ptr + i) * g
    s = (tl.load(slot_ptr + i) % W + W) % W
    row = hist_ptr + i * W * D
    tl.store(row + s * D + off, h.to(hist_ptr.dtype.element_ty), mask=m)
    acc = tl.load(c_ptr + i) * y + tl.load(b_ptr + i * W) * h  # j = 0: the fresh entry, from registers
    for j in tl.static_range(1, W):
        acc += tl.load(b_ptr + i * W + j) * tl.load(row + ((s + W - j) % W) * D + off, mask=m).to(F)
    tl.store(y_ptr + i * D + off, acc.to(y_ptr.dtype.element_ty), mask=m)


def _jit(interpret: bool):
    """triton.jit decides compiled vs interpreted from TRITON_INTERPRET when it decorates: decorate
    once each way, so that one process can run CUDA tensors compiled and CPU tensors interpreted."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    try:
        return triton.jit(_update_kernel)
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


_KERNELS = {"cuda": _jit(False), "cpu": _jit(True)}


def check_layout(y, d, hist):
    """y and hist are written in place, so they must be contiguous; d may be any row-strided 2-D view
    (unit inner stride, row stride >= D, as `d[:, :C]` of a 2C-channel output gives)."""
    D = y.shape[1]
    if not (y.is_contiguous() and hist.is_contiguous()):
        raise ValueError(f"y and hist must be contiguous (updated in place); got y strides {tuple(y.stride())}, "
                         f"hist strides {tuple(hist.stride())}")
    if D > 1 and d.shape[0] > 0 and (d.stride(1) != 1 or (d.shape[0] > 1 and d.stride(0) < D)):
        raise ValueError(f"d must be rows of {D} contiguous values (inner stride 1, row stride >= {D}); "
                         f"got shape {tuple(d.shape)} with strides {tuple(d.stride())}")


def fused_update_triton(y, d, uncond, w, hx, hd, c, b, hist, slot, *, block=1024, num_warps=4):
    """In place on `y` and `hist`; shapes and semantics as `solvers.update` (float64 state: float64 math).

    `uncond[i] < len(d)` is the caller's contract (not checked: checking would sync the device).
    """
    if y.dim() != 2 or b.dim() != 2:
        raise ValueError(f"y must be [B, D] and b [B, W], got {tuple(y.shape)} and {tuple(b.shape)}")
    B, D = y.shape
    W = b.shape[1]
    if b.shape[0] != B or W < 1:
        raise ValueError(f"b must be [B={B}, W>=1], got {tuple(b.shape)}")
    if d.dim() != 2 or d.shape[0] < B or d.shape[1] != D:
        raise ValueError(f"d must be [R>={B}, {D}], got {tuple(d.shape)}")
    if tuple(hist.shape) != (B, W, D):
        raise ValueError(f"hist must be [{B}, {W}, {D}], got {tuple(hist.shape)}")
    if y.dtype not in _FLOATS or d.dtype not in _FLOATS:
        raise ValueError(f"y and d must be float32/bfloat16/float16/float64, got {y.dtype} and {d.dtype}")
    if hist.dtype != y.dtype:
        raise ValueError(f"hist dtype {hist.dtype} must match y dtype {y.dtype}")
    for name, t, dt in (("uncond", uncond, torch.int64), ("slot", slot, torch.int64), ("w", w, torch.float32),
                        ("hx", hx, torch.float32), ("hd", hd, torch.float32), ("c", c, torch.float32)):
        if tuple(t.shape) != (B,) or t.dtype != dt:
            raise ValueError(f"{name} must be [{B}] {dt}, got {tuple(t.shape)} {t.dtype}")
    if b.dtype != torch.float32:
        raise ValueError(f"b must be float32, got {b.dtype}")
    check_layout(y, d, hist)
    tensors = (y, d, uncond, w, hx, hd, c, b, hist, slot)
    if any(t.device != y.device for t in tensors):
        raise ValueError(f"all tensors must be on {y.device}, got {sorted({str(t.device) for t in tensors})}")
    kernel = _KERNELS.get(y.device.type)
    if kernel is None:
        raise ValueError(f"the Triton update runs on cuda (compiled) or cpu (interpreted), not {y.device.type}")
    if B == 0 or D == 0:
        return
    uncond, w, hx, hd, c, b, slot = (t.contiguous() for t in (uncond, w, hx, hd, c, b, slot))
    F = tl.float64 if y.dtype == torch.float64 else tl.float32
    d_row = d.stride(0) if d.shape[0] > 1 else D
    kernel[(B, triton.cdiv(D, block))](y, d, uncond, w, hx, hd, c, b, hist, slot, D, d_row,
                                       W=W, BLOCK=block, F=F, num_warps=num_warps)

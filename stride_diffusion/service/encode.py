"""Raw uint8 images -> response bodies, in the API process.

Workers return pixels; encoding happens here, in a thread pool sized by `encode_threads` (default:
the cores this process may use, `default_threads`), because at GPU rates it is the expensive part
(a 256x256 PNG costs milliseconds of CPU, more than the image's share of the GPU). PIL releases the
GIL while it compresses, so the threads run in parallel; base64 and the JSON body are built in the
pool too, never on the event loop.

Formats: png (zlib level `png_level`, default 1: speed over size; benchmarks/png_levels.py measures
size against time for 0..9; written by `png_bytes`), jpeg and webp (`quality`, default 90), one image or a grid for n > 1;
json carries one base64 PNG per image with its seed. The output is a deterministic function of the
pixels and the level, so a retried request served from its stored result is byte-identical.
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from .images import grid, upscale

FORMATS = ("png", "jpeg", "webp", "json")
MEDIA = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp", "json": "application/json"}
DEFAULT_QUALITY = 90
PNG_LEVEL = 1
MAX_THREADS = 32


def default_threads() -> int:
    """Encoding threads when none are set: one per core this process may run on (CPU affinity, as
    a container's cpuset gives it), at most MAX_THREADS."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_THREADS, cores))


_PNG_COLOR = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> PNG colour type: grey, grey + alpha, RGB, RGBA


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(a: np.ndarray, level: int = PNG_LEVEL) -> bytes:
    """One uint8 image [H, W] or [H, W, C] (C = 1..4) -> PNG bytes, every row with PNG's Up filter
    (its difference from the row above, mod 256) and one zlib stream at `level` (0..9). PIL tries
    every filter on every row and keeps the one that looks best; for these images one filter for
    all rows gives files of about the same size in half the time or less (benchmarks/png_levels.py:
    the `pil` rows). Deterministic for the same pixels and level (zlib's output is)."""
    if a.ndim == 2:
        a = a[..., None]
    h, w, c = a.shape
    rows = np.empty((h, 1 + w * c), np.uint8)
    rows[:, 0] = 2  # filter type Up (row 0: the row above is zeros, so its bytes stay as they are)
    flat = a.reshape(h, w * c)
    np.subtract(flat[1:], flat[:-1], out=rows[1:, 1:])  # uint8: wraps mod 256, as PNG defines it
    rows[0, 1:] = flat[0]
    head = struct.pack(">IIBBBBB", w, h, 8, _PNG_COLOR[c], 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", head) + _chunk(b"IDAT", zlib.compress(rows.data, level))
            + _chunk(b"IEND", b""))


def image_bytes(a: np.ndarray, fmt: str, quality: int | None = None, png_level: int = PNG_LEVEL) -> bytes:
    """One uint8 image [H, W] or [H, W, C] -> png/jpeg/webp bytes (png: zlib level 0..9)."""
    if fmt == "png":
        return png_bytes(a, png_level)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    buf = io.BytesIO()
    img = Image.fromarray(np.ascontiguousarray(a))
    if fmt in ("jpeg", "webp"):
        img.save(buf, format=fmt.upper(), quality=quality or DEFAULT_QUALITY)
    else:
        raise ValueError(f"unknown image format {fmt!r}; allowed: {list(FORMATS)}")
    return buf.getvalue()


def b64_pngs(pixels: np.ndarray, scale: int = 1, png_level: int = PNG_LEVEL) -> list[str]:
    """uint8 images [n, H, W, C] -> one base64 PNG each (format=json, the OpenAI route)."""
    return [base64.b64encode(image_bytes(upscale(a, scale), "png", png_level=png_level)).decode() for a in pixels]


def encode(pixels: np.ndarray, fmt: str, quality: int | None = None, scale: int = 1, meta: dict | None = None,
           png_level: int = PNG_LEVEL) -> bytes:
    """uint8 images [n, H, W, C] -> the response body: one image (a grid for n > 1), or for json
    `meta` plus 'images': base64 PNGs, one per image."""
    if fmt == "json":
        body = dict(meta or {})
        body["images"] = b64_pngs(pixels, scale, png_level)
        return json.dumps(body).encode()
    a = pixels[0] if len(pixels) == 1 else grid(list(pixels))
    return image_bytes(upscale(a, scale), fmt, quality, png_level)


class Encoder:
    """The API process's encoding pool: `threads` None -> `default_threads()`."""

    def __init__(self, threads: int | None = None, png_level: int = PNG_LEVEL):
        if not 0 <= png_level <= 9:
            raise ValueError(f"png_level must be in 0..9 (zlib), got {png_level}")
        self.threads, self.png_level = threads or default_threads(), png_level
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="stride-encode")

    async def __call__(self, pixels: np.ndarray, fmt: str, quality=None, scale: int = 1, meta=None) -> bytes:
        return await asyncio.get_running_loop().run_in_executor(self.pool, encode, pixels, fmt, quality, scale, meta,
                                                                self.png_level)

    async def b64_pngs(self, pixels: np.ndarray, scale: int = 1) -> list[str]:
        return await asyncio.get_running_loop().run_in_executor(self.pool, b64_pngs, pixels, scale, self.png_level)

    def close(self):
        self.pool.shutdown(wait=False)

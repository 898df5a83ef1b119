"""Raw uint8 images -> response bodies, in the API process.

Workers return pixels; encoding happens here, in a thread pool sized by `encode_threads`, because
at GPU rates it is the expensive part (a 256x256 PNG costs milliseconds of CPU, more than the
image's share of the GPU). PIL releases the GIL while it compresses, so the threads run in
parallel; base64 and the JSON body are built in the pool too, never on the event loop.

Formats: png (level 1: speed over size), jpeg and webp (`quality`, default 90), one image or a grid
for n > 1; json carries one base64 PNG per image with its seed. The output is a deterministic
function of the pixels, so a retried request served from its stored result is byte-identical.
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from .images import grid, upscale

FORMATS = ("png", "jpeg", "webp", "json")
MEDIA = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp", "json": "application/json"}
DEFAULT_QUALITY = 90
PNG_LEVEL = 1


def image_bytes(a: np.ndarray, fmt: str, quality: int | None = None) -> bytes:
    """One uint8 image [H, W] or [H, W, C] -> png/jpeg/webp bytes."""
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    buf = io.BytesIO()
    img = Image.fromarray(np.ascontiguousarray(a))
    if fmt == "png":
        img.save(buf, format="PNG", compress_level=PNG_LEVEL)
    elif fmt in ("jpeg", "webp"):
        img.save(buf, format=fmt.upper(), quality=quality or DEFAULT_QUALITY)
    else:
        raise ValueError(f"unknown image format {fmt!r}; allowed: {list(FORMATS)}")
    return buf.getvalue()


def b64_pngs(pixels: np.ndarray, scale: int = 1) -> list[str]:
    """uint8 images [n, H, W, C] -> one base64 PNG each (format=json, the OpenAI route)."""
    return [base64.b64encode(image_bytes(upscale(a, scale), "png")).decode() for a in pixels]


def encode(pixels: np.ndarray, fmt: str, quality: int | None = None, scale: int = 1, meta: dict | None = None) -> bytes:
    """uint8 images [n, H, W, C] -> the response body: one image (a grid for n > 1), or for json
    `meta` plus 'images': base64 PNGs, one per image."""
    if fmt == "json":
        body = dict(meta or {})
        body["images"] = b64_pngs(pixels, scale)
        return json.dumps(body).encode()
    a = pixels[0] if len(pixels) == 1 else grid(list(pixels))
    return image_bytes(upscale(a, scale), fmt, quality)


class Encoder:
    """The API process's encoding pool."""

    def __init__(self, threads: int):
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="stride-encode")

    async def __call__(self, pixels: np.ndarray, fmt: str, quality=None, scale: int = 1, meta=None) -> bytes:
        return await asyncio.get_running_loop().run_in_executor(self.pool, encode, pixels, fmt, quality, scale, meta)

    async def b64_pngs(self, pixels: np.ndarray, scale: int = 1) -> list[str]:
        return await asyncio.get_running_loop().run_in_executor(self.pool, b64_pngs, pixels, scale)

    def close(self):
        self.pool.shutdown(wait=False)

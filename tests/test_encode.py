"""Encoding in the API process: formats, grids, upscaling, JSON, and the worker's raw-pixel Result."""
import base64
import json

import numpy as np
import pytest
import torch

from stride_diffusion.service import images
from stride_diffusion.service.encode import encode, image_bytes
from stride_diffusion.service.jobs import Result


def ramp(n=1, c=1):
    x = torch.linspace(-1, 1, 64).reshape(1, 1, 8, 8).repeat(n, c, 1, 1)
    return images.quantize(x, (-1, 1)).numpy()  # [n, 8, 8, c]


def test_quantize_rounds_to_nearest_and_clamps():
    x = torch.tensor([-2.0, -1.0, -1 + 1.49 / 127.5, -1 + 1.51 / 127.5, 0.0, 1.0, 3.0]).reshape(1, 1, 1, 7)
    assert images.quantize(x, (-1, 1)).reshape(-1).tolist() == [0, 0, 1, 2, 128, 255, 255]


def test_png_scale_and_grid():
    one = images.decode(encode(ramp(), "png", scale=8))
    assert one.shape == (64, 64) and one[0, 0] == 0 and one[-1, -1] == 255
    g = images.decode(encode(ramp(5), "png", scale=2))
    assert g.shape == ((2 * 8 + 1) * 2, (3 * 8 + 2) * 2)  # 5 images -> 3 columns x 2 rows, 1-pixel gaps
    assert np.array_equal(g[:16, :16], images.upscale(ramp()[0, ..., 0], 2))


@pytest.mark.parametrize("fmt,magic", [("jpeg", b"\xff\xd8"), ("webp", b"RIFF")])
def test_lossy_formats_and_quality(fmt, magic):
    px = ramp(1, 3)
    lo, hi = encode(px, fmt, quality=10), encode(px, fmt, quality=95)
    assert lo[:2 if fmt == "jpeg" else 4] == magic and len(lo) < len(hi)
    back = images.decode(hi).astype(int)
    assert back.shape == (8, 8, 3) and np.abs(back - px[0].astype(int)).max() < 16


def test_json_has_one_png_per_image_and_the_meta():
    px = ramp(3)
    d = json.loads(encode(px, "json", scale=1, meta={"seeds": [4, 5, 6]}))
    assert d["seeds"] == [4, 5, 6] and len(d["images"]) == 3
    assert np.array_equal(images.decode(base64.b64decode(d["images"][2])), px[2, ..., 0])


def test_encoding_is_deterministic():
    px = ramp(2, 3)
    for fmt in ("png", "jpeg", "webp", "json"):
        assert encode(px, fmt) == encode(px.copy(), fmt)


def test_unknown_format_names_the_allowed():
    with pytest.raises(ValueError, match="allowed"):
        image_bytes(ramp()[0], "gif")


def test_result_carries_raw_pixels():
    px = np.arange(2 * 3 * 4 * 1, dtype=np.uint8).reshape(2, 3, 4, 1)
    px[0, 0, 0, 0] = ord("\n")  # a newline byte in the pixels does not cut the frame
    r = Result.of_images("j1", px, solver="euler", nfe=4, worker="w")
    back = Result.loads(r.dumps())
    assert back.shape == [2, 3, 4, 1] and np.array_equal(back.images(), px)
    assert (back.id, back.status, back.solver, back.nfe, back.worker) == ("j1", 200, "euler", 4, "w")
    err = Result.loads(Result("j2", 504, "late").dumps())
    assert err.status == 504 and err.pixels == b""

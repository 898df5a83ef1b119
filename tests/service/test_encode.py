"""Encoding in the API process: formats, grids, upscaling, JSON, and the worker's raw-pixel Result."""
import base64
import io
import json

import numpy as np
import pytest
import torch

from stride_diffusion.service import images
from stride_diffusion.service.encode import encode, image_bytes, png_bytes
from stride_diffusion.service.jobs import Outcome, Result


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


@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (16, 16, 1), (9, 4, 2), (33, 17, 3), (8, 8, 4), (64, 48, 3)])
def test_png_writer_is_lossless_at_every_level(shape):
    """`png_bytes` (Up filter, one zlib stream) read back by PIL: the same pixels, every channel count
    and zlib level; strided input too; level 0 stores, higher levels shrink a compressible image."""
    from PIL import Image

    g = np.random.default_rng(sum(shape))
    a = g.integers(0, 256, shape, dtype=np.uint8)
    for level in range(10):
        back = np.asarray(Image.open(io.BytesIO(png_bytes(a, level))))
        assert np.array_equal(back.reshape(a.shape), a), level
    wide = g.integers(0, 256, (shape[0], 2 * shape[1], *shape[2:]), dtype=np.uint8)[:, ::2]
    assert np.array_equal(images.decode(png_bytes(wide)).reshape(wide.shape), wide)
    smooth = np.broadcast_to(np.arange(64, dtype=np.uint8)[:, None, None], (64, 64, 3))
    assert len(png_bytes(smooth, 1)) < len(png_bytes(smooth, 0)) // 20 < 64 * 64 * 3


def test_unknown_format_names_the_allowed():
    with pytest.raises(ValueError, match="allowed"):
        image_bytes(ramp()[0], "gif")


def test_result_carries_raw_pixels():
    px = np.arange(2 * 3 * 4 * 1, dtype=np.uint8).reshape(2, 3, 4, 1)
    px[0, 0, 0, 0] = ord("\n")  # a newline byte in the pixels does not cut the frame
    r = Result.of_images("j1", px, solver="euler", nfe=4, worker="w")
    back = Result.loads(r.dumps())
    assert back.shape == [2, 3, 4, 1] and np.array_equal(back.images(), px)
    assert (back.id, back.outcome, back.solver, back.nfe, back.worker) == ("j1", Outcome.OK, "euler", 4, "w")
    err = Result.loads(Result("j2", Outcome.EXPIRED, "late").dumps())
    assert err.outcome is Outcome.EXPIRED and not err.ok and err.pixels == b""


def noisy_rgb(size=64):
    g = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    img = np.stack([(xx + yy) * 2, 255 - 4 * xx, 4 * yy], -1) % 256 + g.normal(0, 4, (size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)[None]


def test_png_level_trades_size_for_time_and_keeps_the_pixels():
    px = noisy_rgb()
    sizes = {lvl: len(encode(px, "png", png_level=lvl)) for lvl in (0, 1, 9)}
    assert sizes[0] > sizes[1] >= sizes[9]
    for lvl in (0, 9):
        assert np.array_equal(images.decode(encode(px, "png", png_level=lvl)), px[0])
        d = json.loads(encode(px, "json", png_level=lvl))  # the base64 PNGs too
        assert len(base64.b64decode(d["images"][0])) == sizes[lvl]


def test_encode_pool_defaults_to_the_cores_and_png_level_is_a_setting():
    import asyncio
    import os

    from pydantic import ValidationError

    from stride_diffusion.service.app import create_app
    from stride_diffusion.service.encode import Encoder, default_threads
    from stride_diffusion.service.settings import Settings

    assert default_threads() == max(1, min(32, len(os.sched_getaffinity(0))))
    enc = Encoder()
    assert enc.threads == default_threads() and enc.png_level == 1
    enc.close()
    with pytest.raises(ValueError, match="0..9"):
        Encoder(2, png_level=10)
    with pytest.raises(ValidationError, match="png_level"):
        Settings(png_level=10)
    svc = create_app(Settings(test_model="gmm", png_level=9, encode_threads=3)).state.service
    assert (svc.encoder.threads, svc.encoder.png_level) == (3, 9)
    px = noisy_rgb()
    assert asyncio.run(svc.encoder(px, "png")) == encode(px, "png", png_level=9)
    svc.encoder.close()
    svc = create_app(Settings(test_model="gmm")).state.service
    assert svc.encoder.threads == default_threads()
    svc.encoder.close()


# -- the worker encodes /generate's image bodies; the API forwards them ---------------------------------

def test_encoded_result_round_trip_and_the_previous_versions_format():
    """A Result holding a body says so (`encoded`); one holding pixels writes no `encoded` key, so an
    API of the previous version (which knows no such field) still reads it."""
    body = b"\x89PNG\r\n\x1a\n..."
    r = Result.loads(Result("j", Outcome.OK, pixels=body, encoded="png").dumps())
    assert r.encoded == "png" and r.pixels == body
    with pytest.raises(ValueError, match="png body, not pixels"):
        r.images()
    raw = Result.of_images("j", np.zeros((1, 2, 2, 1), np.uint8)).dumps()
    assert b"encoded" not in raw.partition(b"\n")[0] and Result.loads(raw).encoded == ""


def test_the_encode_wish_travels_beside_the_job():
    """Job.encode goes in the watch field (a worker of the previous version reads the job alone and
    answers with pixels, which the API then encodes)."""
    from stride_diffusion.service.jobs import Job

    j = Job("j", "m", 2, "euler", 1, 1, 0, 1.0, "png", 1e18, 0.0, encode=True)
    assert "encode" not in json.loads(j.dumps()) and json.loads(j.watch()) == {"encode": True}
    assert Job.loads(j.dumps(), j.watch()).encode and not Job.loads(j.dumps()).encode


def test_redis_worker_encodes_generate_images(tmp_path):
    """Redis mode: /generate's PNG is encoded in the worker process (its encode metric counts it, the
    API's does not) and is the PNG the API would have made; json stays the API's."""
    import httpx
    from service_fixtures import ApiServer, RedisServer, WorkerProc, metric_value

    from stride_diffusion.service.settings import Settings

    rs = RedisServer()
    wp = WorkerProc(rs.url, "w-enc", prefix="enc", metrics=True).wait_ready()
    api = ApiServer(Settings(role="api", redis_url=rs.url, key_prefix="enc", test_model="gmm", steps=[2]))
    try:
        def counts():
            return [metric_value(t, "stride_encode_seconds_count", format=f) for t in
                    (wp.metrics_text(), httpx.get(api.url + "/metrics").text) for f in ("png", "json")]

        png = httpx.post(api.url + "/generate", json={"class_label": 1, "steps": 2, "seed": 3, "format": "png"}, timeout=60)
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        assert counts() == [1, 0, 0, 0]  # worker png, worker json, API png, API json
        js = httpx.post(api.url + "/generate", json={"class_label": 1, "steps": 2, "seed": 3, "format": "json"}, timeout=60)
        assert js.status_code == 200 and counts() == [1, 0, 0, 1]
        px = images.decode(base64.b64decode(js.json()["images"][0]))
        assert np.array_equal(images.decode(png.content), px)
        assert png.content == encode(px[None, ..., None] if px.ndim == 2 else px[None], "png")  # byte for byte
    finally:
        api.stop()
        wp.stop()
        rs.stop()

"""Embedded mode (no REDIS_URL): API and worker in one process over the in-process queue."""
import base64
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from service_fixtures import ROOT, ApiServer, free_port, metric_value, reference, tiny_artifact, wait_for

from stride_diffusion.service import images
from stride_diffusion.service.models import Registry, analytic_entry
from stride_diffusion.service.settings import Settings

STEPS = [1, 2, 4, 8, 16]


def settings(**kw):
    base = dict(test_model="gmm", steps=STEPS, max_batch=32, max_wait_ms=20, max_images=8, threads=1)
    return Settings(**{**base, **kw})


@pytest.fixture(scope="module")
def api():
    srv = ApiServer(settings())
    yield srv
    srv.stop()


def post(api, params=None, json=None, content=None, headers=None, timeout=30):
    return httpx.post(api.url + "/generate", params=params, json=json, content=content, headers=headers, timeout=timeout)


def test_png_end_to_end(api):
    r = post(api, {"class_label": 3, "seed": 7, "steps": 4})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["x-stride-solver"] == "dpmpp-2m" and r.headers["x-stride-nfe"] == "4"
    assert float(r.headers["x-stride-queue-ms"]) >= 0 and float(r.headers["x-stride-compute-ms"]) > 0
    assert np.array_equal(images.decode(r.content), reference(3, 7, 4))


def test_json_end_to_end_with_per_image_seeds(api):
    r = post(api, json={"class_label": "five", "n": 3, "seed": 40, "steps": 2, "format": "json", "solver": "heun"})
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["seeds"] == [40, 41, 42] and d["solver"] == "heun" and d["nfe"] == 2 and d["class_label"] == 5
    for s, b64 in zip(d["seeds"], d["images"]):
        assert np.array_equal(images.decode(base64.b64decode(b64)), reference(5, s, 2, "heun"))


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_lossy_formats_end_to_end(api, fmt):
    r = post(api, {"class_label": 2, "seed": 9, "steps": 4, "format": fmt, "quality": 95})
    assert r.status_code == 200 and r.headers["content-type"] == f"image/{fmt}"
    got = images.decode(r.content).astype(int)
    got = got if got.ndim == 2 else got[..., 0]  # WebP has no greyscale mode: grey as RGB
    err = np.abs(got - reference(2, 9, 4).astype(int))
    assert err.mean() < 4  # lossy, at quality 95 close to the PNG


def test_query_and_body_combine_and_random_seed_is_returned(api):
    r = post(api, {"steps": 1}, json={"class_label": 0, "format": "json"})
    d = r.json()
    assert r.status_code == 200 and isinstance(d["seed"], int) and d["seeds"] == [d["seed"]]
    assert np.array_equal(images.decode(base64.b64decode(d["images"][0])), reference(0, d["seed"], 1))


def test_grid_for_n_greater_than_one(api):
    r = post(api, {"class_label": 1, "n": 4, "seed": 3, "steps": 1})
    g = images.decode(r.content)
    assert g.shape == ((2 * 8 + 1) * 8, (2 * 8 + 1) * 8)
    assert np.array_equal(g[:64, 72:136], reference(1, 4, 1))  # image 1 (top right) uses seed 3 + 1


def test_same_seed_same_image_alone_and_in_a_mixed_batch(api):
    alone = post(api, {"class_label": 2, "seed": 1234, "steps": 8, "guidance": 1.5}).content
    before = api.service.metrics.model_calls.labels("gmm")._value.get()
    others = [{"class_label": k % 10, "seed": k, "steps": [1, 4, 16, 8][k % 4], "guidance": [1, 2][k % 2],
               "solver": ["auto", "ipndm", "unipc", "dpmpp-3m"][k % 4], "n": 1 + k % 3} for k in range(7)]
    reqs = others[:3] + [{"class_label": 2, "seed": 1234, "steps": 8, "guidance": 1.5}] + others[3:]
    with ThreadPoolExecutor(len(reqs)) as ex:
        rs = list(ex.map(lambda p: post(api, p), reqs))
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
    calls = api.service.metrics.model_calls.labels("gmm")._value.get() - before
    assert calls < sum(p["steps"] for p in reqs)  # they did share model calls
    assert rs[3].content == alone
    for p, r in zip(reqs, rs):
        if p.get("n", 1) == 1:
            assert np.array_equal(images.decode(r.content),
                                  reference(p["class_label"], p["seed"], p["steps"], p.get("solver", "auto"),
                                            p["guidance"]))


BAD = [
    ({"class_label": 1, "steps": 0}, 422, "steps must be one of [1, 2, 4, 8, 16]"),
    ({"class_label": 1, "steps": 10000}, 422, "steps must be one of"),
    ({"class_label": 1, "steps": "four"}, 422, "steps must be an integer"),
    ({"class_label": 1, "steps": 4.5}, 422, "steps must be an integer"),
    ({"class_label": 10}, 422, "0..9 or one of the class names"),
    ({"class_label": "eleven"}, 422, "'zero', 'one'"),
    ({}, 422, "class_label is required"),
    ({"class_label": 1, "model": "nope"}, 404, "unknown model 'nope'; available: ['gmm']"),
    ({"class_label": 1, "solver": "rk45"}, 422, "unknown solver 'rk45'; allowed: 'auto', ['euler'"),
    ({"class_label": 1, "n": 0}, 422, "n must be in 1..8"),
    ({"class_label": 1, "n": 1000}, 422, "n must be in 1..8"),
    ({"class_label": 1, "guidance": "nan"}, 422, "guidance must be a finite number in [0, 20]"),
    ({"class_label": 1, "guidance": "inf"}, 422, "guidance must be a finite number"),
    ({"class_label": 1, "guidance": -1}, 422, "guidance must be a finite number"),
    ({"class_label": 1, "format": "gif"}, 422, "format must be one of ['png', 'jpeg', 'webp', 'json']"),
    ({"class_label": 1, "seed": -5}, 422, "seed must be in 0..4294967295"),
    ({"class_label": 1, "format": "jpeg", "quality": 0}, 422, "quality must be in 1..100"),
    ({"class_label": 1, "stpes": 4}, 422, "unknown field(s) ['stpes']"),
]


@pytest.mark.parametrize("params,status,needle", BAD, ids=[str(b[0]) for b in BAD])
def test_bad_inputs_name_the_problem(api, params, status, needle):
    r = post(api, params)
    assert r.status_code == status and needle in r.json()["detail"], r.text


@pytest.mark.parametrize("body,needle", [
    (b'{"class_label": 1,', "body is not valid JSON"),
    (b'[1, 2]', "body must be a JSON object"),
    (b'{"class_label": 1, "guidance": NaN}', "guidance must be a finite number"),
    (b'{"class_label": true}', "0..9 or one of the class names"),
    (b'{"class_label": 1, "n": "many"}', "n must be an integer"),
])
def test_bad_json_bodies(api, body, needle):
    r = post(api, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422 and needle in r.json()["detail"], r.text


def test_oversized_body(api):
    r = post(api, content=b'{"class_label": 1, "solver": "' + b"x" * 70000 + b'"}',
             headers={"content-type": "application/json"})
    assert r.status_code == 413 and "body larger than" in r.json()["detail"]


def test_field_given_twice(api):
    r = post(api, {"class_label": 1}, json={"class_label": 2})
    assert r.status_code == 422 and "both" in r.json()["detail"]


def test_info_endpoints(api):
    m = httpx.get(api.url + "/models").json()
    assert m["default"] == "gmm" and m["models"][0]["classes"][3] == "three" and m["models"][0]["steps"] == STEPS
    s = httpx.get(api.url + "/solvers").json()["models"]["gmm"]
    assert s["steps"]["4"]["solver"] == "dpmpp-2m" and "ipndm" in s["available"]
    assert httpx.get(api.url + "/healthz").json() == {"status": "ok"}
    assert httpx.get(api.url + "/readyz").status_code == 200
    doc = httpx.get(api.url + "/openapi.json").json()
    body = doc["paths"]["/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"class_label", "steps", "seed", "guidance", "solver", "format", "n", "model"} <= set(body["properties"])
    assert "parameters" not in doc["paths"]["/generate"]["post"]  # one place per field: the body
    assert httpx.get(api.url + "/docs").status_code == 200
    text = httpx.get(api.url + "/metrics").text
    for name in ("stride_request_duration_seconds_bucket", "stride_queue_wait_seconds_bucket",
                 "stride_compute_seconds_bucket", "stride_images_total", "stride_model_evaluations_total",
                 "stride_batch_rows_bucket", "stride_queue_depth", "stride_workers_live", "stride_rejected_total"):
        assert name in text, name
    assert metric_value(text, "stride_images_total", model="gmm", steps="4") >= 1
    assert metric_value(text, "stride_rejected_total", reason="invalid") >= 1
    assert "seed=" not in text and "class_label=" not in text


def test_request_larger_than_a_batch_is_split_across_steps():
    srv = ApiServer(settings(max_batch=4, max_wait_ms=0))
    try:
        r = post(srv, json={"class_label": 8, "n": 8, "seed": 70, "steps": 4, "guidance": 2.5, "format": "json"})
        assert r.status_code == 200, r.text  # 8 guided images = 16 rows through a 4-row batch
        for s, b in zip(r.json()["seeds"], r.json()["images"]):
            assert np.array_equal(images.decode(base64.b64decode(b)), reference(8, s, 4, guidance=2.5))
        rows = srv.service.metrics.batch_rows.labels("gmm")
        assert rows._sum.get() <= 4 * srv.service.metrics.model_calls.labels("gmm")._value.get()
    finally:
        srv.stop()


def test_api_key():
    srv = ApiServer(settings(api_key="s3cret"))
    try:
        r = post(srv, {"class_label": 1})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert post(srv, {"class_label": 1}, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert httpx.get(srv.url + "/models").status_code == 401
        ok = post(srv, {"class_label": 1, "steps": 1}, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        for path in ("/healthz", "/readyz", "/metrics"):
            assert httpx.get(srv.url + path).status_code == 200, path
    finally:
        srv.stop()


def slow_registry(delay_ms):
    return Registry([analytic_entry(f"gmm:delay_ms={delay_ms}")])


def test_queue_full_gives_503_with_retry_after_and_nothing_is_dropped():
    srv = ApiServer(settings(queue_limit=2, max_batch=2, max_wait_ms=0, warmup=False), slow_registry(20))
    try:
        with ThreadPoolExecutor(8) as ex:
            rs = list(ex.map(lambda k: post(srv, {"class_label": 1, "seed": k, "steps": 8}), range(8)))
        codes = sorted(r.status_code for r in rs)
        assert set(codes) == {200, 503} and codes.count(200) >= 2, codes
        for r in rs:
            if r.status_code == 503:
                assert r.headers["retry-after"] == "1" and "queue full" in r.json()["detail"]
            else:
                assert np.array_equal(images.decode(r.content), reference(1, int(r.headers["x-stride-seed"]), 8))
    finally:
        srv.stop()


def test_expired_deadline_gives_504():
    srv = ApiServer(settings(deadline_s=0.3, warmup=False), slow_registry(30))
    try:
        r = post(srv, {"class_label": 1, "steps": 16})
        assert r.status_code == 504 and "deadline passed" in r.json()["detail"]
        text = httpx.get(srv.url + "/metrics").text
        assert metric_value(text, "stride_rejected_total", reason="deadline") == 1
        assert post(srv, {"class_label": 1, "steps": 1}).status_code == 200  # the worker carries on
    finally:
        srv.stop()


def test_stride_serve_cli_serves_an_artifact(tmp_path):
    """`stride serve --artifacts DIR` end to end: the top-level entry, the artifact loader, uvicorn."""
    art = tiny_artifact(tmp_path / "tiny")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "stride_diffusion.cli", "serve", "--artifacts", str(art), "--port", str(port),
                             "--steps", "1,2", "--max-batch", "4", "--log-level", "warning"], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": ROOT}, stderr=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: httpx.get(url + "/readyz").status_code == 200, 60, "stride serve", 0.2)
        line = proc.stdout.readline()  # and `stride serve` says so (within its 0.2 s poll of readiness)
        assert line.startswith(f"stride: ready on http://127.0.0.1:{port}"), line
        r = httpx.post(url + "/generate", params={"class_label": "b", "steps": 2, "seed": 1}, timeout=30)
        assert r.status_code == 200 and images.decode(r.content).shape == (8, 8)  # no display scale: 1
        assert httpx.get(url + "/models").json()["models"][0]["classes"] == ["a", "b", "c"]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) in (0, -signal.SIGTERM), proc.stderr.read()[-2000:]  # uvicorn re-raises it

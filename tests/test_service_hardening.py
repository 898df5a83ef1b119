"""The API against hostile and careless input: no 500 from any input, bodies bounded while they stream,
the OpenAPI document as the contract (fuzzed with schemathesis, every check), guidance honoured or
refused, cancel on client disconnect (embedded and Redis), docs without a CDN, AOF Redis restart."""
import json
import re
import select
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from service_fixtures import (
    ApiServer,
    RedisServer,
    WorkerProc,
    guided_entry,
    metric_value,
    reference,
    wait_for,
)

from stride_diffusion.service import images
from stride_diffusion.service.limits import MAX_BODY
from stride_diffusion.service.models import Registry, analytic_entry
from stride_diffusion.service.params import SEED_MAX
from stride_diffusion.service.settings import Settings

STEPS = [1, 2, 4, 8, 16]


def settings(**kw):
    base = {"test_model": "gmm", "steps": STEPS, "max_batch": 32, "max_wait_ms": 5, "max_images": 8, "threads": 1}
    return Settings(**{**base, **kw})


@pytest.fixture(scope="module")
def api():
    """The gmm model with a guidance-input variant 'secant-test' trained on [1, 3], best at 4 steps."""
    srv = ApiServer(settings(), Registry([guided_entry()]))
    yield srv
    srv.stop()


def post(api, params=None, json=None, content=None, headers=None):
    return httpx.post(api.url + "/generate", params=params, json=json, content=content, headers=headers, timeout=30)


def metrics(api) -> str:
    return httpx.get(api.url + "/metrics").text


# -- 1. no input reaches a 500 ------------------------------------------------------------------------
HUGE = "9" * 5000  # past Python's int-from-string digit limit


@pytest.mark.parametrize("params,json_body,field", [
    ({"class_label": 3, "steps": HUGE}, None, "steps"),
    ({"class_label": 3, "n": HUGE}, None, "n"),
    ({"class_label": 3, "seed": HUGE}, None, "seed"),
    ({"class_label": 3, "seed": "-" + HUGE}, None, "seed"),
    ({"class_label": HUGE}, None, "class_label"),
    ({"class_label": 3, "guidance": HUGE}, None, "guidance"),
    ({"class_label": 3, "guidance": "1e999"}, None, "guidance"),
    (None, {"class_label": 3, "guidance": 10 ** 400}, "guidance"),  # a JSON integer too large for a float
    (None, {"class_label": 3, "seed": 10 ** 400}, "seed"),
    (None, {"class_label": 3, "n": 1e300}, "n"),
    (None, {"class_label": 3, "steps": -(10 ** 30)}, "steps"),
    (None, {"class_label": 10 ** 400}, "class_label"),
])
def test_huge_numbers_are_422_naming_the_field(api, params, json_body, field):
    before = metric_value(metrics(api), "stride_responses_total", code="500")
    r = post(api, params, json=json_body)
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field and "allowed" in r.json() and len(r.text) < 2000
    assert metric_value(metrics(api), "stride_responses_total", code="500") == before


def test_json_body_with_an_integer_beyond_the_digit_limit(api):
    r = post(api, content=b'{"class_label": 3, "seed": ' + HUGE.encode() + b"}",
             headers={"content-type": "application/json"})
    assert r.status_code == 422 and "not valid JSON" in r.json()["detail"]


def test_unexpected_error_is_a_json_500_with_a_request_id_logged_and_counted(api, monkeypatch, caplog):
    async def broken(job):
        raise RuntimeError("boom")

    text = metrics(api)
    c500, err = (metric_value(text, "stride_responses_total", code="500"),
                 metric_value(text, "stride_rejected_total", reason="error"))
    monkeypatch.setattr(api.service.queue, "submit", broken)
    with caplog.at_level("ERROR", logger="stride.api"):
        r = post(api, {"class_label": 1})
    assert r.status_code == 500 and r.headers["content-type"] == "application/json"
    rid = r.json()["request_id"]
    assert rid and r.headers["x-stride-request-id"] == rid and "boom" not in r.text  # no internals leak
    assert any(rid in rec.getMessage() and rec.exc_info for rec in caplog.records)
    text = metrics(api)
    assert metric_value(text, "stride_responses_total", code="500") == c500 + 1
    assert metric_value(text, "stride_rejected_total", reason="error") == err + 1


# -- 4. falsy and wrong-typed values, duplicate keys, content type ---------------------------------------
@pytest.mark.parametrize("params,body,status,field", [
    (None, {"class_label": 1, "model": {}}, 422, "model"),
    (None, {"class_label": 1, "model": 0}, 422, "model"),
    (None, {"class_label": 1, "model": ""}, 404, "model"),
    (None, {"class_label": 1, "solver": False}, 422, "solver"),
    (None, {"class_label": 1, "solver": ""}, 422, "solver"),
    (None, {"class_label": 1, "solver": None}, 422, "solver"),
    ({"class_label": 1, "solver": ""}, None, 422, "solver"),
    ({"class_label": 1, "model": ""}, None, 404, "model"),
    (None, {"class_label": 1, "n": None}, 422, "n"),
    (None, {"class_label": 1, "n": "2"}, 422, "n"),  # a JSON string is never a number
    (None, {"class_label": "3"}, 422, "class_label"),
    (None, {"class_label": 1, "format": "PNG"}, 422, "format"),
    (None, {"class_label": 1, "format": 0}, 422, "format"),
    (None, {"class_label": 1, "steps": True}, 422, "steps"),
])
def test_falsy_and_wrong_typed_values_are_refused(api, params, body, status, field):
    r = post(api, params, json=body)
    assert r.status_code == status and r.json()["field"] == field, r.text


def test_duplicate_json_keys_are_refused(api):
    r = post(api, content=b'{"class_label": 1, "steps": 4, "steps": 8}', headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["field"] == "steps" and "more than once" in r.json()["detail"]


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", None])
def test_a_body_that_is_not_json_gets_415(api, ctype):
    r = post(api, content=b'{"class_label": 1}', headers={"content-type": ctype} if ctype else {})
    assert r.status_code == 415 and "application/json" in r.json()["detail"], r.text


def test_json_content_type_with_charset_is_json(api):
    r = post(api, content=b'{"class_label": 1, "seed": 3, "steps": 1}',
             headers={"content-type": "application/json; charset=utf-8"})
    assert r.status_code == 200


# -- 2. bodies bounded while they stream ---------------------------------------------------------------
def _raw(api, head: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", api.port), timeout=10)
    s.sendall(head)
    return s


def _response(s: socket.socket) -> bytes:
    """Headers and the whole body (by Content-Length): they may arrive in separate packets."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    n = int(next(v for k, _, v in (ln.partition(b":") for ln in head.split(b"\r\n")) if k.lower() == b"content-length"))
    while len(body) < n:
        body += s.recv(65536)
    return head + b"\r\n\r\n" + body


def _status(data: bytes) -> int:
    return int(data.split(b" ", 2)[1])


def test_chunked_body_past_the_limit_is_413_without_reading_the_rest(api):
    """100 MB offered in 64 KiB chunks: the server answers 413 and closes after about the limit, so the
    client cannot push more than the limit plus what the kernel's socket buffers absorb."""
    s = _raw(api, b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")
    chunk = b"%x\r\n" % 65536 + b" " * 65536 + b"\r\n"
    sent, reply = 0, b""
    try:
        while sent < 100 * 2 ** 20:
            if select.select([s], [], [], 0)[0]:
                break
            s.sendall(chunk)
            sent += 65536
    except (BrokenPipeError, ConnectionResetError):
        pass
    try:
        while True:
            part = s.recv(65536)
            if not part:
                break
            reply += part
    except (TimeoutError, ConnectionResetError):
        pass
    s.close()
    assert reply and _status(reply) == 413, reply[:200]
    assert sent < 16 * 2 ** 20, f"the client pushed {sent} bytes: the server kept reading"
    assert httpx.get(api.url + "/healthz").status_code == 200


def test_declared_length_past_the_limit_is_413_before_any_body(api):
    s = _raw(api, b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % (100 * 2 ** 20))
    reply = _response(s)  # answered although not one byte of the body was sent
    s.close()
    assert _status(reply) == 413 and str(MAX_BODY).encode() in reply


# -- 5. guidance honoured or refused ------------------------------------------------------------------
@pytest.mark.parametrize("guidance,solver", [(2.0, "secant-test"), (1.0, "secant-test"), (3.0, "secant-test"),
                                             (6.0, "dpmpp-2m"), (20.0, "dpmpp-2m"), (0.0, "dpmpp-2m")])
def test_auto_picks_only_a_sampler_that_honours_the_guidance(api, guidance, solver):
    r = post(api, {"class_label": 2, "seed": 5, "steps": 4, "guidance": guidance})
    assert r.status_code == 200, r.text
    assert r.headers["x-stride-solver"] == solver and float(r.headers["x-stride-guidance"]) == guidance
    if solver == "dpmpp-2m":  # the guidance was applied, not clamped: the image is the reference at that scale
        assert np.array_equal(images.decode(r.content), reference(2, 5, 4, "dpmpp-2m", guidance))


@pytest.mark.parametrize("guidance", [0.0, 0.5, 6.0, 20.0])
def test_an_explicit_sampler_that_cannot_honour_the_guidance_is_422_naming_its_range(api, guidance):
    r = post(api, json={"class_label": 2, "steps": 4, "guidance": guidance, "solver": "secant-test"})
    assert r.status_code == 422 and r.json()["field"] == "guidance" and r.json()["allowed"] == [1.0, 3.0]
    assert "[1, 3]" in r.json()["detail"]


def test_guidance_header_reports_the_default_when_none_is_asked(api):
    r = post(api, {"class_label": 2, "seed": 5, "steps": 4, "format": "json"})
    assert r.headers["x-stride-guidance"] == "1" and r.json()["guidance"] == 1.0


# -- 3. the OpenAPI document is the contract ----------------------------------------------------------
def test_openapi_states_every_status_limit_enum_and_content_type(api):
    doc = httpx.get(api.url + "/openapi.json").json()
    op = doc["paths"]["/generate"]["post"]
    assert {"200", "404", "413", "415", "422", "500", "503", "504"} <= set(op["responses"])
    assert op["responses"]["503"]["headers"]["Retry-After"]["required"] is True
    assert "X-Stride-Guidance" in op["responses"]["200"]["headers"]
    assert "parameters" not in op  # every field in one place: the body (the query form is a stated alternative)
    body = op["requestBody"]["content"]["application/json"]["schema"]
    p = body["properties"]
    assert body["additionalProperties"] is False and body["required"] == ["class_label"]
    assert p["steps"]["anyOf"][0]["enum"] == STEPS
    assert p["n"]["minimum"] == 1 and p["n"]["maximum"] == 8
    assert p["seed"]["anyOf"][0]["maximum"] == SEED_MAX and p["guidance"]["anyOf"][0]["maximum"] == 20
    assert p["format"]["enum"] == ["png", "jpeg", "webp", "json"]
    assert p["quality"]["anyOf"][0] == {"type": "integer", "minimum": 1, "maximum": 100}
    assert p["class_label"]["anyOf"][1]["enum"] == sorted(guided_entry().class_names)
    assert {"auto", "euler", "dpmpp-2m/karras", "secant-test"} <= set(p["solver"]["enum"])
    secant = [b for b in body["anyOf"] if b["properties"]["solver"]["enum"] == ["secant-test"]]
    assert secant[0]["properties"]["guidance"]["anyOf"][0] == {"type": "number", "minimum": 1.0, "maximum": 3.0}
    assert doc["paths"]["/readyz"]["get"]["responses"]["503"]
    assert list(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    assert httpx.get(api.url + "/metrics").headers["content-type"].startswith("text/plain")


def test_schemathesis_every_check_finds_no_failure(api, tmp_path):
    """Property-based, from the OpenAPI document: examples, coverage and fuzzing phases, all checks
    (no 5xx, status codes, content types, headers and bodies as declared, schema-valid data accepted,
    invalid data rejected, unsupported methods refused)."""
    pytest.importorskip("schemathesis")
    cmd = [sys.executable, "-c", "import sys; from schemathesis.cli import schemathesis; sys.exit(schemathesis())",
           "run", api.url + "/openapi.json", "--checks", "all", "--max-examples", "40", "--seed", "16",
           "--request-timeout", "20", "--no-color"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    m = re.search(r"(\d+) generated, (\d+) passed", r.stdout)
    assert m and int(m.group(1)) >= 100 and m.group(1) == m.group(2), r.stdout[-3000:]


# -- 7. docs without a CDN ----------------------------------------------------------------------------
def test_docs_reference_no_external_host_and_its_assets_are_served(api):
    html = httpx.get(api.url + "/docs").text
    assert "SwaggerUIBundle" in html
    assert not re.findall(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", html, re.IGNORECASE), "a CDN or other host"
    assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html)
    assert {"/docs/swagger-ui-bundle.js", "/docs/swagger-ui.css"} <= set(assets)
    for a in assets:
        r = httpx.get(api.url + a)
        assert r.status_code == 200 and len(r.content) > 100, a
    assert "'validatorUrl': null" in html or '"validatorUrl": null' in html
    assert httpx.get(api.url + "/redoc").status_code == 404  # not offered: it would load fonts from a CDN
    # and an installed package carries the files (package data, not only the source tree)
    from stride_diffusion.service.openapi import DOC_FILES, STATIC

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    data = tomllib.loads((STATIC.parents[3] / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert all(STATIC.joinpath(f).is_file() for f in DOC_FILES)
    assert "static/swagger-ui/*" in data["stride_diffusion.service"]


# -- 6. cancel on client disconnect -------------------------------------------------------------------
def _send_generate(port: int, body: dict) -> socket.socket:
    data = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
              % len(data) + data)
    return s


def _cancel_mid_run(url: str, port: int, rows, evaluations):
    """A (4 images, 16 steps) starts; B (1 image) joins its batch; A's client goes away. Returns B's
    response and the evaluations made, once the batch is empty."""
    a = _send_generate(port, {"class_label": 1, "n": 4, "seed": 10, "steps": 16})
    wait_for(lambda: rows() >= 4, 20, "A's rows in the batch")
    with ThreadPoolExecutor(1) as ex:
        fb = ex.submit(httpx.post, url + "/generate", json={"class_label": 7, "seed": 99, "steps": 16}, timeout=60)
        wait_for(lambda: rows() >= 5, 20, "B's row beside A's")
        a.close()  # the client of A goes away mid-run
        b = fb.result()
    wait_for(lambda: rows() == 0, 20, "the batch to empty")
    return b, evaluations()


def test_client_disconnect_frees_its_rows_and_the_batch_completes_unchanged():
    entry = analytic_entry("gmm:delay_ms=40")
    srv = ApiServer(settings(max_wait_ms=0), Registry([entry]))
    try:
        w = srv.service.worker
        b, ev = _cancel_mid_run(srv.url, srv.port, lambda: w.engine.rows,
                                lambda: srv.service.metrics.evaluations.labels("gmm")._value.get())
        assert b.status_code == 200 and np.array_equal(images.decode(b.content), reference(7, 99, 16))
        assert ev < 16 + 4 * 16, "A's rows were evaluated to the end"
        text = metrics(srv)
        assert metric_value(text, "stride_rejected_total", reason="cancelled") == 1
        assert metric_value(text, "stride_worker_results_total", outcome="cancelled") == 1
        assert not w.tasks and not srv.service.queue.futures
    finally:
        srv.stop()


@pytest.fixture()
def redis_server():
    srv = RedisServer()
    yield srv
    srv.stop()


def test_client_disconnect_in_redis_mode_cancels_through_a_marker(redis_server):
    prefix = "cancel"
    wp = WorkerProc(redis_server.url, "w-cancel", prefix=prefix, delay_ms=40, metrics=True,
                    extra=["--max-wait-ms", "0"]).wait_ready()
    api = ApiServer(Settings(role="api", redis_url=redis_server.url, key_prefix=prefix, test_model="gmm", steps=STEPS,
                             max_images=8, heartbeat_s=0.2))
    try:
        def wm(name, **labels):
            return metric_value(wp.metrics_text(), name, **labels)

        b, ev = _cancel_mid_run(api.url, api.port, lambda: wm("stride_worker_rows"),
                                lambda: wm("stride_model_evaluations_total", model="gmm"))
        assert b.status_code == 200 and np.array_equal(images.decode(b.content), reference(7, 99, 16))
        assert ev < 16 + 4 * 16, "A's rows were evaluated to the end"
        assert wm("stride_worker_results_total", outcome="cancelled") == 1
        assert metric_value(metrics(api), "stride_rejected_total", reason="cancelled") == 1
        r = redis_server.client()
        assert r.xlen(f"{prefix}:requests:gmm") == 0  # the cancelled entry was released, not left to redeliver
        assert len(r.keys(f"{prefix}:cancel:*")) == 1
    finally:
        api.stop()
        wp.stop()


# -- 8. with AOF, a Redis restart by SIGKILL loses no accepted request ----------------------------------
def test_aof_redis_killed_and_restarted_loses_no_accepted_request(tmp_path):
    rs = RedisServer(aof_dir=tmp_path)
    prefix = "aof"
    wp = WorkerProc(rs.url, "w-aof", prefix=prefix, delay_ms=30, extra=["--max-wait-ms", "0", "--max-batch", "2"])
    wp.wait_ready()
    api = ApiServer(Settings(role="api", redis_url=rs.url, key_prefix=prefix, test_model="gmm", steps=STEPS,
                             heartbeat_s=0.2))
    try:
        reqs = [{"class_label": k, "seed": 100 + k, "steps": 16} for k in range(6)]
        with ThreadPoolExecutor(len(reqs)) as ex:
            futs = [ex.submit(httpx.post, api.url + "/generate", json=p, timeout=60) for p in reqs]
            # accepted = in the stream (a batch of 2 rows runs; the rest wait): then Redis dies
            wait_for(lambda: rs.client().xlen(f"{prefix}:requests:gmm") == len(reqs), 20, "all accepted")
            rs.proc.send_signal(signal.SIGKILL)
            rs.proc.wait(10)
            time.sleep(0.3)
            rs.start()
            res = [f.result() for f in futs]
        assert [r.status_code for r in res] == [200] * len(reqs), [r.text for r in res]
        for p, r in zip(reqs, res):
            assert np.array_equal(images.decode(r.content), reference(p["class_label"], p["seed"], 16))
    finally:
        api.stop()
        wp.stop()
        rs.stop()


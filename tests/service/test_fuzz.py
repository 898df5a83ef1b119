"""Every route under random input: methods, paths, query strings, JSON (and not quite JSON) bodies and
headers, seeded and bounded. No answer may be a 5xx, and no error may quote more than a bounded slice
of what was sent."""
import json
import random
import time

import pytest
from fastapi.testclient import TestClient
from service_fixtures import RedisServer

from stride_diffusion.service.app import create_app
from stride_diffusion.service.openai_api import FIELDS as OPENAI_FIELDS
from stride_diffusion.service.params import FIELDS
from stride_diffusion.service.settings import Settings

MARK = "Q" * 201  # long strings are runs of Q: an error quoting 201 of them echoes too much
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
ROUTES = ["/generate", "/generate/stream", "/v1/images/generations", "/models", "/solvers", "/healthz", "/readyz",
          "/metrics", "/openapi.json", "/docs", "/docs/swagger-ui.css", "/", "/playground/", "/playground/app.js"]
JUNK_PATHS = ["/generate/", "//generate", "/generate/../models", "/playground/../../../etc/passwd", "/%00", "/%ff%fe",
              "/docs/..%2f..%2fsettings.py", "/v1/images", "/v1/images/generations/x", "/" + "Q" * 3000, "/généré"]
CONTENT_TYPES = ["application/json", "application/json; charset=utf-8", "text/plain", "application/x-www-form-urlencoded",
                 "multipart/form-data; boundary=x", "", "application/json; charset=latin-1", "Q" * 5000]


def scalar(rng: random.Random):
    return rng.choice([
        None, True, False, 0, -1, 1, 3, 16, 17, 2 ** 31, 2 ** 32 - 1, 2 ** 32, 2 ** 64, -2 ** 70, 10 ** 400,
        0.5, 1.0, 2.5, -3.0, 1e308, 1e-308, float("inf"), float("nan"),
        "", "0", "3", "1.5", "auto", "euler", "dpmpp-2m", "secant-test", "png", "jpeg", "webp", "json", "b64_json",
        "url", "gmm", "digits", "auto", "8x8", "256x256", "zero", "class 1", "\x00", "\ud800", "é" * 50, "Q" * 300,
        "Q" * 70000, "<script>", "../../etc/passwd", " ", "null",
    ])


def value(rng: random.Random, depth: int = 0):
    k = rng.random()
    if k < 0.7 or depth > 3:
        return scalar(rng)
    if k < 0.8:
        return [value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if k < 0.9:
        return {rng.choice(FIELDS): value(rng, depth + 1) for _ in range(rng.randrange(3))}
    deep = 0
    for _ in range(rng.choice([50, 2000])):  # deeper than a JSON parser's recursion limit
        deep = [deep]
    return deep


def body(rng: random.Random, fields) -> bytes | None:
    k = rng.random()
    if k < 0.1:
        return None
    if k < 0.2:
        return rng.choice([b"{", b"not json", b"\xff\xfe\x00", b"[]", b"null", b'{"a": 1, "a": 2}', b"Q" * 60000,
                           b'{"class_label": 1}' * 3, json.dumps({"Q" * 60000: 1}).encode()])
    obj = {}
    if rng.random() < 0.8:  # most bodies name the class, so they reach past the first check
        obj["prompt" if "prompt" in fields else "class_label"] = rng.choice([0, 1, 3, "zero", "Q" * 300, None])
    for _ in range(rng.randrange(5)):
        obj[rng.choice(fields) if rng.random() < 0.85 else rng.choice(["x", "Q" * 300, "", "__proto__"])] = value(rng)
    try:
        return json.dumps(obj, allow_nan=True).encode()
    except (RecursionError, ValueError):
        return b"{}"


def query(rng: random.Random) -> list[tuple[str, str]]:
    out = []
    for _ in range(rng.choice([0, 0, 1, 2, 4])):
        v = value(rng)
        try:
            v = v if isinstance(v, str) else json.dumps(v)
        except RecursionError:
            v = "[" * 2000
        v = v[:8000].encode("utf-8", "replace").decode()  # a URL: under 64 KB, no lone surrogate
        out.append((rng.choice(FIELDS) if rng.random() < 0.8 else "Q" * 300, v))
    return out


def headers(rng: random.Random) -> dict:
    h = {}
    if rng.random() < 0.8:
        h["content-type"] = CONTENT_TYPES[0] if rng.random() < 0.6 else rng.choice(CONTENT_TYPES)
    if rng.random() < 0.3:
        h["accept"] = rng.choice(["text/event-stream", "*/*", "image/png", "Q" * 3000])
    if rng.random() < 0.2:
        h["authorization"] = rng.choice(["Bearer ", "Bearer wrong", "Basic Zm9v", "Bearer " + "Q" * 5000])
    if rng.random() < 0.1:
        h["x-" + "q" * 50] = "Q" * 2000
    return h


def request(rng: random.Random):
    path = rng.choice(ROUTES) if rng.random() < 0.85 else rng.choice(JUNK_PATHS)
    usual = "POST" if path in ROUTES[:3] else "GET"
    method = usual if rng.random() < 0.75 else rng.choice(METHODS)
    fields = list(OPENAI_FIELDS) if path.startswith("/v1") else list(FIELDS)
    return method, path, query(rng), body(rng, fields) if method in ("POST", "PUT", "PATCH") else None, headers(rng)


def wait_ready(client: TestClient, timeout: float = 20):
    """Until a worker serves every model: before that, /readyz's 503 is the right answer, not a fault."""
    end = time.monotonic() + timeout
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < end, "no worker became ready"
        time.sleep(0.05)


def fuzz(client: TestClient, seed: int, count: int):
    rng = random.Random(seed)
    seen = {}
    for i in range(count):
        method, path, q, content, h = request(rng)
        r = client.request(method, path, params=q, content=content, headers=h)
        where = f"#{i} {method} {path} {q!r:.200} {content!r:.200} {h!r:.200}"
        assert r.status_code < 500, (where, r.status_code, r.text[:500])
        if r.status_code >= 400:
            assert MARK not in r.text, (where, r.text[:500])
            assert len(r.content) < 4000, (where, len(r.content))
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
    return seen


def test_fuzz_every_route_embedded():
    app = create_app(Settings(test_model="gmm", warmup=False, steps=[1, 2, 4, 8], max_images=4))
    with TestClient(app, raise_server_exceptions=False) as c:
        wait_ready(c)
        seen = fuzz(c, seed=27, count=400)
    # the run reached past validation (images were made) as well as every kind of refusal
    assert seen.get(200, 0) > 50 and seen.get(422, 0) + seen.get(400, 0) > 20, seen
    assert {404, 405, 415} <= set(seen), seen


def test_fuzz_with_an_api_key():
    app = create_app(Settings(test_model="gmm", warmup=False, steps=[1, 4], max_images=2, api_key="k3y"))
    with TestClient(app, raise_server_exceptions=False) as c:
        wait_ready(c)
        seen = fuzz(c, seed=28, count=150)
    assert seen.get(401, 0) > 20, seen


@pytest.fixture
def rs():
    srv = RedisServer()
    yield srv
    srv.stop()


def test_fuzz_every_route_redis_mode(rs):
    app = create_app(Settings(test_model="gmm", warmup=False, steps=[1, 2, 4, 8], max_images=4, redis_url=rs.url,
                              key_prefix="fuzz", heartbeat_s=0.2))
    with TestClient(app, raise_server_exceptions=False) as c:
        wait_ready(c)
        seen = fuzz(c, seed=29, count=200)
    assert seen.get(200, 0) > 10, seen


def test_docs_assets_take_no_path_from_the_query():
    """A packaged file's route once took its file name as a parameter: ?name=../.. served any file."""
    app = create_app(Settings(test_model="gmm", warmup=False))
    with TestClient(app) as c:
        r = c.get("/docs/swagger-ui.css", params={"name": "../../../../../../../../etc/hostname"})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/css")
        assert r.content == c.get("/docs/swagger-ui.css").content

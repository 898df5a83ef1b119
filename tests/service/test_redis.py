"""Redis mode against a real redis-server: API in-process, workers as subprocesses."""
import asyncio
import base64
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import redis
from service_fixtures import (
    ROOT,
    ApiServer,
    RedisServer,
    WorkerProc,
    free_port,
    metric_value,
    reference,
    wait_for,
)

from stride_diffusion.service import images
from stride_diffusion.service.jobs import Job, Outcome
from stride_diffusion.service.metrics import Metrics
from stride_diffusion.service.settings import Settings

STEPS = [1, 2, 4, 8, 16]


def api_settings(url, prefix, **kw):
    base = dict(role="api", redis_url=url, key_prefix=prefix, test_model="gmm", steps=STEPS, max_images=8,
                heartbeat_s=0.2)
    return Settings(**{**base, **kw})


def post(api, params=None, json=None, timeout=30):
    return httpx.post(api.url + "/generate", params=params, json=json, timeout=timeout)


@pytest.fixture(scope="module")
def rs():
    srv = RedisServer()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def fast(rs):
    """One worker, and one slow pool of two (prefix 'slow'), started together to overlap start-up."""
    w = WorkerProc(rs.url, "fast-1", prefix="fast", extra=["--max-wait-ms", "20"])
    slow = [WorkerProc(rs.url, f"slow-{i}", prefix="slow", delay_ms=40, metrics=True,
                       extra=["--claim-idle-ms", "600", "--no-warmup"]) for i in (1, 2)]
    w.wait_ready()
    api = ApiServer(api_settings(rs.url, "fast"))
    yield api, slow
    api.stop()
    for p in [w, *slow]:
        p.kill(signal.SIGTERM, wait=False)
    for p in [w, *slow]:
        p.kill(signal.SIGTERM)


def test_png_and_json_end_to_end(fast):
    api, _ = fast
    r = post(api, {"class_label": 3, "seed": 7, "steps": 4})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
    assert r.headers["x-stride-solver"] == "dpmpp-2m" and r.headers["x-stride-nfe"] == "4"
    assert np.array_equal(images.decode(r.content), reference(3, 7, 4))
    r = post(api, json={"class_label": "nine", "n": 2, "seed": 11, "steps": 8, "format": "json", "guidance": 2})
    d = r.json()
    assert r.status_code == 200 and d["seeds"] == [11, 12]
    for s, b in zip(d["seeds"], d["images"]):
        assert np.array_equal(images.decode(base64.b64decode(b)), reference(9, s, 8, guidance=2.0))


def test_same_seed_alone_and_in_a_mixed_batch(fast):
    api, _ = fast
    p = {"class_label": 4, "seed": 99, "steps": 16, "solver": "unipc", "guidance": 3}
    alone = post(api, p).content
    reqs = [{"class_label": k, "seed": 1000 + k, "steps": [1, 2, 4, 8][k % 4], "n": 1 + k % 2} for k in range(6)]
    reqs.insert(2, p)
    with ThreadPoolExecutor(len(reqs)) as ex:
        out = list(ex.map(lambda q: post(api, q), reqs))
    assert all(r.status_code == 200 for r in out)
    assert out[2].content == alone
    assert np.array_equal(images.decode(alone), reference(4, 99, 16, "unipc", 3.0))


def test_several_api_processes_share_one_redis(fast, rs):
    """A second API process (its own OS process, its own encoder pool) beside the in-process one, one
    worker behind both: every request gets its own image, in the format it asked for."""
    api, _ = fast
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "stride_diffusion.service.cli", "serve", "--role", "api", "--test-model", "gmm",
                             "--redis-url", rs.url, "--key-prefix", "fast", "--port", str(port), "--steps",
                             ",".join(map(str, STEPS)), "--max-images", "8", "--encode-threads", "1",
                             "--log-level", "warning"], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                            stderr=subprocess.PIPE)
    try:
        url2 = f"http://127.0.0.1:{port}"
        wait_for(lambda: httpx.get(url2 + "/readyz").status_code == 200, 60, "second API", 0.2)
        reqs = [(url, {"class_label": k % 10, "seed": 500 + k, "steps": [1, 2, 4, 8][k % 4],
                       "format": ["png", "json"][k % 2]}) for k in range(12) for url in (api.url, url2)]
        with ThreadPoolExecutor(8) as ex:
            out = list(ex.map(lambda q: httpx.post(q[0] + "/generate", params=q[1], timeout=30), reqs))
        for (_, q), r in zip(reqs, out):
            assert r.status_code == 200, r.text
            raw = r.content if q["format"] == "png" else base64.b64decode(r.json()["images"][0])
            assert np.array_equal(images.decode(raw), reference(q["class_label"], q["seed"], q["steps"]))
    finally:
        proc.terminate()
        proc.wait(20)


def test_readiness_and_metrics(fast):
    api, _ = fast
    ready = httpx.get(api.url + "/readyz").json()
    assert ready["ready"] and ready["redis"] is True and ready["workers"] == {"gmm": 1}
    text = httpx.get(api.url + "/metrics").text
    assert metric_value(text, "stride_workers_live", model="gmm") == 1
    assert metric_value(text, "stride_request_duration_seconds_count", model="gmm") >= 1


def test_role_all_api_and_worker_in_one_process_over_redis(rs):
    api = ApiServer(api_settings(rs.url, "all", role="all"))
    try:
        r = post(api, {"class_label": 6, "seed": 3, "steps": 2})
        assert r.status_code == 200 and np.array_equal(images.decode(r.content), reference(6, 3, 2))
    finally:
        api.stop()


def test_no_live_worker_gives_503(rs):
    api = ApiServer(api_settings(rs.url, "nobody"), ready=False)
    try:
        assert httpx.get(api.url + "/readyz").status_code == 503
        r = post(api, {"class_label": 1})
        assert r.status_code == 503 and "no live worker" in r.json()["detail"] and r.headers["retry-after"]
    finally:
        api.stop()


def test_dead_letter_after_too_many_deliveries(rs):
    """An entry whose workers keep dying is moved to the dead-letter stream; its caller gets a 500."""
    from stride_diffusion.service.redis_queue import GROUP, RedisQueue, RedisWorkerTransport

    s = api_settings(rs.url, "dlq", max_deliveries=1, claim_idle_ms=50, role="all")
    r = rs.client()
    r.set("dlq:worker:ghost", '{"ready": true, "models": ["gmm"]}', ex=30)
    r.sadd("dlq:workers", "ghost")

    async def scenario():
        q = RedisQueue(s, ["gmm"])
        await q.start()
        t = time.time()
        job = Job(uuid.uuid4().hex, "gmm", 4, "dpmpp-2m", 1, 1, 0, 1.0, "png", t + 20, t)
        await q.submit(job)
        r.xgroup_create("dlq:requests:gmm", GROUP, id="0", mkstream=True)
        r.xreadgroup(GROUP, "ghost", {"dlq:requests:gmm": ">"}, count=1)  # delivered once, then the ghost dies
        reaper = RedisWorkerTransport(s, ["gmm"], Metrics(process=False))
        await reaper.start()
        try:
            return await q.wait(job)
        finally:
            await reaper.close()
            await q.close()

    res = asyncio.run(scenario())
    assert res.outcome is Outcome.DEAD_LETTER and "delivered 2 times" in res.detail
    assert "dead-letter stream 'dlq:dead'" in res.detail
    dead = r.xrange("dlq:dead")
    assert len(dead) == 1 and b"delivered 2 times" in dead[0][1][b"error"]
    assert r.xlen("dlq:requests:gmm") == 0


def test_short_blocking_reads_never_become_block_forever(rs):
    """A wait shorter than 1 ms must not be sent as BLOCK 0 (which blocks until the next request)."""
    from stride_diffusion.service.redis_queue import RedisWorkerTransport

    async def scenario():
        t = RedisWorkerTransport(api_settings(rs.url, "block", role="all"), ["gmm"], Metrics(process=False))
        await t.start()
        try:
            t0 = time.perf_counter()
            for timeout in (0.0004, 0.0, 0.002):
                assert await t.fetch(4, timeout) == []
            return time.perf_counter() - t0
        finally:
            await t.close()

    assert asyncio.run(scenario()) < 1.0


def test_slow_pool_queue_full_and_deadline(fast, rs):
    _, slow = fast
    for w in slow:
        w.wait_ready()
    api = ApiServer(api_settings(rs.url, "slow", queue_limit=3))
    try:
        with ThreadPoolExecutor(8) as ex:
            out = list(ex.map(lambda k: post(api, {"class_label": 2, "seed": k, "steps": 1}), range(8)))
        codes = [r.status_code for r in out]
        assert 503 in codes and 200 in codes and set(codes) <= {200, 503}, codes
        assert all(r.headers["retry-after"] == "1" and "queue full" in r.json()["detail"]
                   for r in out if r.status_code == 503)
    finally:
        api.stop()
    api = ApiServer(api_settings(rs.url, "slow", deadline_s=0.3))
    try:
        r = post(api, {"class_label": 2, "steps": 16})  # 16 x 40 ms > the 0.3 s deadline
        assert r.status_code == 504 and "deadline passed" in r.json()["detail"]
    finally:
        api.stop()


def test_worker_killed_mid_batch_loses_nothing(fast, rs):
    """SIGKILL a worker while it holds requests: the other re-claims and finishes them."""
    _, workers = fast
    api = ApiServer(api_settings(rs.url, "slow", deadline_s=30))
    client = rs.client()

    def holder():
        for w in workers:
            if client.xpending_range("slow:requests:gmm", "workers", "-", "+", 10, w.worker_id):
                return w

    try:
        reqs = [{"class_label": k % 10, "seed": 500 + k, "steps": 16} for k in range(6)]
        with ThreadPoolExecutor(len(reqs)) as ex:
            futs = [ex.submit(post, api, q) for q in reqs]
            victim = wait_for(holder, 10, "a worker to hold requests", 0.01)
            time.sleep(0.2)  # a few steps in
            victim.kill()
            out = [f.result() for f in futs]
        assert [r.status_code for r in out] == [200] * len(reqs), [r.text for r in out]
        for q, r in zip(reqs, out):
            assert np.array_equal(images.decode(r.content), reference(q["class_label"], q["seed"], 16))
        survivor = next(w for w in workers if w is not victim)
        assert metric_value(survivor.metrics_text(), "stride_redelivered_total") >= 1
        assert client.xlen("slow:requests:gmm") == 0
    finally:
        api.stop()


def test_tls_and_password(tmp_path):
    """rediss:// with a password, verified against a CA (skipped if openssl or TLS redis is missing)."""
    import shutil
    import subprocess

    if not shutil.which("openssl"):
        pytest.skip("openssl missing")
    from service_fixtures import free_port

    ca, key = tmp_path / "ca.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(ca),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(ca),
                             "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no",
                             "--requirepass", "pw", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"rediss://:pw@localhost:{port}/0"
        try:
            wait_for(lambda: redis.Redis.from_url(url, ssl_ca_certs=str(ca)).ping(), 5, "TLS redis")
        except TimeoutError:
            pytest.skip("redis-server without TLS support")
        from stride_diffusion.service.redis_queue import connect

        async def ping():
            r = connect(Settings(redis_url=url, redis_ca_cert=str(ca), test_model="gmm"))
            try:
                return await r.ping()
            finally:
                await r.aclose()

        assert asyncio.run(ping())
    finally:
        proc.terminate()
        proc.wait(10)


def test_redis_restart_under_load(fast, rs):
    """Clean 503s for new requests while Redis is down (answers, not hangs); the requests in flight
    wait for it and, as it restarts empty, are answered 503 (lost, retry); 200s again after it;
    every 200 carries the right image. Runs last: it restarts the module's Redis under every worker."""
    api = ApiServer(api_settings(rs.url, "fast", deadline_s=10))
    results, stop = [], threading.Event()

    def client(k):
        with httpx.Client(timeout=20) as c:
            i = 0
            while not stop.is_set():
                seed = 10_000 * k + i
                t = time.monotonic()
                r = c.post(api.url + "/generate", params={"class_label": k, "seed": seed, "steps": 4, "n": 2})
                results.append((t, time.monotonic(), seed, k, r))
                i += 1
                if r.status_code != 200:
                    time.sleep(0.05)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    try:
        for t in threads:
            t.start()
        time.sleep(1.0)
        rs.stop()
        down = time.monotonic()
        # the clients' requests in flight wait for Redis; a new one is refused at once
        probe = wait_for(lambda: (r := httpx.post(api.url + "/generate", params={"class_label": 1, "steps": 4},
                                                  timeout=20)).status_code == 503 and r, 3, "a 503 while down")
        results.append((down, time.monotonic(), 0, 1, probe))
        time.sleep(max(0.0, 3.5 - (time.monotonic() - down)))
        rs.start()
        up = time.monotonic()
        wait_for(lambda: any(s > up and r.status_code == 200 for s, _, _, _, r in results), 20, "recovery")
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        api.stop()
    codes = [r.status_code for *_, r in results]
    assert set(codes) <= {200, 503}, sorted(set(codes))
    assert any(r.status_code == 200 and e < down for _, e, _, _, r in results)  # before
    timeline = sorted((round(s_ - down, 2), round(e - down, 2), r.status_code) for s_, e, _, _, r in results
                      if e > down - 0.5 and s_ < up + 1)
    assert any(r.status_code == 503 and down < e < up for _, e, _, _, r in results), \
        f"no 503 while down (up at {up - down:.2f} s): {timeline}"  # answered while down
    assert any(r.status_code == 200 and s > up for s, _, _, _, r in results)  # after
    for *_, r in results:
        if r.status_code == 503:
            assert r.headers.get("retry-after") and r.json()["detail"]
    for _, _, seed, k, r in results:
        if r.status_code == 200:
            g = images.decode(r.content)
            assert np.array_equal(g[:64, :64], reference(k, seed, 4)), seed
            assert np.array_equal(g[:64, 72:], reference(k, seed + 1, 4)), seed

"""Admission by work: a request counts rows x steps, and one that cannot finish before its deadline at the
workers' measured rate is refused at once (503 + Retry-After), in embedded and in Redis mode, instead of
being admitted and answered 504 at the deadline."""
import asyncio
import signal

import httpx
import pytest
from service_fixtures import ApiServer, RedisServer, WorkerProc, metric_value

from stride_diffusion.service.policy import ADMIT_SHARE, over_capacity, work_cap
from stride_diffusion.service.settings import Settings

DELAY_MS = 50  # per model call, whatever the batch: a 64-row batch does about 1280 row-steps/s
DEADLINE_S = 6.0
N = 48  # heavy requests of 16 x 2 rows x 8 steps = 256 row-steps: about 10 s of work, past the deadline
HEAVY = {"class_label": 3, "n": 16, "guidance": 2.0, "steps": 8, "format": "json"}


def test_work_cap_and_its_message():
    assert work_cap(None, 30) == 0 and work_cap(0.0, 30) == 0  # no rate measured yet: no cap
    assert work_cap(100.0, 30) == pytest.approx(100 * ADMIT_SHARE * 30)
    msg = over_capacity(2000, 256, 100.0, 30)
    assert "22.6 s" in msg and "30 s deadline" in msg


def fire(url: str) -> list[httpx.Response]:
    async def go():
        limits = httpx.Limits(max_connections=N, max_keepalive_connections=N)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as c:
            return await asyncio.gather(*(c.post("/generate", json={**HEAVY, "seed": i}) for i in range(N)))

    return asyncio.run(go())


def check(responses, text: str):
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503}, sorted(set(codes))  # above all: no 504 at the deadline
    refused = [r for r in responses if r.status_code == 503]
    assert refused and codes.count(200) >= 4, codes
    for r in refused:
        assert r.headers["Retry-After"] and "over capacity" in r.json()["detail"], r.text
    assert metric_value(text, "stride_rejected_total", reason="queue_full") == len(refused)
    assert metric_value(text, "stride_rejected_total", reason="deadline") == 0


def test_embedded_refuses_what_cannot_finish_in_time():
    api = ApiServer(Settings(test_model=f"gmm:delay_ms={DELAY_MS}", steps=[1, 8], max_batch=64, max_images=16,
                             deadline_s=DEADLINE_S, threads=1))
    try:
        assert api.service.worker.rate  # measured at warm-up, before any request
        check(fire(api.url), httpx.get(api.url + "/metrics").text)
    finally:
        api.stop()


def test_redis_mode_refuses_what_cannot_finish_in_time():
    rs = RedisServer()
    w = WorkerProc(rs.url, "adm-1", prefix="adm", delay_ms=DELAY_MS, extra=["--max-batch", "64", "--steps", "1,8"])
    w.wait_ready()
    api = ApiServer(Settings(role="api", redis_url=rs.url, key_prefix="adm", test_model="gmm", steps=[1, 8],
                             heartbeat_s=0.2, max_images=16, deadline_s=DEADLINE_S))
    try:
        assert api.service.queue.rates["gmm"] > 0  # from the worker's heartbeat
        check(fire(api.url), httpx.get(api.url + "/metrics").text)
    finally:
        api.stop()
        w.kill(signal.SIGTERM)
        rs.stop()

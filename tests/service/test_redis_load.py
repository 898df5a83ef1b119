"""Redis mode under load: the bounded, blocking connection pool, and workers that claim by rows."""
import asyncio
import signal

import httpx
import pytest
from service_fixtures import ApiServer, RedisServer, WorkerProc, metric_value, stop_all

from stride_diffusion.service.redis_queue import connect, pool_size
from stride_diffusion.service.settings import Settings

N = 300


@pytest.fixture(scope="module")
def rs():
    srv = RedisServer()
    yield srv
    srv.stop()


def test_a_full_pool_waits_instead_of_raising(rs):
    """redis-py's default pool raises MaxConnectionsError past its cap; ours makes the command wait."""
    settings = Settings(redis_url=rs.url, test_model="gmm")

    async def run():
        r = connect(settings, max_connections=2)
        try:
            # BLPOP holds its connection: 40 of them over 2 connections must queue, not fail
            out = await asyncio.gather(*(r.blpop([f"nothing:{i}"], timeout=0.01) for i in range(40)))
            assert out == [None] * 40
            assert r.connection_pool.max_connections == 2
        finally:
            await r.aclose()

    asyncio.run(run())


def test_pool_is_sized_from_the_queue_limit():
    s = Settings(test_model="gmm", queue_limit=300)
    assert pool_size(s, 1) > 300 and pool_size(s, 2) > 600


def test_300_concurrent_requests_get_no_pool_errors(rs):
    w = WorkerProc(rs.url, "load-1", prefix="load", metrics=True, extra=["--max-wait-ms", "5"])
    w.wait_ready()
    api = ApiServer(Settings(role="api", redis_url=rs.url, key_prefix="load", test_model="gmm", steps=[1, 2, 4],
                             heartbeat_s=0.2, queue_limit=N, deadline_s=60))
    try:
        async def fire():
            limits = httpx.Limits(max_connections=N, max_keepalive_connections=N)
            async with httpx.AsyncClient(base_url=api.url, limits=limits, timeout=120) as c:
                return await asyncio.gather(*(c.post("/generate", params={"steps": 1, "seed": i}, json={"class_label": i % 4})
                                              for i in range(N)))

        responses = asyncio.run(fire())
        codes = [r.status_code for r in responses]
        bodies = [r.text[:200] for r in responses if r.status_code != 200]
        assert codes.count(200) == N, (sorted(set(codes)), bodies[:3])
        text = httpx.get(api.url + "/metrics").text
        assert metric_value(text, "stride_rejected_total", reason="queue_unavailable") == 0
    finally:
        api.stop()
        w.kill(signal.SIGTERM)


def test_workers_claim_by_rows_so_heavy_work_spreads(rs):
    """n 16 at guidance is 32 rows: with a 64-row batch a worker claims about two such requests at a time
    (it used to read its free rows as a count of entries: all ten at once), and both workers run some."""
    from concurrent.futures import ThreadPoolExecutor

    from stride_diffusion.service.redis_queue import GROUP, Keys

    workers = [WorkerProc(rs.url, f"rows-{i}", prefix="rows", delay_ms=30, extra=["--max-batch", "64"])
               for i in (1, 2)]
    for w in workers:
        w.wait_ready()
    api = ApiServer(Settings(role="api", redis_url=rs.url, key_prefix="rows", test_model="gmm", steps=[1, 2, 4, 8],
                             heartbeat_s=0.2, deadline_s=120))
    r, stream = rs.client(), Keys("rows").stream("gmm")
    held: dict[str, int] = {}
    try:
        with ThreadPoolExecutor(10) as ex:
            futs = [ex.submit(httpx.post, api.url + "/generate", timeout=120,
                              json={"class_label": k, "n": 16, "guidance": 2, "steps": 8, "seed": k, "format": "json"})
                    for k in range(10)]
            while not all(f.done() for f in futs):
                for c in r.xpending(stream, GROUP)["consumers"] or []:
                    name = c["name"].decode()
                    held[name] = max(held.get(name, 0), int(c["pending"]))
            codes = [f.result().status_code for f in futs]
        assert codes == [200] * 10
        assert set(held) == {"rows-1", "rows-2"}, held  # the work spread over both workers
        assert max(held.values()) <= 3, held  # 64 free rows start two 32-row requests (one more at most)
    finally:
        stop_all(api, workers)

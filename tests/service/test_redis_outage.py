"""A Redis outage of 10 s (SIGKILL with AOF on, restarted on the same port and folder) with requests in
flight: every accepted request is answered with its image, none is computed twice, and meanwhile
new requests get 503 + Retry-After and /readyz says why."""
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
from service_fixtures import ApiServer, RedisServer, WorkerProc, metric_value, reference, stop_all, wait_for

from stride_diffusion.service import images
from stride_diffusion.service.settings import Settings

PREFIX = "outage"
N = 12
OUTAGE_S = 10


def test_accepted_requests_survive_a_10_s_redis_outage(tmp_path):
    rs = RedisServer(aof_dir=tmp_path)
    # two workers of 2 rows each: some requests are running and some queued when Redis dies; a short
    # claim idle time: after the outage every entry looks idle, and a worker must not re-run another's
    extra = ["--max-wait-ms", "0", "--max-batch", "2", "--claim-idle-ms", "1000"]
    workers = [WorkerProc(rs.url, f"out-{i}", prefix=PREFIX, delay_ms=40, metrics=True, extra=extra) for i in (1, 2)]
    for w in workers:
        w.wait_ready()
    api = ApiServer(Settings(role="api", redis_url=rs.url, key_prefix=PREFIX, test_model="gmm", steps=[1, 4, 16],
                             heartbeat_s=0.2, deadline_s=60))
    stream = f"{PREFIX}:requests:gmm"
    try:
        reqs = [{"class_label": k % 4, "seed": 500 + k, "steps": 16} for k in range(N)]
        with ThreadPoolExecutor(N) as ex:
            futs = [ex.submit(httpx.post, api.url + "/generate", json=p, timeout=90) for p in reqs]
            wait_for(lambda: rs.client().xlen(stream) == N, 20, "every request accepted")
            rs.proc.send_signal(signal.SIGKILL)
            rs.proc.wait(10)
            t0 = time.monotonic()
            # during the outage: not ready, and a new request is refused at once with Retry-After
            ready = wait_for(lambda: (r := httpx.get(api.url + "/readyz")).status_code == 503 and r, 5, "not ready")
            assert "Redis unreachable" in ready.json()["reason"]
            new = httpx.post(api.url + "/generate", json={"class_label": 1, "steps": 1}, timeout=10)
            assert new.status_code == 503 and new.headers["Retry-After"], new.text
            time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - t0)))
            assert not any(f.done() for f in futs), "an accepted request was answered during the outage"
            rs.start()
            res = [f.result() for f in futs]
        assert [r.status_code for r in res] == [200] * N, [r.text[:200] for r in res]
        for p, r in zip(reqs, res):
            assert np.array_equal(images.decode(r.content), reference(p["class_label"], p["seed"], 16))
        texts = [w.metrics_text() for w in workers]
        # each image computed once: nothing re-run after the outage, nothing computed for a client gone
        assert sum(metric_value(t, "stride_images_total") for t in texts) == N
        assert sum(metric_value(t, "stride_redelivered_total") for t in texts) == 0
        wait_for(lambda: httpx.get(api.url + "/readyz").status_code == 200, 10, "ready again")
        assert httpx.post(api.url + "/generate", json={"class_label": 1, "steps": 1}, timeout=30).status_code == 200
    finally:
        stop_all(api, workers)
        rs.stop()

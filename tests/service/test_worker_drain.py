"""SIGTERM drains a worker under load, against a real redis-server and worker processes.

A drain finishes what the worker holds, so nothing it took needs re-claiming, and it leaves the
consumer group; a second SIGTERM (or drain_timeout_s) ends it early, and what it held is then
re-claimed and run by another worker, as after a crash.
"""
import signal
import threading

import httpx
import pytest
from service_fixtures import ApiServer, RedisServer, WorkerProc, metric_value, wait_for

from stride_diffusion.service.redis_queue import GROUP, Keys
from stride_diffusion.service.settings import Settings

PREFIX = "drain"


@pytest.fixture
def rs():
    srv = RedisServer()
    yield srv
    srv.stop()


class Load:
    """Clients posting requests back to back until stopped; every response is kept."""

    def __init__(self, api, clients=4, steps=8, extra=None):
        self.api, self.steps, self.codes, self.stopped = api, steps, [], threading.Event()
        self.extra = extra or {}
        self.threads = [threading.Thread(target=self._client, args=(k,)) for k in range(clients)]
        for t in self.threads:
            t.start()

    def _client(self, k):
        with httpx.Client(timeout=30) as c:
            i = 0
            while not self.stopped.is_set():
                r = c.post(self.api.url + "/generate", params={"class_label": k, "seed": 1000 * k + i,
                                                               "steps": self.steps, **self.extra})
                self.codes.append((r.status_code, r.text[:200] if r.status_code != 200 else ""))
                i += 1

    def stop(self):
        self.stopped.set()
        for t in self.threads:
            t.join(60)


def start(rs, delay_ms, drain_timeout_s=20):
    # claim-idle-ms short: a re-claim, where one is needed, happens within the test
    extra = ["--no-warmup", "--claim-idle-ms", "600", "--drain-timeout-s", str(drain_timeout_s)]
    a = WorkerProc(rs.url, "drain-a", prefix=PREFIX, delay_ms=delay_ms, metrics=True, extra=extra)
    b = WorkerProc(rs.url, "drain-b", prefix=PREFIX, delay_ms=delay_ms, metrics=True, extra=extra)
    a.wait_ready(), b.wait_ready()
    api = ApiServer(Settings(role="api", redis_url=rs.url, key_prefix=PREFIX, test_model="gmm", heartbeat_s=0.2))
    return a, b, api


def busy(w):
    return metric_value(w.metrics_text(), "stride_worker_rows") > 0


def consumers(rs):
    stream = Keys(PREFIX).stream("gmm")
    return {c["name"].decode(): c["pending"] for c in rs.client().xinfo_consumers(stream, GROUP)}


def drained_and_carried_on(a, b, more: int) -> float:
    """a, sent SIGTERM, exits 0 within its --drain-timeout-s (drained, not cut); b then finishes `more`
    requests alone. Returns b's re-claim count."""
    assert a.proc.wait(20) == 0, a.proc.stderr.read().decode()[-2000:]
    done_b = metric_value(b.metrics_text(), "stride_worker_results_total", outcome="ok")
    wait_for(lambda: metric_value(b.metrics_text(), "stride_worker_results_total", outcome="ok") > done_b + more,
             30, "worker b to carry on alone")
    return metric_value(b.metrics_text(), "stride_redelivered_total")


def test_sigterm_drains_under_load(rs):
    a, b, api = start(rs, delay_ms=80)
    load = Load(api)
    try:
        wait_for(lambda: busy(a) and busy(b), 30, "both workers running requests")
        a.kill(signal.SIGTERM, wait=False)
        # its metrics say so while it finishes what it holds
        text = wait_for(lambda: next((t for t in [a.metrics_text()] if metric_value(t, "stride_worker_draining")),
                                     None), 10, "worker a to report draining")
        assert metric_value(text, "stride_worker_ready") == 0
        redelivered = drained_and_carried_on(a, b, more=8)
    finally:
        load.stop()
        api.stop()
        b.stop()
    failed = [c for c in load.codes if c[0] != 200]
    assert load.codes and not failed, failed
    assert redelivered == 0, "a left nothing behind to re-claim"
    assert b.proc.returncode == 0
    r = rs.client()
    assert r.xlen(Keys(PREFIX).dead) == 0
    # a left the group (nothing pending under its name), b left it too on its own clean stop
    assert "drain-a" not in consumers(rs)
    assert r.xpending(Keys(PREFIX).stream("gmm"), GROUP)["pending"] == 0


@pytest.mark.parametrize("how", ["second SIGTERM", "drain timeout"])
def test_cut_drain_leaves_its_requests_to_other_workers(rs, how):
    # requests of 16 steps x 150 ms: a's batch is still running when its drain is cut
    a, b, api = start(rs, delay_ms=150, drain_timeout_s=0.5 if how == "drain timeout" else 20)
    load = Load(api, clients=3, steps=16)
    try:
        wait_for(lambda: busy(a), 30, "worker a running requests")
        held = consumers(rs)["drain-a"]
        assert held > 0
        a.kill(signal.SIGTERM, wait=False)
        if how == "second SIGTERM":
            wait_for(lambda: metric_value(a.metrics_text(), "stride_worker_draining") == 1, 10, "a to drain")
            a.kill(signal.SIGTERM, wait=False)
        assert a.proc.wait(20) == 1  # cut short: not a clean exit
        assert consumers(rs).get("drain-a", 0) > 0, "what a held stays pending under its name for re-claiming"
        wait_for(lambda: metric_value(b.metrics_text(), "stride_redelivered_total") > 0, 30,
                 "worker b to re-claim a's requests")
        wait_for(lambda: consumers(rs).get("drain-a", 0) == 0, 30, "a's requests to be re-run")
    finally:
        load.stop()
        api.stop()
        b.stop()
    failed = [c for c in load.codes if c[0] != 200]
    assert load.codes and not failed, failed


def test_drain_with_heavy_requests_ends_within_its_budget(rs):
    """n 16 at guidance is 32 rows: a worker claims by rows (about two such requests for 64 free rows),
    so its drain finishes them well inside a 5 s budget (it used to hoard some thirty: 504s, cut drains)."""
    a, b, api = start(rs, delay_ms=30, drain_timeout_s=5)
    load = Load(api, clients=6, steps=8, extra={"n": 16, "guidance": 2})
    try:
        wait_for(lambda: busy(a) and busy(b), 30, "both workers running requests")
        assert consumers(rs)["drain-a"] <= 3  # what a holds: what it can start, one more at most
        a.kill(signal.SIGTERM, wait=False)
        redelivered = drained_and_carried_on(a, b, more=4)
    finally:
        load.stop()
        api.stop()
        b.stop()
    failed = [c for c in load.codes if c[0] != 200]
    assert load.codes and not failed, failed  # no 504 among them
    assert redelivered == 0

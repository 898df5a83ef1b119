"""The service's seams (service/transport.py): both queues implement the protocols, the transport
reaches the worker only through its hooks, and a Result's Outcome becomes an HTTP status and a
metric reason in the API alone."""
import asyncio
import re
import time
from pathlib import Path

import numpy as np
import pytest
from service_fixtures import metric_value
from starlette.requests import Request

from stride_diffusion.service import app as app_module
from stride_diffusion.service.app import Service
from stride_diffusion.service.http_status import FAILURES
from stride_diffusion.service.jobs import Job, Outcome, Result
from stride_diffusion.service.metrics import Metrics
from stride_diffusion.service.models import Registry, analytic_entry
from stride_diffusion.service.params import ApiError, parse
from stride_diffusion.service.queue import LocalQueue
from stride_diffusion.service.redis_queue import RedisQueue, RedisWorkerTransport
from stride_diffusion.service.settings import Settings
from stride_diffusion.service.transport import Queue, Rejected, Transport, WorkerHooks
from stride_diffusion.service.worker import Worker

SERVICE = Path(app_module.__file__).parent


def _job(id="j", deadline=None):
    now = time.time()
    return Job(id, "gmm", 2, "euler", 1, 1, 0, 1.0, "png", deadline or now + 30, now)


def test_both_queues_implement_the_protocols():
    s = Settings(test_model="gmm")
    local = LocalQueue(s, ["gmm"])
    assert isinstance(local, Queue) and isinstance(local, Transport)
    r = Settings(role="all", redis_url="redis://127.0.0.1:1", test_model="gmm")
    assert isinstance(RedisQueue(r, ["gmm"]), Queue)
    assert isinstance(RedisWorkerTransport(r, ["gmm"], Metrics(process=False)), Transport)


def test_every_failure_outcome_has_an_http_status_and_a_metric_reason():
    from stride_diffusion.service.metrics import REASONS

    assert set(FAILURES) == set(Outcome) - {Outcome.OK}
    assert all(reason in REASONS for _, reason in FAILURES.values())


def test_result_carries_its_outcome_over_the_wire():
    res = Result.loads(Result("j", Outcome.DEAD_LETTER, "moved").dumps())
    assert res.outcome is Outcome.DEAD_LETTER and not res.ok
    ok = Result.loads(Result.of_images("j", np.zeros((1, 2, 2, 1), np.uint8)).dumps())
    assert ok.ok and ok.images().shape == (1, 2, 2, 1)
    assert b'"outcome": "dead_letter"' in Result("j", Outcome.DEAD_LETTER).dumps()


def test_a_result_of_the_previous_version_is_still_read():
    old = b'{"id": "j", "status": 504, "detail": "late", "solver": "", "nfe": 0, "queue_ms": 0.0, ' \
          b'"compute_ms": 0.0, "shape": [], "worker": "w"}\n'
    assert Result.loads(old).outcome is Outcome.EXPIRED
    assert Result.loads(old.replace(b"504", b"500")).outcome is Outcome.FAILED


def test_the_worker_hands_the_transport_hooks_not_itself():
    class Recording:
        hooks, drained = None, False

        def attach(self, hooks):
            self.hooks = hooks

        def drain(self):
            self.drained = True

    t = Recording()
    w = Worker(Registry([analytic_entry()]), Settings(test_model="gmm"), t, Metrics(process=False))
    assert isinstance(t.hooks, WorkerHooks) and t.hooks.capacity() == 0  # not warmed up
    assert t.hooks.status()["ready"] is False and t.hooks.status()["models"] == ["gmm"]
    t.hooks.cancel("x")
    assert w.cancelled == {"x"}
    w.stop()
    assert t.drained


def test_local_queue_answers_a_queued_cancel_and_forwards_a_running_one():
    cancelled = []

    async def scenario():
        q = LocalQueue(Settings(test_model="gmm", queue_limit=4), ["gmm"])
        with pytest.raises(Rejected) as e:
            await q.submit(_job("early"))
        assert e.value.reason == "no_worker"
        q.attach(WorkerHooks(lambda: 1, cancelled.append, lambda: {"ready": True, "models": ["gmm"]}))
        assert (await q.status())["workers"] == {"gmm": 1}
        queued, running = _job("q"), _job("r")
        await q.submit(queued)
        await q.submit(running)
        assert [j.id for j in await q.fetch(1, 0)] == ["q"]  # "q" is running now, "r" still queued
        await q.cancel(running)
        await q.cancel(queued)
        return await q.wait(running)

    res = asyncio.run(scenario())
    assert res.outcome is Outcome.CANCELLED and cancelled == ["q"]


def test_local_queue_wait_expires_past_the_deadline(monkeypatch):
    monkeypatch.setattr("stride_diffusion.service.queue.WAIT_GRACE_S", 0.0)

    async def scenario():
        q = LocalQueue(Settings(test_model="gmm"), ["gmm"])
        q.attach(WorkerHooks(lambda: 1, lambda _: None, lambda: {"ready": True}))
        job = _job(deadline=time.time() + 0.05)
        await q.submit(job)
        return await q.wait(job)

    assert asyncio.run(scenario()).outcome is Outcome.EXPIRED


@pytest.mark.parametrize("outcome", [o for o in Outcome if o is not Outcome.OK])
def test_the_api_maps_each_outcome_to_its_status_and_reason(outcome):
    settings = Settings(test_model="gmm", steps=[2])
    svc = Service(settings, Registry([analytic_entry()]))

    class Answering:
        async def submit(self, job):
            pass

        async def wait(self, job):
            return Result(job.id, outcome, f"it ended {outcome.value}")

    svc.queue = Answering()

    async def receive():
        await asyncio.sleep(3600)

    request = Request({"type": "http", "method": "POST", "path": "/generate", "headers": []}, receive)
    p = parse({"class_label": 1, "steps": 2}, svc.registry, settings)
    with pytest.raises(ApiError) as e:
        asyncio.run(svc.run(request, p, time.perf_counter()))
    status, reason = FAILURES[outcome]
    assert e.value.status == status and e.value.detail == f"it ended {outcome.value}"
    assert (e.value.headers is not None) == (outcome is Outcome.LOST)  # Retry-After: it did not run
    from prometheus_client import generate_latest

    text = generate_latest(svc.metrics.registry).decode()
    assert metric_value(text, "stride_rejected_total", reason=reason) == 1


def test_no_http_status_outside_the_api():
    """The worker, the engine and both queues speak in Outcomes; only the API knows HTTP."""
    for name in ("worker.py", "engine.py", "queue.py", "redis_queue.py", "transport.py"):
        src = (SERVICE / name).read_text()
        assert not re.search(r"\b(200|4\d\d|5\d\d)\b", src), name
    app = (SERVICE / "app.py").read_text()
    assert not re.search(r"in res\.detail", app)  # the reason comes from the outcome, not the message

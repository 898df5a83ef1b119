"""POST /generate/stream (and Accept: text/event-stream): Server-Sent Events in embedded mode."""
import base64
import json

import httpx
import numpy as np
import pytest
from hostile_api import metrics, settings
from service_fixtures import ApiServer, metric_value, reference, wait_for

from stride_diffusion.service import images
from stride_diffusion.service.models import Registry, analytic_entry


def read_events(resp, stop=None) -> list[tuple[str, dict]]:
    """The (event, data) pairs of an SSE response, until it ends or stop(event) is true."""
    out, event, data = [], None, []
    for line in resp.iter_lines():
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            data.append(line[6:])
        elif line == "" and event is not None:
            out.append((event, json.loads("\n".join(data))))
            if stop and stop(event):
                return out
            event, data = None, []
    return out


def stream(api, body, path="/generate/stream", headers=None, params=None):
    with httpx.stream("POST", api.url + path, json=body, params=params, headers=headers, timeout=60) as r:
        return r, (read_events(r) if r.status_code == 200 else json.loads(r.read()))


@pytest.fixture(scope="module")
def api():
    srv = ApiServer(settings(progress_ms=0))
    yield srv
    srv.stop()


@pytest.mark.parametrize("steps", [1, 4, 8])
@pytest.mark.parametrize("n", [1, 3])
def test_event_sequence_and_images(api, steps, n):
    r, events = stream(api, {"class_label": 2, "n": n, "seed": 40, "steps": steps})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    names = [e for e, _ in events]
    assert names == ["queued", "started", *["step"] * steps, *["image"] * n, "done"], names
    queued = events[0][1]
    assert queued["position"] == 0 and queued["steps"] == steps and queued["n"] == n
    assert queued["id"] == r.headers["x-stride-request-id"]
    step_events = [d for e, d in events if e == "step"]
    assert [d["k"] for d in step_events] == list(range(1, steps + 1))
    assert all(d["n"] == steps and d["elapsed_ms"] >= 0 for d in step_events)
    for i, (_, d) in enumerate(e for e in events if e[0] == "image"):
        assert d["index"] == i and d["seed"] == 40 + i and d["media_type"] == "image/png"
        assert np.array_equal(images.decode(base64.b64decode(d["data"])), reference(2, 40 + i, steps))
    done = events[-1][1]
    assert done["seeds"] == [40 + i for i in range(n)] and done["nfe"] == steps and done["id"] == queued["id"]


def test_accept_header_on_generate_streams_the_same_events(api):
    r, events = stream(api, None, path="/generate", headers={"Accept": "text/event-stream"},
                       params={"class_label": "1", "steps": "2", "seed": "5"})
    assert r.status_code == 200
    assert [e for e, _ in events] == ["queued", "started", "step", "step", "image", "done"]
    d = events[-2][1]
    assert np.array_equal(images.decode(base64.b64decode(d["data"])), reference(1, 5, 2))


def test_the_queued_event_counts_the_requests_ahead_and_the_wait_from_the_measured_rate():
    from stride_diffusion.service.jobs import Job, Outcome, Result
    from stride_diffusion.service.queue import LocalQueue

    class Ready:
        def status(self):
            return {"ready": True}

    async def run():
        q = LocalQueue(settings(), ["gmm", "other"])
        q.attach(Ready())
        jobs = [Job(f"j{i}", m, 1, "euler", 0, 1, i, 1.0, "png", 1e12, 0.0)
                for i, m in enumerate(["gmm", "other", "gmm", "gmm"])]
        for j in jobs:
            await q.submit(j)
        before = q.position(jobs[3])
        for j in jobs[:2]:
            await q.complete(j, Result(j.id, Outcome.OK))
            await q.wait(j)
        return before, q.position(jobs[3]), q.position(jobs[2])

    import asyncio

    before, after, first = asyncio.run(run())
    assert before == (2, None)  # two gmm requests ahead; nothing measured yet
    assert after[0] == 1 and after[1] is not None and after[1] > 0
    assert first == (0, 0.0)


@pytest.mark.parametrize("body", [{"steps": 3}, {"class_label": 99}, {"n": 100}, {"model": "nope"}])
def test_refused_requests_get_the_plain_routes_status_and_body(api, body):
    plain = httpx.post(api.url + "/generate", json=body, timeout=30)
    r, err = stream(api, body)
    assert r.status_code == plain.status_code and r.status_code in (404, 422)
    plain_body = plain.json()
    assert {k: v for k, v in err.items() if k != "request_id"} == {k: v for k, v in plain_body.items()
                                                                  if k != "request_id"}
    assert "allowed" in err or r.status_code == 404


def test_a_failure_after_admission_is_an_error_event_with_the_plain_status():
    srv = ApiServer(settings(progress_ms=0, deadline_s=0.2), Registry([analytic_entry("gmm:delay_ms=100")]))
    try:
        body = {"class_label": 1, "steps": 16}
        plain = httpx.post(srv.url + "/generate", json=body, timeout=30)
        r, events = stream(srv, body)
        assert r.status_code == 200 and events[-1][0] == "error"
        err = events[-1][1]
        assert err["status"] == plain.status_code == 504
        assert err["detail"].startswith("deadline passed") and err["request_id"] == r.headers["x-stride-request-id"]
    finally:
        srv.stop()


def test_closing_the_stream_after_the_first_step_cancels_the_work():
    srv = ApiServer(settings(progress_ms=0, max_wait_ms=0), Registry([analytic_entry("gmm:delay_ms=40")]))
    try:
        svc, w = srv.service, srv.service.worker
        with httpx.stream("POST", srv.url + "/generate/stream", json={"class_label": 1, "n": 4, "steps": 16},
                          timeout=60) as r:
            events = read_events(r, stop=lambda e: e == "step")
            assert [e for e, _ in events] == ["queued", "started", "step"]
            assert w.engine.rows == 4
        wait_for(lambda: w.engine.rows == 0 and not w.tasks, 20, "the rows to leave the batch")
        wait_for(lambda: not svc.queue.futures and not svc.queue.watchers, 20, "the queue to forget the request")
        text = metrics(srv)
        assert metric_value(text, "stride_rejected_total", reason="cancelled") == 1
        assert metric_value(text, "stride_worker_results_total", outcome="cancelled") == 1
        assert metric_value(text, "stride_model_evaluations_total", model="gmm") < 4 * 16
        assert metric_value(text, "stride_stream_requests_total") == 1
    finally:
        srv.stop()


# -- Redis mode: progress on the request's reply channel ------------------------------------------------
@pytest.fixture()
def redis_api():
    from service_fixtures import RedisServer, WorkerProc

    from stride_diffusion.service.settings import Settings

    rs = RedisServer()
    wp = WorkerProc(rs.url, "w-stream", prefix="stream", delay_ms=40, metrics=True,
                    extra=["--max-wait-ms", "0", "--progress-ms", "0"]).wait_ready()
    api = ApiServer(Settings(role="api", redis_url=rs.url, key_prefix="stream", test_model="gmm",
                             steps=[1, 2, 4, 8, 16], max_images=8, heartbeat_s=0.2))
    yield api, wp
    api.stop()
    wp.stop()
    rs.stop()


def test_redis_mode_streams_progress_from_a_worker_process_and_a_close_cancels_it(redis_api):
    api, wp = redis_api
    for steps, n in [(1, 1), (4, 3), (8, 1)]:
        _, events = stream(api, {"class_label": 3, "n": n, "seed": 7, "steps": steps})
        names = [e for e, _ in events]
        assert names[:2] == ["queued", "started"] and names[-n - 1:] == ["image"] * n + ["done"], names
        ks = [d["k"] for e, d in events if e == "step"]
        assert ks and ks == sorted(set(ks)) and set(ks) <= set(range(1, steps + 1)), ks
        for i, (_, d) in enumerate(e for e in events if e[0] == "image"):
            assert np.array_equal(images.decode(base64.b64decode(d["data"])), reference(3, 7 + i, steps))
    with httpx.stream("POST", api.url + "/generate/stream", json={"class_label": 1, "n": 4, "steps": 16},
                      timeout=60) as r:
        assert [e for e, _ in read_events(r, stop=lambda e: e == "step")][-1] == "step"

    def wm(name, **labels):
        return metric_value(wp.metrics_text(), name, **labels)

    wait_for(lambda: wm("stride_worker_results_total", outcome="cancelled") == 1, 20, "the worker to cancel it")
    wait_for(lambda: wm("stride_worker_rows") == 0, 20, "the rows to leave the batch")
    assert metric_value(metrics(api), "stride_rejected_total", reason="cancelled") == 1
    assert not api.service.queue.watchers


def test_a_streamed_job_says_so_on_the_wire_and_a_plain_one_is_unchanged():
    from stride_diffusion.service.jobs import Job

    job = Job("j", "gmm", 4, "euler", 1, 1, 0, 1.0, "png", 1.0, 0.0)
    assert "progress" not in json.loads(job.dumps())  # a worker of the previous version reads it
    job.progress = True
    assert Job.loads(job.dumps()).progress is True

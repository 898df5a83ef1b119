"""POST /generate/stream (and Accept: text/event-stream): Server-Sent Events in embedded mode."""
import base64
import json
import time

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


def expected_previews(label, seed, steps, every) -> dict:
    """(index 0, k) -> the preview pixels the executor's own estimate gives, for one image alone."""
    from stride_diffusion.service.models import Registry, analytic_entry
    from stride_diffusion.service.previews import Previews
    from stride_diffusion.solvers.executor import Stepper, seeded_noise

    e = analytic_entry("gmm")
    tab = e.samplers.resolve(steps).table(steps)
    st = Stepper(e.model, tab.window)
    st.add([tab], seeded_noise([seed], e.shape), [label], [1.0], ids=[("j", 0)])
    pv, out = Previews(Registry([e]), {"gmm": "gmm"}), {}
    pv.want("j", every)
    for _ in range(steps):
        pending = pv.before("gmm", st, {"j"})
        st.step()
        if pending is not None:
            pv.after(pending, st)
    for _, index, k, _, px in pv.take():
        out[index, k] = px[..., 0]
    return out


@pytest.mark.parametrize("steps,n,every", [(4, 1, 1), (8, 3, 2)])
def test_previews_arrive_every_k_steps_before_the_images(api, steps, n, every):
    before = metric_value(metrics(api), "stride_stream_preview_frames_total")
    _, events = stream(api, {"class_label": 4, "n": n, "seed": 9, "steps": steps, "preview": True,
                             "preview_every": every})
    names = [e for e, _ in events]
    ks = list(range(every, steps, every))  # never the last step: the image comes then
    assert names.index("image") > max(i for i, e in enumerate(names) if e == "preview")
    previews = [d for e, d in events if e == "preview"]
    assert sorted((d["k"], d["index"]) for d in previews) == [(k, i) for k in ks for i in range(n)]
    assert all(d["n"] == steps and d["media_type"] == "image/png" for d in previews)
    step_at = {d["k"]: i for i, (e, d) in enumerate(events) if e == "step"}
    assert all(step_at[d["k"]] < events.index(("preview", d)) for d in previews)
    want = expected_previews(4, 9, steps, every)
    for d in previews:
        if d["index"] == 0:
            got = images.decode(base64.b64decode(d["data"]))
            assert got.shape == (8, 8) and d["width"] == d["height"] == 8
            assert np.abs(got.astype(int) - want[0, d["k"]]).max() <= 1  # batch order may round differently
    assert metric_value(metrics(api), "stride_stream_preview_frames_total") - before == len(previews)
    # the query form: preview=1
    _, q = stream(api, None, params={"class_label": "4", "steps": "4", "seed": "9", "preview": "1"})
    assert [d["k"] for e, d in q if e == "preview"] == [1, 2, 3]


@pytest.mark.parametrize("body,field", [({"preview": "yes"}, "preview"), ({"preview": 1}, "preview"),
                                        ({"preview_every": 0}, "preview_every")])
def test_bad_preview_values_are_refused_naming_the_field(api, body, field):
    r, err = stream(api, {"class_label": 1, "steps": 4, **body})
    assert r.status_code == 422 and err["field"] == field, err


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
    for steps in (1, 4, 8):
        for n in (1, 3):
            _, events = stream(api, {"class_label": 3, "n": n, "seed": 7, "steps": steps, "preview": True})
            names = [e for e, _ in events]
            assert names[:2] == ["queued", "started"] and names[-n - 1:] == ["image"] * n + ["done"], names
            assert events[0][1]["position"] == 0
            ks = [d["k"] for e, d in events if e == "step"]
            assert ks and ks == sorted(set(ks)) and set(ks) <= set(range(1, steps + 1)), ks
            pk = sorted((d["k"], d["index"]) for e, d in events if e == "preview")  # pub/sub: at most once
            assert set(pk) <= {(k, i) for k in range(1, steps) for i in range(n)} and (steps == 1 or pk), pk
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


# the job fields a worker of the previous version accepts (its Job(**json) refuses any other key)
PREVIOUS_JOB_FIELDS = {"id", "model", "steps", "solver", "label", "n", "seed", "guidance", "format", "deadline",
                       "enqueued", "reply", "quality", "decoder"}


def test_a_streamed_jobs_wishes_travel_beside_the_job_which_a_previous_worker_reads_unchanged():
    from stride_diffusion.service.jobs import Job

    job = Job("j", "gmm", 4, "euler", 1, 1, 0, 1.0, "png", 1.0, 0.0)
    assert job.watch() == ""
    job.progress, job.preview = True, 2
    assert set(json.loads(job.dumps())) <= PREVIOUS_JOB_FIELDS
    back = Job.loads(job.dumps(), job.watch().encode())
    assert back.progress is True and back.preview == 2 and back == job
    assert Job.loads(job.dumps()).progress is False  # read without the wishes: a plain job


def test_the_queued_event_in_redis_mode_counts_the_entries_ahead_and_the_wait_from_the_rate(redis_api):
    import threading

    import redis

    api, wp = redis_api
    for _ in range(2):  # a measured rate (the API samples the streams every 0.5 s)
        assert httpx.post(api.url + "/generate", json={"class_label": 1, "steps": 16}, timeout=60).status_code == 200
    time.sleep(0.6)
    body = {"class_label": 1, "steps": 16, "n": 1}
    plain = [threading.Thread(target=httpx.post, args=(api.url + "/generate",), kwargs={"json": body, "timeout": 60})
             for _ in range(3)]
    for t in plain:
        t.start()
    rc = redis.Redis.from_url(wp.redis_url)
    wait_for(lambda: rc.xlen("stream:requests:gmm") >= 3, 20, "three entries in the stream")
    _, events = stream(api, {"class_label": 2, "steps": 1})
    for t in plain:
        t.join()
    q = events[0][1]
    assert events[0][0] == "queued" and q["position"] == 3, q
    assert q["expected_wait_s"] is not None and q["expected_wait_s"] > 0
    assert [e for e, _ in events][-2:] == ["image", "done"]


class PreviousWorkerTransport:
    """What a worker of the previous version offers the worker loop: no progress hooks."""

    watched = None
    progress = None


def test_a_worker_that_publishes_no_progress_still_finishes_the_stream():
    import asyncio
    import threading

    from service_fixtures import RedisServer

    from stride_diffusion.service.metrics import Metrics
    from stride_diffusion.service.models import load_registry
    from stride_diffusion.service.redis_queue import RedisWorkerTransport
    from stride_diffusion.service.settings import Settings
    from stride_diffusion.service.worker import Worker

    class Transport(PreviousWorkerTransport, RedisWorkerTransport):
        pass

    rs = RedisServer()
    ws = Settings(role="worker", redis_url=rs.url, key_prefix="old", test_model="gmm", steps=[1, 2, 4, 8, 16],
                  heartbeat_s=0.2, worker_id="w-old", threads=1, max_wait_ms=0)
    loop = asyncio.new_event_loop()
    holder = {}

    async def main():
        reg, m = load_registry(ws), Metrics(process=False)
        tr = Transport(ws, reg.names(), m)
        holder["worker"] = w = Worker(reg, ws, tr, m, name="w-old")
        await tr.start()
        try:
            await w.run()
        finally:
            await tr.close()

    th = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    th.start()
    api = None
    try:
        wait_for(lambda: "worker" in holder and holder["worker"].ready, 60, "the worker to warm up")
        api = ApiServer(Settings(role="api", redis_url=rs.url, key_prefix="old", test_model="gmm",
                                 steps=[1, 2, 4, 8, 16], max_images=8, heartbeat_s=0.2))
        _, events = stream(api, {"class_label": 5, "n": 3, "seed": 11, "steps": 4, "preview": True})
        assert [e for e, _ in events] == ["queued", "image", "image", "image", "done"], events
        for i, (_, d) in enumerate(events[1:4]):
            assert np.array_equal(images.decode(base64.b64decode(d["data"])), reference(5, 11 + i, 4))
        assert not api.service.queue.watchers
    finally:
        if api is not None:
            api.stop()
        if "worker" in holder:
            loop.call_soon_threadsafe(holder["worker"].stop)
        th.join(30)
        rs.stop()

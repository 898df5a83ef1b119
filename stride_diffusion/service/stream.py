"""A streamed generation: the same request as POST /generate, answered as Server-Sent Events.

`POST /generate/stream` (or `POST /generate` with `Accept: text/event-stream`) takes the same
fields (query or JSON body) with the same validation. A request refused before it is queued (bad
input, a wrong key, a full queue, no worker) gets the plain route's status and JSON body; once
admitted, the answer is `200 text/event-stream` with these events, each `data` a JSON object:

- `queued`: `position` (requests of its model queued or running ahead of it), `expected_wait_s`
  (position over the measured completion rate; null before anything was measured). In Redis mode
  the position is the stream's length when the request was admitted, the rate that of entries
  leaving the stream (every worker's);
- `started`: the worker admitted its first image;
- `step`: `k` of `n` (the slowest image of the request), `elapsed_ms` since `started`; at most one
  every `progress_ms` (the last step is always sent);
- `preview` (with `preview=1`, every `preview_every` steps): `index`, `k` of `n`, `media_type`,
  `width`, `height`, `data` (a base64 PNG of at most 64 px a side: the image's current clean-image
  estimate through the model's cheapest decoder, service/previews.py);
- `image`: one per image, `index`, `seed`, `media_type` and `data` (the image in base64; PNG unless
  the request asked for jpeg or webp);
- `done`: the request's id, solver, nfe, seeds, queue_ms, compute_ms;
- or `error`: `status` (the plain route's HTTP status for it), `detail`, `request_id`.

Progress comes from the worker's step loop (host lists, no device sync) through the queue's
optional `watch` method: queue.LocalQueue hands the worker's events over in-process; with Redis the
worker publishes them on the request's reply channel (redis_queue.py). A worker that publishes no
progress (the previous version) still answers: the stream is then `queued`, `image`s, `done`.
Closing the stream cancels the request, as a disconnect does on the plain route.
"""
from __future__ import annotations

import asyncio
import base64
import json
import time

from fastapi import Request
from fastapi.responses import StreamingResponse

from .encode import MEDIA
from .http_status import FAILURES, REJECTED_STATUS
from .params import ApiError
from .transport import Rejected

MEDIA_TYPE = "text/event-stream"


def wants_stream(request: Request) -> bool:
    return MEDIA_TYPE in request.headers.get("accept", "")


def sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def generate(svc, request: Request):
    """Validate and admit as POST /generate does, then stream the request's events."""

    t0 = time.perf_counter()
    p = await svc.parse_request(request)
    job, queue = svc.new_job(request, p), svc.queue
    job.preview = p.preview
    watch = getattr(queue, "watch", None)
    events = watch(job) if watch else None
    try:
        await queue.submit(job)
    except Rejected as e:
        if events is not None:
            queue.unwatch(job)
        svc.metrics.rejected.labels(e.reason).inc()
        raise ApiError(REJECTED_STATUS, e.detail, headers={"Retry-After": str(svc.settings.retry_after_s)}) from None
    svc.metrics.streams.inc()
    st = _State(svc, job, events, asyncio.ensure_future(queue.wait(job)))
    return _Stream(st.close, _events(svc, job, st, t0, FAILURES), media_type=MEDIA_TYPE,
                   headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "X-Stride-Request-Id": job.id})


class _State:
    """A streamed request's waiter and its cleanup: `close` (from the generator, or from the response
    when the stream ended before the generator ran) cancels the request unless it was answered."""

    def __init__(self, svc, job, events, waiter):
        self.svc, self.job, self.events, self.waiter, self.finished = svc, job, events, waiter, False

    def close(self):
        if self.events is not None:
            self.svc.queue.unwatch(self.job)
        if self.finished:
            return
        self.finished = True
        self.waiter.cancel()
        asyncio.ensure_future(self.svc.queue.cancel(self.job))
        self.svc.metrics.rejected.labels("cancelled").inc()


class _Stream(StreamingResponse):
    def __init__(self, on_close, *args, **kw):
        super().__init__(*args, **kw)
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


async def _events(svc, job, st: _State, t0: float, failures):
    queue, m, events, waiter = svc.queue, svc.metrics, st.events, st.waiter
    first_preview = True

    def forward(ev: dict) -> bytes:
        nonlocal first_preview
        name = ev.pop("event")
        if name == "preview":
            m.preview_frames.inc()
            if first_preview:
                m.stream_first_preview_seconds.observe(time.perf_counter() - t0)
                first_preview = False
        return sse(name, ev)

    try:
        position = getattr(queue, "position", None)
        ahead, wait_s = position(job) if position else (None, None)
        yield sse("queued", {"id": job.id, "model": job.model, "steps": job.steps, "solver": job.solver, "n": job.n,
                             "seed": job.seed, "position": ahead, "expected_wait_s": wait_s})
        m.stream_first_event_seconds.observe(time.perf_counter() - t0)
        while events is not None and not waiter.done():
            getter = asyncio.ensure_future(events.get())
            try:
                await asyncio.wait((waiter, getter), return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not getter.done():
                    getter.cancel()
            if getter.done() and not getter.cancelled():
                yield forward(getter.result())
        while events is not None and not events.empty():  # sent before the result: keep their order
            yield forward(events.get_nowait())
        res = await waiter
        st.finished = True
        if not res.ok:
            status, reason = failures[res.outcome]
            m.rejected.labels(reason).inc()
            m.responses.labels(str(status)).inc()
            yield sse("error", {"status": status, "detail": res.detail, "request_id": job.id})
            return
        labels = (job.model, res.solver, str(job.steps))
        m.queue_seconds.labels(*labels).observe(max(0.0, res.queue_ms / 1e3))
        m.compute_seconds.labels(*labels).observe(max(0.0, res.compute_ms / 1e3))
        e = svc.registry[job.model]
        fmt = job.format if job.format in ("png", "jpeg", "webp") else "png"
        for i, img in enumerate(res.images()):
            body = await svc.encoder(img[None], fmt, job.quality, e.display_scale)
            yield sse("image", {"index": i, "seed": job.seed + i, "media_type": MEDIA[fmt],
                                "data": base64.b64encode(body).decode()})
        m.request_seconds.labels(*labels).observe(time.perf_counter() - t0)
        m.responses.labels("200").inc()
        yield sse("done", {"id": job.id, "model": job.model, "class_label": job.label, "n": job.n,
                           "steps": job.steps, "solver": res.solver, "nfe": res.nfe, "guidance": job.guidance,
                           "seeds": job.seeds, "queue_ms": round(res.queue_ms, 2),
                           "compute_ms": round(res.compute_ms, 2)})
    finally:  # the stream closed (or failed) before the result: cancel, as a disconnect does
        st.close()

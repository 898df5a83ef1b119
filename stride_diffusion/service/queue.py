"""Admission errors, and the in-process queue of embedded mode.

Both transports (this one and `redis_queue`) give the API the same three calls — `submit`,
`wait`, `status` — and the worker the same two — `fetch`, `complete` — so the API, the policy and
the worker loop are one code path whichever queue sits between them.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque

from .jobs import Job, Result

WAIT_GRACE_S = 1.0  # the worker answers 504 at the deadline; the API stops waiting this much later


class Rejected(Exception):
    """Not admitted: the API answers `status` with Retry-After."""

    def __init__(self, reason: str, detail: str, status: int = 503):
        super().__init__(detail)
        self.reason, self.detail, self.status = reason, detail, status


class LocalQueue:
    def __init__(self, settings):
        self.settings = settings
        self.queue: deque[Job] = deque()
        self.arrived = asyncio.Event()
        self.futures: dict[str, tuple[str, asyncio.Future]] = {}  # id -> (model, future): queued or running
        self.worker = None  # set by the app: the one in-process worker

    # -- API side -------------------------------------------------------------------------------
    def depth(self, model: str) -> int:
        return sum(1 for m, _ in self.futures.values() if m == model)

    async def submit(self, job: Job):
        if self.worker is None or not self.worker.ready:
            raise Rejected("no_worker", "the worker is not ready yet (warming up)")
        if self.depth(job.model) >= self.settings.queue_limit:
            raise Rejected("queue_full", f"queue full ({self.settings.queue_limit} requests queued or running)")
        self.futures[job.id] = (job.model, asyncio.get_running_loop().create_future())
        self.queue.append(job)
        self.arrived.set()

    async def wait(self, job: Job) -> Result:
        fut = self.futures[job.id][1]
        try:  # asyncio.wait, not wait_for: no cancellation of the future, no extra task per request
            await asyncio.wait((fut,), timeout=max(0.0, job.deadline - time.time()) + WAIT_GRACE_S)
        finally:
            if fut.done():
                self.futures.pop(job.id, None)
            else:  # the worker still answers (504 at the deadline); drop the bookkeeping then
                fut.add_done_callback(lambda _f, i=job.id: self.futures.pop(i, None))
        return fut.result() if fut.done() else Result(job.id, 504, "deadline passed while waiting for the worker")

    async def cancel(self, job: Job):
        """The client went away: forget it if still queued, else the worker drops it between steps."""
        if job in self.queue:
            self.queue.remove(job)
            await self.complete(job, Result(job.id, 499, "cancelled by the client before it started"))
        elif self.worker is not None:
            self.worker.cancel(job.id)

    async def status(self) -> dict:
        ready = bool(self.worker and self.worker.ready)
        models = self.worker.registry.names() if self.worker else []
        return {"redis": None, "workers": {m: int(ready) for m in models},
                "depth": {m: self.depth(m) for m in models}}

    # -- worker side ----------------------------------------------------------------------------
    async def fetch(self, count: int, timeout: float) -> list[Job]:
        if not self.queue and timeout > 0:
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        out = []
        while self.queue and len(out) < count:
            out.append(self.queue.popleft())
        return out

    async def complete(self, job: Job, result: Result):
        item = self.futures.get(job.id)
        if item and not item[1].done():
            item[1].set_result(result)

    async def start(self):
        pass

    async def close(self):
        pass

"""The in-process queue of embedded mode: the API-side `Queue` and the worker-side `Transport`
(service/transport.py) in one object, between the API and the one worker of this process."""
from __future__ import annotations

import asyncio
import time
from collections import deque

from .jobs import Job, Outcome, Result
from .policy import over_capacity, work_cap
from .transport import WAIT_GRACE_S, QueueStatus, Rejected, WorkerHooks

RATE_WINDOW_S = 60.0  # completions counted for a queued request's expected wait


class LocalQueue:
    def __init__(self, settings, models: list[str], cost=None):
        self.settings, self.models = settings, list(models)
        self.cost = cost  # job -> row-steps (admission by work, service/policy.py); None: count requests only
        self.work: dict[str, tuple[str, int]] = {}  # id -> (model, row-steps): admitted, not answered yet
        self.queue: deque[Job] = deque()
        self.arrived = asyncio.Event()
        self.futures: dict[str, tuple[str, asyncio.Future]] = {}  # id -> (model, future): queued or running
        self.hooks: WorkerHooks | None = None  # the in-process worker
        self.watchers: dict[str, asyncio.Queue] = {}  # id -> progress events of a streamed request
        self.completed: deque[float] = deque()  # when requests were answered OK (the measured rate)

    def attach(self, hooks: WorkerHooks):
        self.hooks = hooks

    def _ready(self) -> bool:
        return bool(self.hooks and self.hooks.status()["ready"])

    # -- API side -------------------------------------------------------------------------------
    def depth(self, model: str) -> int:
        return sum(1 for m, _ in self.futures.values() if m == model)

    async def submit(self, job: Job):
        if not self._ready():
            raise Rejected("no_worker", "the worker is not ready yet (warming up)")
        if self.depth(job.model) >= self.settings.queue_limit:
            raise Rejected("queue_full", f"queue full ({self.settings.queue_limit} requests queued or running)")
        work = self.cost(job) if self.cost else 0
        rate = self.hooks.status().get("rate")
        queued = sum(w for m, w in self.work.values() if m == job.model)
        cap = work_cap(rate, self.settings.deadline_s)
        if cap and queued + work > cap:
            raise Rejected("queue_full", over_capacity(queued, work, rate, self.settings.deadline_s))
        self.work[job.id] = (job.model, work)
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
            else:  # the worker still answers (EXPIRED at the deadline); drop the bookkeeping then
                fut.add_done_callback(lambda _f, i=job.id: self.futures.pop(i, None))
        if fut.done():
            return fut.result()
        return Result(job.id, Outcome.EXPIRED, "deadline passed while waiting for the worker")

    async def cancel(self, job: Job):
        """The client went away: forget it if still queued, else the worker drops it between steps."""
        if job in self.queue:
            self.queue.remove(job)
            await self.complete(job, Result(job.id, Outcome.CANCELLED, "cancelled by the client before it started"))
        elif self.hooks is not None:
            self.hooks.cancel(job.id)

    async def status(self) -> QueueStatus:
        ready = self._ready()
        return {"redis": None, "workers": {m: int(ready) for m in self.models},
                "depth": {m: self.depth(m) for m in self.models}}

    # -- progress of streamed requests (service/stream.py) ------------------------------------------
    def watch(self, job: Job) -> asyncio.Queue:
        """Progress events of `job` (dicts with an 'event' key) arrive on the returned queue."""
        q = self.watchers[job.id] = asyncio.Queue()
        return q

    def unwatch(self, job: Job):
        self.watchers.pop(job.id, None)

    def watched(self, job_id: str) -> bool:
        """Called by the worker's step thread: does anyone wait for this job's progress?"""
        return job_id in self.watchers

    def progress(self, events: list):
        """On the event loop: [(job id, event)] from the worker."""
        for jid, ev in events:
            q = self.watchers.get(jid)
            if q is not None:
                q.put_nowait(ev)

    def position(self, job: Job) -> tuple[int, float | None]:
        """Requests of its model queued or running ahead of `job`, and the expected wait (s) at the
        completion rate of the last RATE_WINDOW_S (None before two completions)."""
        ahead = 0
        for jid, (model, _) in self.futures.items():
            if jid == job.id:
                break
            ahead += model == job.model
        now = time.monotonic()
        while self.completed and self.completed[0] < now - RATE_WINDOW_S:
            self.completed.popleft()
        if not ahead:
            return 0, 0.0
        if len(self.completed) < 2:
            return ahead, None
        return ahead, round(ahead * max(now - self.completed[0], 1e-3) / len(self.completed), 3)

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
        self.work.pop(job.id, None)
        item = self.futures.get(job.id)
        if item and not item[1].done():
            item[1].set_result(result)
            if result.ok:
                self.completed.append(time.monotonic())

    def drain(self):
        pass  # what is queued stays for this process's worker: nothing else could run it

    async def start(self):
        pass

    async def close(self):
        pass

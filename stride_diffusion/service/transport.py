"""The seams between the API, the queue and the worker.

Two queues implement both sides: `queue.LocalQueue` (in-process, embedded mode) and
`redis_queue.RedisQueue` (API side) / `redis_queue.RedisWorkerTransport` (worker side) over Redis
Streams. The API, the policy and the worker loop are one code path whichever sits between them.

- `Queue`: what the API calls. `submit` admits a Job or raises `Rejected`; `wait` returns its
  Result (one with outcome EXPIRED once the deadline is WAIT_GRACE_S behind, LOST when the queue
  lost it); `cancel` tells the worker that the client went away; `status` is what /readyz and
  /metrics report.
- `Transport`: what the worker calls. `fetch` hands out jobs (at most `count`, waiting up to
  `timeout` s for the first), `complete` delivers a job's Result (and releases the job: each job
  is completed exactly once by the worker that holds it), `drain` says the worker takes no more
  work. A transport asks nothing of the worker but through the `WorkerHooks` it is attached to.
- `Outcome` (jobs.py): how a request ended, as the worker (or the queue) reports it. Only the API turns an
  outcome into an HTTP status and a metric reason (service/app.py).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypedDict, runtime_checkable

from .jobs import Job, Result

WAIT_GRACE_S = 1.0  # the worker answers EXPIRED at the deadline; the API stops waiting this much later


class Rejected(Exception):
    """Not admitted (`Queue.submit`): `reason` is 'no_worker' | 'queue_full' | 'queue_unavailable'
    (also the metric's reason); the API answers it with Retry-After."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


class QueueStatus(TypedDict):
    redis: bool | None  # None: no Redis (the in-process queue)
    workers: dict[str, int]  # model -> ready workers serving it
    depth: dict[str, int]  # model -> requests queued or running


@runtime_checkable
class Queue(Protocol):
    """The API side."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def submit(self, job: Job) -> None:
        """Admit `job` or raise Rejected."""

    async def wait(self, job: Job) -> Result:
        """The submitted job's Result (never raises for a lost or late one: see Outcome)."""

    async def cancel(self, job: Job) -> None:
        """The client went away: the job is answered CANCELLED without running, or its worker
        drops it before its next step."""

    async def status(self) -> QueueStatus: ...


@dataclass(frozen=True)
class WorkerHooks:
    """All a transport may ask of the worker it serves."""

    capacity: Callable[[], int]  # rows free for more work (0 while warming up, full or draining)
    cancel: Callable[[str], None]  # the client of this job id went away
    status: Callable[[], dict]  # {"ready": bool, "models": [...], ...}: the worker's heartbeat


@runtime_checkable
class Transport(Protocol):
    """The worker side."""

    def attach(self, hooks: WorkerHooks) -> None:
        """The worker this transport serves (set once, before `start`)."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def fetch(self, count: int, timeout: float) -> list[Job]:
        """Up to `count` jobs; waits up to `timeout` s when none is there. The transport holds a job
        from here until its `complete`."""

    async def complete(self, job: Job, result: Result) -> None:
        """Deliver the result and release the job."""

    def drain(self) -> None:
        """The worker takes no more work: jobs not handed out yet are left to other workers."""

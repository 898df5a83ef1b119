"""The worker: take jobs from a transport, batch them with the policy, step the engine, answer.

Two threads of control share the task table under one lock:
- the step loop, on its own thread: before every step it checks deadlines, runs the policy and
  admits images (requests join between steps), then runs the step without the lock. It never
  waits on the event loop, so a step costs no thread hand-off (under CPU contention each hand-off
  is a scheduler wake-up, milliseconds);
- the event loop: intake from the transport (in-process queue or Redis), writing answers (raw uint8
  pixels, or for a job with `encode` the response body, encoded in this process's pool so that the
  API only forwards it), heartbeats.

The same code runs over the in-process queue (embedded mode) and over Redis Streams: the worker
calls a `transport.Transport` and hands it `WorkerHooks` (capacity, cancel, status), nothing more.
Every answer is a Result with an `Outcome`; the API alone turns it into an HTTP status.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from stride_diffusion.solvers.executor import Stepper, sample, seeded_noise
from stride_diffusion.solvers.network import enable_tf32, set_compile_cache

from .encode import Encoder
from .engine import Engine, FinishedImage
from .jobs import Job, Outcome, Result
from .metrics import Metrics
from .models import Registry
from .policy import Waiting, plan
from .previews import event as preview_event
from .transport import Transport, WorkerHooks

log = logging.getLogger("stride.worker")
INTAKE_BLOCK_S = 0.5  # longest blocking read; new work wakes it at once (and it is under the Redis socket timeout)
IDLE_WAIT_S = 0.5  # longest sleep of an idle step loop without a notification


def buckets(max_batch: int) -> list[int]:
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return out + [max_batch]


@dataclass
class Task:
    job: Job
    table: object
    rows_per_image: int
    next: int = 0  # images admitted so far
    done: dict = field(default_factory=dict)  # index -> uint8 image [H, W, C]
    started: float | None = None
    answered: bool = False
    step_sent: int = 0  # streamed requests: the last step event (k) and when it was sent
    step_sent_at: float = 0.0


class Worker:
    def __init__(self, registry: Registry, settings, transport: Transport | None, metrics: Metrics,
                 name: str = "worker"):
        self.registry, self.settings, self.transport, self.metrics, self.name = registry, settings, transport, metrics, name
        if transport is not None:
            transport.attach(WorkerHooks(self.capacity, self.cancel, self.status))
        self.engine: Engine | None = None
        self.tasks: dict[str, Task] = {}
        self.ready = False
        self.stopping = False  # draining: no new work; what was taken is finished (see stop)
        self.cut: asyncio.Event | None = None  # set by a second stop(): leave the rest to other workers
        self.intake_open = True  # the step loop ends only after intake has stopped: a read in flight is run too
        self.lock = threading.Lock()
        self.work = threading.Condition(self.lock)  # the step loop waits on it when idle
        self.loop: asyncio.AbstractEventLoop | None = None
        self.room: asyncio.Event | None = None  # set when a step frees rows: intake may read more
        self._pending: set[asyncio.Task] = set()
        self.encoder = Encoder(settings.encode_threads, settings.png_level)  # jobs with `encode`
        self.cancelled: set[str] = set()  # ids whose client went away: dropped before the next step
        self.rate: float | None = None  # row-steps/s of a fairly full batch: admission by work (policy.py)
        # progress of streamed requests (optional on a transport): watched(id) from the step thread,
        # progress([(id, event)]) on the event loop
        self._watched = getattr(transport, "watched", None)
        self._progress = getattr(transport, "progress", None)

    # -- lifecycle ----------------------------------------------------------------------------
    def warm_up(self):
        """Every batch bucket through each network once, every offered step count through a full
        sample, before reporting ready: no request pays for first-call allocation or a bad table."""
        s = self.settings
        if s.threads:
            torch.set_num_threads(s.threads)
        elif s.device == "cpu" and s.role == "all":
            # API, encoding and (on a laptop) the client share the machine: leave them a core, or
            # torch's threads get preempted inside parallel regions and every step stalls
            torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) - 1))
        cuda = torch.device(s.device).type == "cuda"
        if cuda:
            enable_tf32()
        # the networks come in the dtype the artifact records or --dtype asks for (cast when loaded)
        if s.compile:
            log.info("compile cache: %s", set_compile_cache(s.compile_cache))
        self.engine = Engine(self.registry, s.steps, s.device, self.metrics, None, s.graphs, buckets(s.max_batch),
                             update=s.update, compile=s.compile, compile_mode=s.compile_mode, sdpa=s.sdpa,
                             fuse_qkv=s.fuse_qkv)
        t0 = time.perf_counter()
        with torch.inference_mode():
            for net in self.engine.networks():  # attention check, compile, CUDA graphs per (network, batch bucket)
                net.capture()
                log.info("network %s: attention kernels %s%s%s", type(net.inner).__name__, net.attention or "none",
                         f", {net.fused} q/k/v projections fused" if net.fused else "",
                         f", compiled ({net.compile_mode}) in {net.compile_seconds:.1f} s for buckets "
                         f"{sorted(net.buckets)}" if net.compile_seconds is not None else "")
            if cuda and s.graphs:  # then each model's whole step per bucket (solvers/step_graph.py)
                log.info("step graphs captured in %.1f s", self.engine.capture_steps())
            if s.compile or s.warmup:  # every decoder at batch 1 and 2 (compiled: its two graphs)
                secs = self.engine.warm_decoders()
                if s.compile:
                    log.info("decoders compiled in %.1f s", secs)
            if not s.warmup:
                return
            for e in self.registry:
                for network in e.samplers.networks(s.steps):  # the base network, then each own one (secant)
                    key = e.network_key(network)
                    model = self.engine.steppers[key].model
                    tables = [t for t in (self._warm_table(e, network, n) for n in s.steps) if t is not None]
                    for b in buckets(s.max_batch) if tables else ():  # one model call per batch size the engine may form
                        st = Stepper(model, self.engine.steppers[key].window, s.device, update=s.update)
                        st.add([tables[-1]] * b, seeded_noise(range(b), e.shape, device=s.device), [0] * b, 1.0)
                        if cuda:  # time this step alone: kernels run asynchronously
                            torch.cuda.synchronize()
                        t0 = time.perf_counter()
                        st.step()
                        if b == s.max_batch:  # the first estimate of the rate, before any load
                            if cuda:
                                torch.cuda.synchronize()
                            self._measure(b, time.perf_counter() - t0)
                    for table in tables:  # and every step count's table, end to end, and the decoder
                        y = sample(model, table, seeded_noise([0], e.shape, device=s.device),
                                   torch.zeros(1, dtype=torch.long), update=s.update)
                        self.engine.pixels(key, y)
        log.info("warm-up done in %.1f s (buckets %s, steps %s)", time.perf_counter() - t0, buckets(s.max_batch), s.steps)

    @staticmethod
    def _warm_table(e, network: str, n: int):
        """The table a warm-up runs on `network` at n steps: the auto-pick's where it runs there, else
        the default's, else the first of the network's samplers that serves n (None: none does)."""
        ss = e.samplers
        s = next((s for s in (ss.best(n)[0], ss.default(n), *ss) if s.network == network and s.serves(n)), None)
        return s.table(n) if s is not None else None

    def status(self) -> dict:
        return {"id": self.name, "ready": self.ready, "models": self.registry.names(), "steps": self.settings.steps,
                "rows": self.engine.rows if self.engine else 0, "max_batch": self.settings.max_batch,
                "tasks": len(self.tasks), "rate": round(self.rate, 1) if self.rate else None}

    def _measure(self, rows: int, seconds: float):
        """Throughput from a step of at least half a batch (a nearly idle worker's small steps would
        understate what it does under load), smoothed over about five steps."""
        if 2 * rows >= self.settings.max_batch and seconds > 0:
            r = rows / seconds
            self.rate = r if self.rate is None else 0.8 * self.rate + 0.2 * r

    def capacity(self) -> int:
        """Rows free for more work (what the transport may take on without starving other workers)."""
        if self.engine is None or not self.ready or self.stopping:
            return 0
        with self.lock:
            return self.settings.max_batch - self.engine.rows - self._waiting_rows()

    def cancel(self, job_id: str):
        """The client went away: the step loop drops the request's rows before its next step (it
        alone touches the engine mid-run) and answers it CANCELLED."""
        with self.work:
            self.cancelled.add(job_id)
            self.work.notify()

    def stop(self):
        """First call (SIGTERM): drain. Stop taking work, report not ready (the API stops counting
        this worker), finish and answer every request already taken, bounded by drain_timeout_s.
        Second call: stop now; what is left unanswered stays pending and is re-claimed by others."""
        if self.stopping:
            if self.loop is not None and self.cut is not None:
                self.loop.call_soon_threadsafe(self.cut.set)
            return
        self.stopping, self.ready = True, False
        self.metrics.worker_draining.set(1)
        if self.transport is not None:
            self.transport.drain()
        with self.work:
            self.work.notify()

    async def run(self) -> bool:
        """Serve until stop(); True when the drain finished everything taken, False when it was cut."""
        self.loop, self.room, self.cut = asyncio.get_running_loop(), asyncio.Event(), asyncio.Event()
        await self.loop.run_in_executor(None, self.warm_up)
        self.ready = not self.stopping
        log.info("worker %s ready", self.name)
        stepper = threading.Thread(target=self._step_loop, name="stride-steps", daemon=True)
        stepper.start()
        try:
            while not self.stopping:
                await self._intake()
            with self.work:
                self.intake_open = False
                self.work.notify()
            return await self._drain(stepper)
        finally:
            self.ready = False

    async def _drain(self, stepper: threading.Thread) -> bool:
        """Wait for every request read to be answered (the step loop ends once none is left) and its
        answer written, until drain_timeout_s passes or a second stop() comes."""
        t0 = time.monotonic()

        async def finish():
            await self.loop.run_in_executor(None, stepper.join)
            while self._pending:
                await asyncio.gather(*list(self._pending), return_exceptions=True)

        done, cut = asyncio.ensure_future(finish()), asyncio.ensure_future(self.cut.wait())
        await asyncio.wait({done, cut}, timeout=self.settings.drain_timeout_s, return_when=asyncio.FIRST_COMPLETED)
        cut.cancel()
        if done.done():
            log.info("worker %s drained in %.1f s", self.name, time.monotonic() - t0)
            return True
        with self.lock:
            left = sum(not t.answered for t in self.tasks.values())
        why = "a second stop signal" if self.cut.is_set() else f"drain_timeout_s={self.settings.drain_timeout_s}"
        log.warning("worker %s: drain cut short by %s with %d requests unanswered; other workers re-claim them",
                    self.name, why, left)
        return False

    # -- event loop: intake and answers ---------------------------------------------------------
    async def _intake(self):
        free = self.capacity()
        if free <= 0:
            self.room.clear()
            try:
                await asyncio.wait_for(self.room.wait(), INTAKE_BLOCK_S)
            except asyncio.TimeoutError:
                pass
            return
        # Claim by rows, not by count: one entry at a time while rows are free (a request of n images at
        # guidance holds n x rows_per_image), so a worker never holds more than it can start (at most one
        # request past its batch) and the rest stays in the queue for other workers.
        timeout = INTAKE_BLOCK_S
        while free > 0:
            jobs = await self.transport.fetch(1, timeout)
            if not jobs:
                return
            with self.work:
                for job in jobs:
                    self._accept(job)
                self.work.notify()
            timeout, free = 0, self.capacity()

    def _accept(self, job: Job):  # under the lock
        if job.id in self.tasks:  # redelivered to us while we still hold it
            self.tasks[job.id].job.entry = job.entry or self.tasks[job.id].job.entry
            return
        try:
            entry = self.registry[job.model]
            sampler = entry.samplers[job.solver]
            table = sampler.table(job.steps)
        except Exception as e:  # API and worker disagree on models/solvers: a configuration error
            self._answer(Task(job, None, 1), Result(job.id, Outcome.REFUSED,
                                                    f"worker {self.name} cannot run this request: {e}"))
            return
        rows = sampler.rows_per_image(job.guidance)
        self.tasks[job.id] = Task(job, table, rows)

    def _answer(self, t: Task, result: Result):  # under the lock, from either thread
        t.answered = True
        self.tasks.setdefault(t.job.id, t)
        self.loop.call_soon_threadsafe(self._spawn, self._deliver(t, result))
        self.loop.call_soon_threadsafe(self.room.set)  # its rows are free

    async def _finish(self, tasks: list[Task], end: float):
        """Answer every request a step finished with its raw pixels."""
        for t in tasks:
            job = t.job
            self.metrics.images.labels(job.model, job.solver, str(job.steps)).inc(job.n)
            pixels = np.stack([t.done[i] for i in range(job.n)])
            result = Result.of_images(job.id, pixels, solver=job.solver, nfe=job.steps,
                                      queue_ms=1e3 * (t.started - job.enqueued), compute_ms=1e3 * (end - t.started),
                                      worker=self.name)
            self._spawn(self._encode_and_deliver(t, result) if job.encode else self._deliver(t, result))

    async def _encode_and_deliver(self, t: Task, result: Result):
        """The response body instead of the pixels (the API forwards it); should encoding fail, the
        pixels (the API encodes them)."""
        job, t0 = t.job, time.perf_counter()
        try:
            body = await self.encoder(result.images(), job.format, job.quality, self.registry[job.model].display_scale)
            self.metrics.encode_seconds.labels(job.format).observe(time.perf_counter() - t0)
            result.pixels, result.shape, result.encoded = body, [], job.format
        except Exception:
            log.exception("could not encode the result of %s; sending its pixels", job.id)
        await self._deliver(t, result)

    async def _deliver(self, t: Task, result: Result):
        try:
            await self.transport.complete(t.job, result)
            self.metrics.worker_results.labels(result.outcome.value).inc()
        except Exception:
            log.exception("could not deliver the result of %s", t.job.id)
        finally:
            with self.lock:
                self.tasks.pop(t.job.id, None)

    def _spawn(self, coro):
        task = asyncio.create_task(coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    # -- step loop (its own thread) -------------------------------------------------------------
    def _waiting_rows(self) -> int:  # under the lock
        return sum(t.rows_per_image * (t.job.n - t.next) for t in self.tasks.values() if not t.answered)

    def _step_loop(self):
        with torch.inference_mode():
            while True:
                with self.work:
                    wake = self._schedule()
                    if not self.engine.busy:
                        waiting = any(not t.answered for t in self.tasks.values())
                        if not self.intake_open and not waiting:
                            return
                        self.work.wait(max(0.0, wake - time.time()) if wake is not None else IDLE_WAIT_S)
                        continue
                rows, t0 = self.engine.rows, time.perf_counter()
                try:
                    done = self.engine.step()  # without the lock: intake goes on meanwhile
                except Exception as e:  # a failed model call fails the requests in it, not the worker
                    log.exception("step failed")
                    with self.lock:
                        for jid in list(self.engine.jobs):
                            self._answer(self.tasks[jid], Result(jid, Outcome.FAILED, f"model call failed: "
                                                                 f"{type(e).__name__}: {e}", worker=self.name))
                        self.engine.reset()
                    continue
                self._measure(rows, time.perf_counter() - t0)
                self._collect(done)

    def _collect(self, done: list[FinishedImage]):
        finished = []
        with self.lock:
            self.engine.release(done)
            for img in done:
                t = self.tasks.get(img.job_id)
                if t is None or t.answered:
                    continue
                t.done[img.index] = img.pixels
                if len(t.done) == t.job.n:
                    t.answered = True
                    finished.append(t)
            if self._watched is not None:
                self._report(finished)
        if finished:
            self.loop.call_soon_threadsafe(self._spawn, self._finish(finished, time.time()))
        if done:
            self.loop.call_soon_threadsafe(self.room.set)

    def _report(self, finished: list[Task]):  # under the lock: step events of streamed requests
        now, every, events = time.time(), self.settings.progress_ms / 1e3, []
        ended = {t.job.id for t in finished}
        watched = [t for t in self.tasks.values() if t.started is not None and self._watched(t.job.id)
                   and (not t.answered or t.job.id in ended)]
        ks = self.engine.progress({t.job.id for t in watched}) if watched else {}
        for t in watched:
            n = t.job.steps
            k = n if t.job.id in ended else 0 if t.next < t.job.n else min(n, ks.get(t.job.id, 0))
            if k > t.step_sent and (k == n or now - t.step_sent_at >= every):
                t.step_sent, t.step_sent_at = k, now
                elapsed = round(1e3 * (now - t.started), 1)
                events.append((t.job.id, {"event": "step", "k": k, "n": n, "elapsed_ms": elapsed}))
        shots = [p for p in self.engine.previews.take() if self._watched(p[0])]
        if events or shots:  # previews are encoded on the event loop, not in the step thread
            self.loop.call_soon_threadsafe(self._send_progress, events, shots)

    def _send_progress(self, events: list, shots: list):
        self._progress(events + [preview_event(*p) for p in shots])

    def _schedule(self) -> float | None:  # under the lock; returns when to decide again if idle
        now = time.time()
        for jid in self.cancelled:
            t = self.tasks.get(jid)
            if t is not None and not t.answered:
                self.engine.drop(jid)
                self._answer(t, Result(jid, Outcome.CANCELLED, f"cancelled by the client after {len(t.done)} of "
                                                               f"{t.job.n} images", worker=self.name))
        self.cancelled.clear()
        for t in list(self.tasks.values()):  # running requests: the deadline is checked before every step
            if not t.answered and t.next > 0 and now >= t.job.deadline:
                self._expire(t, now)
        waiting = [Waiting(t.job.id, t.rows_per_image, t.job.n - t.next, t.job.deadline, t.job.enqueued)
                   for t in self.tasks.values() if not t.answered and t.next < t.job.n]
        p = plan(waiting, self.settings.max_batch - self.engine.rows, self.engine.busy, self.settings.max_batch,
                 self.settings.max_wait_ms / 1e3, now)
        for jid in p.expired:
            self._expire(self.tasks[jid], now)
        for jid, k in p.admit:
            t = self.tasks[jid]
            self.engine.add(t.job, t.table, t.next, k, t.rows_per_image)
            t.next += k
            if t.started is None:
                t.started = now
                if self._watched is not None and self._watched(jid):
                    self.loop.call_soon_threadsafe(self._progress, [(jid, {"event": "started"})])
        self.metrics.rows_in_flight.set(self.engine.rows)
        return p.wake

    def _expire(self, t: Task, now: float):  # under the lock
        self.engine.drop(t.job.id)
        where = "before it was started" if t.next == 0 else f"after {len(t.done)} of {t.job.n} images"
        self._answer(t, Result(t.job.id, Outcome.EXPIRED, f"deadline passed {where}; the request was dropped, "
                               "not finished", worker=self.name, queue_ms=1e3 * ((t.started or now) - t.job.enqueued)))

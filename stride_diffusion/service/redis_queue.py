"""Redis Streams: the API-side `Queue` (`RedisQueue`) and the worker-side `Transport`
(`RedisWorkerTransport`) of service/transport.py.

Keys, with P the key prefix (default 'stride'):
  P:requests:<model>   stream, consumer group 'workers'; an entry is one Job (field 'job')
  P:result:<id>        the Result, SET ... EX result_ttl (idempotent: a re-run overwrites the same answer)
  P:done:<api id>      pub/sub channel on which workers wake the API instance that waits for <id>
  P:worker:<id>        heartbeat, SET ... EX 3 x heartbeat; P:workers is the set of ids to look them up
  P:dead               dead-letter stream: entries delivered more than max_deliveries times
  P:cancel:<id>        set by the API when the client of <id> went away (EX result_ttl); the worker
                       holding <id> polls these markers and drops its rows before the next step

On SIGTERM a worker drains: it reads nothing more, finishes and acknowledges what it holds (its
ownership refresh goes on meanwhile), then leaves the group (XGROUP DELCONSUMER) if nothing is
pending under its name. A drain cut short leaves its entries pending, re-claimed as a dead worker's.

Delivery is at least once. An entry is deleted (XACK + XDEL in one MULTI, after the SET) once its
result is stored, so XLEN is exactly "queued or running" and bounds admission. Workers refresh
ownership of what they hold (XCLAIM JUSTID) every heartbeat, so XAUTOCLAIM's min idle time only
fires for entries of a worker that stopped heartbeating.

Why pub/sub rather than a BLPOP list per request for the wake-up: one subscriber connection per
API process serves every waiting request, where BLPOP would hold one connection per waiting
request. Pub/sub is at most once, so it is only a wake-up: the result itself is the SET key,
which the API also polls, and a lost message costs at most one poll interval, never the result.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import deque

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError, ResponseError

from .jobs import Job, Outcome, Result
from .policy import over_capacity, work_cap
from .queue import RATE_WINDOW_S
from .transport import WAIT_GRACE_S, QueueStatus, Rejected, WorkerHooks

log = logging.getLogger("stride.redis")
GROUP = "workers"
POLL_S = 0.5  # API: re-read the result key this often even without a wake-up
DOWN_POLL_S = 0.25  # API: while Redis is unreachable, try it again this often
DLQ_MAXLEN = 10000
CANCEL_POLL_S = 0.1  # worker: how often it looks for cancel markers of the requests it holds
LONG_BLOCK_S = 0.2  # waits shorter than this are not left to Redis's blocking timeout (see fetch)

# Admission in one round trip and atomically: refuse when the stream already holds `limit` entries
# (ARGV[1]), or, given a work cap (ARGV[5], row-steps, service/policy.py), when the work of its entries
# (field 'work': the stream holds exactly what is queued or running) plus this request's (ARGV[4])
# passes it; the reply then carries that queued work. A streamed request's progress/preview wishes go
# in a further field, 'watch' (Job.watch): a worker of the previous version reads 'job' alone and
# runs it, without progress.
ADMIT = """
local n = redis.call('XLEN', KEYS[1])
if n >= tonumber(ARGV[1]) then return {0, n} end
local cap = tonumber(ARGV[5])
if cap > 0 then
  local queued = 0
  for _, e in ipairs(redis.call('XRANGE', KEYS[1], '-', '+')) do
    local f = e[2]
    for i = 1, #f, 2 do
      if f[i] == 'work' then queued = queued + tonumber(f[i + 1]) end
    end
  end
  if queued + tonumber(ARGV[4]) > cap then return {0, n, queued} end
end
local f = {'job', ARGV[2], 'work', ARGV[4]}
if ARGV[3] ~= '' then f[5] = 'watch'; f[6] = ARGV[3] end
return {1, redis.call('XADD', KEYS[1], '*', unpack(f)), n}
"""


# Leave the group once nothing is pending under our name (a clean drain): the group's consumer list
# does not fill with the names of pods long gone. DELCONSUMER drops a consumer's pending entries
# with it, where nobody could re-claim them, so a consumer that still holds any stays.
LEAVE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local ok, mine = pcall(redis.call, 'XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if not ok or #mine > 0 then return 0 end
return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
"""


POOL_WAIT_S = 5.0  # a command waits this long for a free pooled connection before failing (queue_unavailable)
WORKER_CONNECTIONS = 64  # a worker's concurrent commands: its blocking read, heartbeat, re-claims, answers


def pool_size(settings, n_models: int) -> int:
    """API side: one connection per request that may be in flight (queue_limit per model: its XADD and
    result polls), plus the subscriber and the refresher; past it commands wait (BlockingConnectionPool)."""
    return settings.queue_limit * max(1, n_models) + 8


def connect(settings, max_connections: int = WORKER_CONNECTIONS) -> aioredis.Redis:
    """Fail fast: one quick retry (a pooled connection gone stale after a Redis restart), no
    multi-second backoff; timeouts above the longest blocking read. The pool is bounded and blocking:
    a command past `max_connections` in flight waits up to POOL_WAIT_S for a free connection
    (redis-py's default pool raises MaxConnectionsError at once)."""
    kw = dict(socket_timeout=5.0, socket_connect_timeout=2.0, retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), 1))
    if settings.redis_url.startswith("rediss://") and settings.redis_ca_cert:
        kw["ssl_ca_certs"] = settings.redis_ca_cert
    pool = aioredis.BlockingConnectionPool.from_url(settings.redis_url, max_connections=max_connections,
                                                    timeout=POOL_WAIT_S, **kw)
    return aioredis.Redis.from_pool(pool)


class Keys:
    def __init__(self, prefix: str):
        self.p = prefix

    def stream(self, model: str) -> str:
        return f"{self.p}:requests:{model}"

    def result(self, job_id: str) -> str:
        return f"{self.p}:result:{job_id}"

    def channel(self, api_id: str) -> str:
        return f"{self.p}:done:{api_id}"

    def cancel(self, job_id: str) -> str:
        return f"{self.p}:cancel:{job_id}"

    def worker(self, worker_id: str) -> str:
        return f"{self.p}:worker:{worker_id}"

    @property
    def workers(self) -> str:
        return f"{self.p}:workers"

    @property
    def dead(self) -> str:
        return f"{self.p}:dead"


def _s(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class RedisQueue:
    """API side: admit (XADD), wait for the result, know which workers are alive."""

    def __init__(self, settings, models: list[str], cost=None):
        self.settings, self.models, self.keys = settings, list(models), Keys(settings.key_prefix)
        self.cost = cost  # job -> row-steps (admission by work, service/policy.py); None: count requests only
        self.r = connect(settings, pool_size(settings, len(self.models)))
        self.api_id = uuid.uuid4().hex[:12]
        self.channel = self.keys.channel(self.api_id)
        self.waiters: dict[str, asyncio.Event] = {}
        self.watchers: dict[str, asyncio.Queue] = {}  # id -> progress events of a streamed request
        self.ahead: dict[str, int | None] = {}  # streamed request id -> entries ahead of it when admitted
        self.done_samples: dict[str, deque] = {m: deque() for m in models}  # (monotonic, entries done)
        self.live: dict[str, int] = {m: 0 for m in models}
        self.depths: dict[str, int] = {m: 0 for m in models}
        self.rates: dict[str, float] = {m: 0.0 for m in models}  # row-steps/s of the live workers, summed
        self.redis_ok = False
        self._admit = self.r.register_script(ADMIT)
        self._tasks: list[asyncio.Task] = []
        self._closed = False
        self._listening = asyncio.Event()

    async def start(self):
        await self._refresh_once()
        self._tasks = [asyncio.create_task(self._listen()), asyncio.create_task(self._refresh())]
        try:
            await asyncio.wait_for(self._listening.wait(), 2.0)
        except asyncio.TimeoutError:
            log.warning("not subscribed to %s yet (Redis unreachable?); results will be polled", self.channel)

    async def close(self):
        self._closed = True
        await _stop(self._tasks)
        await self.r.aclose()

    async def submit(self, job: Job):
        if not self.redis_ok:  # what was accepted waits for Redis to come back; nothing new is taken meanwhile
            raise Rejected("queue_unavailable", "queue unavailable: Redis unreachable, retry later")
        if self.live.get(job.model, 0) == 0:
            raise Rejected("no_worker", f"no live worker serves model {job.model!r}" +
                           ("" if self.redis_ok else " (Redis unreachable)"))
        job.reply = self.channel
        self.waiters[job.id] = asyncio.Event()  # before XADD: the answer may come back at once
        work, rate = self.cost(job) if self.cost else 0, self.rates.get(job.model, 0.0)
        try:
            ok, val, *ahead = await self._admit(keys=[self.keys.stream(job.model)],
                                        args=[self.settings.queue_limit, job.dumps(), job.watch(), work,
                                              work_cap(rate, self.settings.deadline_s)])
        except (RedisError, OSError) as e:
            self.waiters.pop(job.id, None)
            raise Rejected("queue_unavailable", f"queue unavailable: {type(e).__name__}: {e}") from None
        if not ok:
            self.waiters.pop(job.id, None)
            if ahead:  # refused by work
                raise Rejected("queue_full", over_capacity(int(ahead[0]), work, rate, self.settings.deadline_s))
            raise Rejected("queue_full", f"queue full ({int(val)} requests queued or running for {job.model!r}, "
                                         f"limit {self.settings.queue_limit})")
        job.entry, job.stream = _s(val), self.keys.stream(job.model)
        if job.progress:
            self.ahead[job.id] = int(ahead[0]) if ahead else None

    async def wait(self, job: Job) -> Result:
        ev = self.waiters.setdefault(job.id, asyncio.Event())
        key, hard, down_since = self.keys.result(job.id), job.deadline + WAIT_GRACE_S, None
        try:
            while True:
                remaining = hard - time.time()
                if remaining <= 0:
                    return Result(job.id, Outcome.EXPIRED, "deadline passed while waiting for a worker" +
                                  ("" if down_since is None else " (the queue was unreachable)"))
                try:
                    await asyncio.wait_for(ev.wait(), min(POLL_S if down_since is None else DOWN_POLL_S, remaining))
                except asyncio.TimeoutError:
                    pass
                ev.clear()
                try:
                    raw = await self.r.get(key)
                    if raw is None and not await self.r.xrange(job.stream, job.entry, job.entry):
                        # entry gone: either done a moment ago (the SET precedes XDEL) or lost with Redis
                        raw = await self.r.get(key)
                        if raw is None:
                            return Result(job.id, Outcome.LOST, "the queue lost this request (Redis restarted "
                                                                "without persistence?); it was not computed, retry")
                    if raw is not None:
                        try:
                            await self.r.delete(key)
                        except (RedisError, OSError):
                            pass  # the TTL cleans up
                        return Result.loads(raw)
                    down_since = None
                except (RedisError, OSError) as e:
                    # Redis unreachable: the entry comes back with it (AOF) and the worker holding the request
                    # stores its result once it can, so wait on (up to the deadline); only an outage longer
                    # than redis_outage_s gives the request up
                    down_since = down_since or time.monotonic()
                    if time.monotonic() - down_since > self.settings.redis_outage_s:
                        return Result(job.id, Outcome.LOST, f"the queue was unreachable for more than "
                                                            f"{self.settings.redis_outage_s:g} s ({type(e).__name__}); "
                                                            f"the request may not have run, retry")
        finally:
            self.waiters.pop(job.id, None)

    async def cancel(self, job: Job):
        """Leave a marker for the worker that holds (or will take) the request."""
        try:
            await self.r.set(self.keys.cancel(job.id), b"1", ex=self.settings.result_ttl_s)
        except (RedisError, OSError) as e:
            log.warning("could not cancel %s (%s); it runs to the end", job.id, e)

    def watch(self, job: Job) -> asyncio.Queue:
        """Progress of `job` (published by its worker on our reply channel) arrives on this queue."""
        job.progress = True
        q = self.watchers[job.id] = asyncio.Queue()
        return q

    def unwatch(self, job: Job):
        self.watchers.pop(job.id, None)
        self.ahead.pop(job.id, None)

    def position(self, job: Job) -> tuple[int | None, float | None]:
        """Entries of its model queued or running ahead of `job` when it was admitted, and the expected
        wait (s) at the rate entries left the stream over the last RATE_WINDOW_S (every worker's,
        from XINFO STREAM: entries-added minus length; None before a completion was seen)."""
        ahead = self.ahead.pop(job.id, None)
        if not ahead:
            return ahead, None if ahead is None else 0.0
        s = self.done_samples.get(job.model)
        if not s or s[-1][1] <= s[0][1]:
            return ahead, None
        rate = (s[-1][1] - s[0][1]) / max(s[-1][0] - s[0][0], 1e-3)
        return ahead, round(ahead / rate, 3)

    async def status(self) -> QueueStatus:
        return {"redis": self.redis_ok, "workers": dict(self.live), "depth": dict(self.depths)}

    async def _listen(self):
        while not self._closed:
            ps = self.r.pubsub()
            try:
                await ps.subscribe(self.channel)
                self._listening.set()
                for ev in list(self.waiters.values()):  # anything finished while we were away
                    ev.set()
                while not self._closed:
                    msg = await ps.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if msg and msg.get("type") == "message" and msg["data"][:1] == b"{":  # progress
                        self._progress(msg["data"])
                    elif msg and msg.get("type") == "message":
                        ev = self.waiters.get(_s(msg["data"]))
                        if ev:
                            ev.set()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError):
                if self._listening.is_set():  # just lost Redis: let every waiter notice now, not at its next poll
                    for ev in list(self.waiters.values()):
                        ev.set()
                self._listening.clear()
                await asyncio.sleep(0.2)
            finally:
                with contextlib.suppress(Exception):  # closing a dead connection may fail any way
                    await ps.aclose()

    def _progress(self, data: bytes):
        with contextlib.suppress(ValueError, KeyError, TypeError):
            ev = json.loads(data)
            q = self.watchers.get(ev.pop("id"))
            if q is not None:
                q.put_nowait(ev)

    async def _refresh_once(self):
        k = self.keys
        try:
            ids = [_s(i) for i in await self.r.smembers(k.workers)]
            vals = await self.r.mget([k.worker(i) for i in ids]) if ids else []
            live, rates = {m: 0 for m in self.models}, {m: 0.0 for m in self.models}
            for i, v in zip(ids, vals):
                if v is None:
                    await self.r.srem(k.workers, i)
                    continue
                info = json.loads(v)
                if info.get("ready"):
                    for m in info.get("models", []):
                        if m in live:
                            live[m] += 1
                            rates[m] += float(info.get("rate") or 0)
            pipe = self.r.pipeline(transaction=False)
            for m in self.models:
                pipe.xlen(k.stream(m))
            for m in self.models:
                pipe.xinfo_stream(k.stream(m))
            res = await pipe.execute(raise_on_error=False)
            self.depths = dict(zip(self.models, map(int, res[:len(self.models)])))
            self._sample_done(res[len(self.models):])
            self.live, self.rates, self.redis_ok = live, rates, True
        except (RedisError, OSError, ValueError):
            self.live, self.redis_ok = {m: 0 for m in self.models}, False

    def _sample_done(self, infos):
        """Entries that left each model's stream so far (done, cancelled, dead-lettered), for the rate."""
        now = time.monotonic()
        for m, info in zip(self.models, infos):
            if not isinstance(info, dict) or "entries-added" not in info:  # no stream yet, or Redis < 7
                continue
            s = self.done_samples[m]
            s.append((now, int(info["entries-added"]) - int(info["length"])))
            while len(s) > 2 and s[1][0] < now - RATE_WINDOW_S:
                s.popleft()

    async def _refresh(self):
        while not self._closed:
            await asyncio.sleep(min(0.5, self.settings.heartbeat_s))
            await self._refresh_once()


class RedisWorkerTransport:
    """Worker side: read (XREADGROUP), re-claim dead workers' entries (XAUTOCLAIM), answer, heartbeat.
    Without attached hooks (a transport alone) it heartbeats as ready and claims one entry at a time."""

    def __init__(self, settings, models: list[str], metrics):
        self.settings, self.models, self.metrics = settings, list(models), metrics
        self.hooks: WorkerHooks | None = None
        self.held: dict[str, Job] = {}  # handed out by fetch, not completed yet: ours while we heartbeat
        self.draining = False
        self.keys = Keys(settings.key_prefix)
        self.streams = [self.keys.stream(m) for m in self.models]
        self.consumer = settings.worker_id
        self.r = connect(settings)
        self.backlog: list[Job] = []  # own pending entries after a restart, and re-claimed ones
        self._tasks: list[asyncio.Task] = []
        self._closed = False
        self._leave = self.r.register_script(LEAVE)
        self._publishing: set[asyncio.Task] = set()  # progress messages on their way
        self.down = False  # the last heartbeat could not reach Redis
        self.back_at = -float("inf")  # monotonic time Redis answered again after an outage

    def attach(self, hooks: WorkerHooks):
        self.hooks = hooks

    def drain(self):
        self.draining = True

    def watched(self, job_id: str) -> bool:
        """Called by the worker's step thread: is this a streamed request?"""
        job = self.held.get(job_id)
        return job is not None and job.progress and bool(job.reply)

    def progress(self, events: list):
        """On the event loop: publish [(job id, event)] on each request's reply channel (rate-limited
        by the worker: progress_ms), fire and forget."""
        msgs = [(self.held[jid].reply, json.dumps({"id": jid, **ev})) for jid, ev in events if jid in self.held]
        if msgs:
            task = asyncio.create_task(self._publish(msgs))
            self._publishing.add(task)
            task.add_done_callback(self._publishing.discard)

    async def _publish(self, msgs):
        with contextlib.suppress(RedisError, OSError):
            pipe = self.r.pipeline(transaction=False)
            for channel, msg in msgs:
                pipe.publish(channel, msg)
            await pipe.execute(raise_on_error=False)

    async def start(self):
        await self._ensure_groups(retry=True)
        for s in self.streams:  # our own unfinished entries from a previous life under the same id
            resp = await self.r.xreadgroup(GROUP, self.consumer, {s: "0"}, count=10000)
            await self._take(s, _entries(resp), reclaimed=True)
        self._tasks = [asyncio.create_task(self._heartbeat()), asyncio.create_task(self._reclaim()),
                       asyncio.create_task(self._watch_cancels())]

    async def close(self):
        self._closed = True
        await _stop(self._tasks)
        try:
            await self.r.delete(self.keys.worker(self.consumer))
            await self.r.srem(self.keys.workers, self.consumer)
            for s in self.streams:
                await self._leave(keys=[s], args=[GROUP, self.consumer])
        except (RedisError, OSError):
            pass
        await self.r.aclose()

    async def _ensure_groups(self, retry=False):
        while True:
            try:
                for s in self.streams:
                    try:
                        await self.r.xgroup_create(s, GROUP, id="0", mkstream=True)
                    except ResponseError as e:
                        if "BUSYGROUP" not in str(e):
                            raise
                return
            except (RedisError, OSError) as e:
                if not retry:
                    raise
                log.warning("Redis not reachable (%s); retrying", e)
                await asyncio.sleep(0.5)

    # -- reading --------------------------------------------------------------------------------
    async def fetch(self, count: int, timeout: float) -> list[Job]:
        jobs = await self._fetch(count, timeout)
        self.held.update((j.id, j) for j in jobs)
        return jobs

    async def _fetch(self, count: int, timeout: float) -> list[Job]:
        if self.backlog:
            out, self.backlog = self.backlog[:count], self.backlog[count:]
            return out
        # Redis times blocked clients out on its cron tick (hz 10: up to 100 ms late), so a short wait
        # (the policy's few-ms batch fill) is a read, a local sleep and a second read; only an idle
        # worker blocks in Redis, where a new entry wakes it at once. Never BLOCK 0: that is forever.
        if 0 < timeout < LONG_BLOCK_S:
            jobs = await self._read(count, None)
            if jobs:
                return jobs
            await asyncio.sleep(timeout)
            timeout = 0
        return await self._read(count, int(min(timeout, 1.0) * 1000) if timeout > 0 else None)

    async def _read(self, count: int, block: int | None) -> list[Job]:
        try:
            resp = await self.r.xreadgroup(GROUP, self.consumer, {s: ">" for s in self.streams}, count=count,
                                           block=block)
        except ResponseError as e:
            if "NOGROUP" in str(e):  # Redis restarted without persistence: the group is gone
                await self._ensure_groups()
                return []
            raise
        except (RedisError, OSError) as e:
            if not self.down:  # an outage is logged once, by the heartbeat
                log.warning("read failed (%s); retrying", e)
            await asyncio.sleep(0.2)
            return []
        jobs = []
        for stream, entries in _by_stream(resp):
            jobs += await self._take(stream, entries, reclaimed=False)
        return jobs

    async def _take(self, stream: str, entries, reclaimed: bool) -> list[Job]:
        out = []
        for eid, fields in entries:
            eid = _s(eid)
            raw = fields.get(b"job") if fields else None
            if raw is None:  # payload trimmed away: nothing to run, nobody to answer
                await self._ack(stream, eid)
                continue
            try:
                job = Job.loads(raw, fields.get(b"watch"))
            except Exception as e:
                await self._dead_letter(stream, eid, raw, None, f"unreadable job: {e}")
                continue
            job.entry, job.stream = eid, stream
            if reclaimed:
                if job.id in self.held:  # ours already (an entry left idle by an outage): running here
                    continue
                n = await self._deliveries(stream, eid)
                job.deliveries = n
                if await self.r.exists(self.keys.result(job.id)):  # answered, but died before XACK
                    await self._ack(stream, eid)
                    continue
                if n > self.settings.max_deliveries:
                    await self._dead_letter(stream, eid, raw, job, f"delivered {n} times without completing "
                                            f"(more than max_deliveries={self.settings.max_deliveries}); the workers "
                                            f"running it died")
                    continue
                self.metrics.redelivered.inc()
            out.append(job)
        if reclaimed:
            self.backlog += out
        return out

    async def _deliveries(self, stream: str, eid: str) -> int:
        p = await self.r.xpending_range(stream, GROUP, eid, eid, 1)
        return int(p[0]["times_delivered"]) if p else 1

    async def _reclaim(self):
        idle = self.settings.claim_idle_ms
        while not self._closed:
            await asyncio.sleep(max(0.05, min(1.0, idle / 2e3)))
            try:
                room = self.hooks.capacity() if self.hooks else 1
                # After an outage every entry looks idle; their workers refresh ownership on their first
                # heartbeat back, so claim only once Redis has been back for the idle time.
                if room <= 0 or self.backlog or self.down or time.monotonic() - self.back_at < idle / 1e3:
                    continue
                for s in self.streams:
                    _, claimed, *_ = await self.r.xautoclaim(s, GROUP, self.consumer, idle, "0-0", count=room)
                    if claimed:
                        log.warning("re-claimed %d entries idle > %d ms from %s", len(claimed), idle, s)
                        await self._take(s, claimed, reclaimed=True)
            except ResponseError as e:
                if "NOGROUP" in str(e):
                    await self._ensure_groups()
            except (RedisError, OSError):
                pass
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reclaim failed")

    async def _watch_cancels(self):
        """Cancel markers of the requests this worker holds: handed-out ones leave the batch before
        the next step (the worker's cancel hook), ones still in the backlog are answered without running."""
        while not self._closed:
            await asyncio.sleep(CANCEL_POLL_S)
            try:
                jobs = list(self.held.values()) + self.backlog
                if not jobs:
                    continue
                marks = await self.r.mget([self.keys.cancel(j.id) for j in jobs])
                gone = {j.id for j, m in zip(jobs, marks) if m is not None}
                if not gone:
                    continue
                for j in [j for j in self.backlog if j.id in gone]:
                    self.backlog.remove(j)
                    await self.complete(j, Result(j.id, Outcome.CANCELLED, "cancelled by the client before it "
                                                                           "started"))
                for jid in gone:
                    if self.hooks and jid in self.held:
                        self.hooks.cancel(jid)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError):
                pass
            except Exception:
                log.exception("cancel watch failed")

    # -- answering --------------------------------------------------------------------------------
    async def complete(self, job: Job, result: Result):
        """SET the result, wake the API, then XACK + XDEL: the entry is released only once the
        answer is stored. Retried while Redis is down, for up to redis_outage_s past the deadline."""
        try:
            await self._complete(job, result)
        finally:
            self.held.pop(job.id, None)

    async def _complete(self, job: Job, result: Result):
        give_up = max(job.deadline, time.time()) + self.settings.redis_outage_s
        delay = 0.05
        while True:
            try:
                pipe = self.r.pipeline(transaction=True)
                pipe.set(self.keys.result(job.id), result.dumps(), ex=self.settings.result_ttl_s)
                if job.reply:
                    pipe.publish(job.reply, job.id)
                if job.entry:
                    pipe.xack(job.stream, GROUP, job.entry)
                    pipe.xdel(job.stream, job.entry)
                await pipe.execute(raise_on_error=False)
                return
            except (RedisError, OSError) as e:
                if time.time() > give_up:
                    log.error("giving up on storing the result of %s: %s", job.id, e)
                    return
                await asyncio.sleep(delay)
                delay = min(1.0, delay * 2)

    async def _ack(self, stream: str, eid: str):
        pipe = self.r.pipeline(transaction=True)
        pipe.xack(stream, GROUP, eid)
        pipe.xdel(stream, eid)
        await pipe.execute(raise_on_error=False)

    async def _dead_letter(self, stream, eid, raw, job: Job | None, error: str):
        log.error("dead-letter %s %s: %s", stream, eid, error)
        self.metrics.dead_letters.inc()
        pipe = self.r.pipeline(transaction=True)
        pipe.xadd(self.keys.dead, {"job": raw, "error": error, "stream": stream, "entry": eid,
                                   "worker": self.consumer, "time": str(time.time())},
                  maxlen=DLQ_MAXLEN, approximate=True)
        if job is not None:
            res = Result(job.id, Outcome.DEAD_LETTER, f"request failed and was moved to the dead-letter stream "
                                                      f"{self.keys.dead!r}: {error}", worker=self.consumer)
            pipe.set(self.keys.result(job.id), res.dumps(), ex=self.settings.result_ttl_s)
            if job.reply:
                pipe.publish(job.reply, job.id)
        pipe.xack(stream, GROUP, eid)
        pipe.xdel(stream, eid)
        await pipe.execute(raise_on_error=False)

    # -- liveness ---------------------------------------------------------------------------------
    async def _heartbeat(self):
        hb = self.settings.heartbeat_s
        while not self._closed:
            try:
                info = self.hooks.status() if self.hooks else {"ready": True, "models": self.models}
                await self.r.set(self.keys.worker(self.consumer), json.dumps({**info, "time": time.time()}),
                                 px=int(max(3 * hb, 1.0) * 1000))
                await self.r.sadd(self.keys.workers, self.consumer)
                await self._refresh_ownership()
                if self.down:
                    log.warning("Redis reachable again")
                    self.down, self.back_at = False, time.monotonic()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as e:
                if not self.down:
                    log.warning("Redis unreachable (%s); finished results wait for it", e)
                self.down = True
            except Exception:
                log.exception("heartbeat failed")
            await asyncio.sleep(hb)

    async def _refresh_ownership(self):
        """Reset the idle time of the entries we hold and still own, so XAUTOCLAIM leaves them be."""
        held = {}
        # a draining worker runs no more of its backlog: let those entries idle out to other workers
        backlog = [] if self.draining else self.backlog
        for j in list(self.held.values()) + backlog:
            if j.entry:
                held.setdefault(j.stream, set()).add(j.entry)
        for s, ids in held.items():
            mine = await self.r.xpending_range(s, GROUP, "-", "+", 10000, consumername=self.consumer)
            ids = [i for i in (_s(p["message_id"]) for p in mine) if i in ids]
            if ids:
                await self.r.xclaim(s, GROUP, self.consumer, 0, ids, justid=True)


async def _stop(tasks):
    """Cancel background loops. redis-py can swallow a cancellation that lands inside a command
    (it resets the connection), so cancel again if one is still running; loops also check _closed."""
    for _ in range(3):
        tasks = [t for t in tasks if not t.done()]
        if not tasks:
            return
        for t in tasks:
            t.cancel()
        await asyncio.wait(tasks, timeout=1.0)


def _by_stream(resp):
    """XREADGROUP's reply as [(stream, [(id, fields)])] (RESP2 list or RESP3 dict shape)."""
    if not resp:
        return []
    if isinstance(resp, dict):
        return [(_s(k), v[0] if v and isinstance(v[0], list) else v) for k, v in resp.items()]
    return [(_s(stream), entries) for stream, entries in resp]


def _entries(resp):
    return [e for _, entries in _by_stream(resp) for e in entries]

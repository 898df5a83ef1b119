"""Slow and surplus clients: a deadline on the request head, a deadline and a rate floor on the body,
and a cap on open connections.

uvicorn bounds only the idle time between requests (`timeout_keep_alive`): a client that sends its
head or body a byte at a time, or opens a connection and sends half a head, holds the connection
(and, past the head, a request task) for as long as it likes. The head is read by the server before
the app sees anything, so its deadline lives in the connection protocol (`LimitedH11Protocol`); the
body is read by the app, so its deadline wraps `receive` (`BodyDeadline`) and a late body becomes a
408 before anything is queued.
"""
from __future__ import annotations

import asyncio
import functools
import json
import logging
import time

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .params import ApiError

log = logging.getLogger("stride.api")
BODY_GRACE_S = 1.0  # the rate floor starts after this: a client may take a moment to start its body
KEEP_ALIVE_S = 30  # uvicorn closes a connection idle this long between requests
MIN_WAIT_S = 0.01  # the shortest wait for a body chunk (see BodyDeadline)
FD_HEADROOM = 1024  # open files besides client connections: Redis pool, encode threads, logs, model files


def _raw_response(status: str, detail: str) -> bytes:
    """A whole JSON response with `Connection: close`, for when no request cycle can send one."""
    body = json.dumps({"detail": detail}).encode()
    head = [f"HTTP/1.1 {status}", "content-type: application/json", f"content-length: {len(body)}",
            "connection: close"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class LimitedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on the request head and a cap on open connections.

    The head timer runs whenever the connection owes us a request head: from `connection_made`, and
    after a response from the first byte the client sends (until then uvicorn's keep-alive timer
    rules the idle connection). It stops once h11 has parsed a head, which is when uvicorn starts the
    app; on expiry the client gets 408 and the connection is closed.

    A connection opened while `max_connections` others are open first evicts the one that has owed a
    head the longest (408, as at its deadline): slow or idle-before-a-request connections cannot
    crowd out clients that send requests. When none owes a head (all run requests or sit idle
    between them), its request is answered 503 + Retry-After and the connection is closed (after its
    head: a client reads an answer sent before its request as a reset)."""

    def __init__(self, *args, header_timeout_s: float, max_connections: int, retry_after_s: int, **kw):
        super().__init__(*args, **kw)
        self.header_timeout_s, self.max_connections, self.retry_after_s = header_timeout_s, max_connections, retry_after_s
        self.head_timer: asyncio.TimerHandle | None = None

    def _awaiting_head(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm(self):
        if self.head_timer is None:
            self.head_timer = self.loop.call_later(self.header_timeout_s, self._head_timeout)

    def _disarm(self):
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def connection_made(self, transport):
        super().connection_made(transport)
        if len(self.connections) > self.max_connections and not self._evict():
            self.app = self._refuse
        self._arm()

    def _evict(self) -> bool:
        """Close the connection owing a head the longest if the others (closing ones aside: they are
        counted until connection_lost) exceed the cap; False when none can go."""
        live = [c for c in self.connections if c is not self and not c.transport.is_closing()]
        if len(live) < self.max_connections:
            return True
        owing = [c for c in live if getattr(c, "head_timer", None) is not None]
        if not owing:
            return False
        min(owing, key=lambda c: c.head_timer.when())._close_owing("the server is at its connection limit")
        return True

    def data_received(self, data: bytes):
        if self._awaiting_head():  # the first byte of the next head (or of a body the app did not read)
            self._arm()
        super().data_received(data)

    def handle_events(self):
        super().handle_events()
        if not self._awaiting_head():  # a head was parsed and the app runs it: the body has its own deadline
            self._disarm()

    def on_response_complete(self):
        super().on_response_complete()
        # Bytes already in after the response (a pipelined partial head, or a body the app did not
        # read) are owed a head now; an idle connection is left to the keep-alive timer.
        if self._awaiting_head() and (self.conn.their_state is not h11.IDLE or self.conn.trailing_data[0]):
            self._arm()

    def connection_lost(self, exc):
        self._disarm()
        super().connection_lost(exc)

    def _head_timeout(self):
        self._close_owing(f"the request head (request line and headers) did not arrive within "
                          f"{self.header_timeout_s:g} s")

    def _close_owing(self, why: str):
        """408 (unless a response was started on this cycle) and close: the connection owes a head."""
        self._disarm()
        if self.transport.is_closing():
            return
        if self.conn.our_state is h11.IDLE:
            self.transport.write(_raw_response("408 Request Timeout", f"{why}; send the request at once"))
        log.info("closed a connection from %s that owed a request head: %s", self.client, why)
        self.transport.close()

    async def _refuse(self, scope, receive, send):
        body = json.dumps({"detail": f"too many open connections (at most {self.max_connections}); "
                                     f"retry in {self.retry_after_s} s"}).encode()
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"retry-after", str(self.retry_after_s).encode()), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class SlowBody(ApiError):
    def __init__(self, timeout_s: float, min_rate: int):
        floor = f" and at {min_rate} bytes/s or more after the first {BODY_GRACE_S:g} s" if min_rate else ""
        super().__init__(408, f"the request body arrived too slowly: it must be complete within {timeout_s:g} s"
                              f"{floor}; send it at once", "body", headers={"Connection": "close"})


class BodyDeadline:
    """The body of each request, read through `receive`, must be complete within `timeout_s` of the
    head and average `min_rate` bytes/s after BODY_GRACE_S (0: no floor); else SlowBody (408, and
    `Connection: close`: the rest of the body is never read). The handlers read the body before they
    queue anything, so a slow body costs no work. Once the body is in, `receive` is passed through
    untouched (the disconnect watch waits on it for as long as a request runs)."""

    def __init__(self, app, timeout_s: float, min_rate: int):
        self.app, self.timeout_s, self.min_rate = app, timeout_s, min_rate

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, seen, done = time.monotonic(), 0, False

        async def timed_receive():
            nonlocal seen, done
            if done:
                return await receive()
            # The next chunk is due by the deadline, or by when the average rate would drop below the floor.
            due = start + self.timeout_s
            if self.min_rate:
                due = min(due, start + BODY_GRACE_S + seen / self.min_rate)
            try:  # never a zero timeout: a chunk already in is read even when the app asks for it late
                msg = await asyncio.wait_for(receive(), max(MIN_WAIT_S, due - time.monotonic()))
            except asyncio.TimeoutError:
                raise SlowBody(self.timeout_s, self.min_rate) from None
            seen += len(msg.get("body", b""))
            done = msg["type"] != "http.request" or not msg.get("more_body", False)
            return msg

        await self.app(scope, timed_receive, send)


def server_options(settings) -> dict:
    """uvicorn options of `stride serve` (uvicorn.run or uvicorn.Config): the h11 protocol with the
    head deadline and the connection cap, the keep-alive timeout, and no WebSocket upgrade (the API
    has no WebSocket route, and an upgraded connection would leave the head timer behind)."""
    protocol = functools.partial(LimitedH11Protocol, header_timeout_s=settings.header_timeout_s,
                                 max_connections=settings.max_connections, retry_after_s=settings.retry_after_s)
    return {"http": protocol, "ws": "none", "timeout_keep_alive": KEEP_ALIVE_S}


def raise_open_files(max_connections: int):
    """Raise the soft limit on open files to cover the connection cap (Docker's default soft limit is
    1024, its hard limit far higher), as Go's runtime does at start; a cap the hard limit cannot
    cover would fail as errors in accept() and Redis instead of as 503s, so say so."""
    try:
        import resource
    except ImportError:  # not a Unix
        return
    needed = max_connections + FD_HEADROOM
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        soft = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning("open-file limit %d is below max_connections (%d) + %d: raise `ulimit -n` or lower "
                    "--max-connections", soft, max_connections, FD_HEADROOM)

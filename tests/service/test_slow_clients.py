"""Slow and surplus clients over raw sockets, against the uvicorn options of `stride serve`: a head or
body sent a byte at a time, a half-sent head, an idle connection, and connections past the cap.
Deadlines are set short here; a client that is never cut off would run into the socket timeouts
below, which are several times the deadlines."""
import asyncio
import json
import select
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import uvicorn
from hostile_api import settings
from service_fixtures import free_port, metric_value, read_response, wait_for

from stride_diffusion.service import cli
from stride_diffusion.service.app import create_app
from stride_diffusion.service.http_limits import FD_HEADROOM, KEEP_ALIVE_S, LimitedH11Protocol, server_options

HEAD_S, BODY_S = 1.0, 1.5
SLACK_S = 5.0  # far below KEEP_ALIVE_S and the body deadline of the rate-floor server
BODY = b'{"class_label": 3, "steps": 2, "format": "json"}'


class Server:
    """create_app under uvicorn with `stride serve`'s options (server_options), on a thread."""

    def __init__(self, **kw):
        self.settings = settings(**kw)
        self.port = free_port()
        self.app = create_app(self.settings)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                **server_options(self.settings))
        self.server = uvicorn.Server(config)
        loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=loop.run_until_complete, args=(self.server.serve(),), daemon=True)
        self.thread.start()
        wait_for(lambda: httpx.get(self.url + "/readyz").status_code == 200, 30, "the API to be ready", 0.1)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(15)


@pytest.fixture(scope="module")
def srv():
    """Short head and body deadlines, no rate floor."""
    s = Server(header_timeout_s=HEAD_S, body_timeout_s=BODY_S, body_min_rate=0)
    yield s
    s.stop()


def head(path="/generate", length: int | None = None, method="POST") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(BODY) if length is None else length}\r\n\r\n").encode()


def read_until_closed(s: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes; TimeoutError if it keeps the connection."""
    s.settimeout(timeout)
    data = b""
    try:
        while part := s.recv(65536):
            data += part
    except ConnectionResetError:
        pass
    return data


def trickle(s: socket.socket, data: bytes, interval: float = 1.0, limit: float = 30.0) -> bytes:
    """Send `data` a byte per `interval` until the server answers or closes (what it sent), or
    TimeoutError after `limit` seconds of holding on."""
    end = time.monotonic() + limit
    for i in range(len(data)):
        try:
            s.sendall(data[i:i + 1])
        except (BrokenPipeError, ConnectionResetError):
            break
        if select.select([s], [], [], interval)[0]:
            break
        if time.monotonic() > end:
            raise TimeoutError(f"still connected after {limit} s, {i + 1} bytes sent")
    return read_until_closed(s, SLACK_S)


def status(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


def detail(reply: bytes) -> str:
    body = json.loads(reply.partition(b"\r\n\r\n")[2])
    return body["detail"] if "detail" in body else body["error"]["message"]


def test_a_head_sent_a_byte_per_second_is_cut_off_with_408(srv):
    reply = trickle(srv.connect(), head() + BODY, limit=HEAD_S + SLACK_S)
    assert status(reply) == 408 and "request head" in detail(reply), reply


@pytest.mark.parametrize("sent", [b"", b"POST /generate HTTP/1.1\r\nHost: x\r\n"], ids=["nothing", "half a head"])
def test_an_idle_connection_owing_a_head_is_closed(srv, sent):
    s = srv.connect()
    s.sendall(sent)
    reply = read_until_closed(s, HEAD_S + SLACK_S)
    assert status(reply) == 408, reply


def test_a_half_head_after_a_response_is_closed(srv):
    """Between requests uvicorn's keep-alive timer rules, but the first byte of the next request
    cancels it: from then on the head deadline does."""
    s = srv.connect()
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status(read_response(s)) == 200
    s.sendall(b"GET /heal")
    assert status(read_until_closed(s, HEAD_S + SLACK_S)) == 408


def test_a_body_the_app_did_not_read_must_still_end_in_time(srv):
    """GET /healthz answers without reading its body; the rest of that body is owed with the next head."""
    s = srv.connect()
    s.sendall(head("/healthz", 100, "GET") + b"0123456789")
    assert status(read_response(s)) == 200
    assert read_until_closed(s, HEAD_S + SLACK_S) == b""  # closed, no second answer to a request never made


def test_a_body_sent_a_byte_per_second_is_408_and_nothing_is_queued(srv, monkeypatch):
    svc = srv.app.state.service
    queued = []

    async def submit(job, _submit=svc.queue.submit):
        queued.append(job)
        return await _submit(job)

    monkeypatch.setattr(svc.queue, "submit", submit)
    s = srv.connect()
    s.sendall(head())
    reply = trickle(s, BODY, limit=BODY_S + SLACK_S)
    assert status(reply) == 408, reply
    assert b"connection: close" in reply.lower() and "too slowly" in detail(reply)
    assert queued == []
    assert metric_value(httpx.get(srv.url + "/metrics").text, "stride_rejected_total", reason="slow_client") == 1
    assert httpx.post(srv.url + "/generate", content=BODY, headers={"Content-Type": "application/json"}).status_code == 200
    assert len(queued) == 1


def test_normal_requests_are_served_while_slow_clients_hold_on(srv):
    replies = {}

    def slow(name, s, data):
        replies[name] = trickle(s, data, limit=BODY_S + SLACK_S)

    body_conn = srv.connect()
    body_conn.sendall(head())
    threads = [threading.Thread(target=slow, args=("head", srv.connect(), head() + BODY)),
               threading.Thread(target=slow, args=("body", body_conn, BODY))]
    for t in threads:
        t.start()
    r = httpx.post(srv.url + "/generate", content=BODY, headers={"Content-Type": "application/json"}, timeout=10)
    assert r.status_code == 200 and r.json()["class_label"] == 3
    for t in threads:
        t.join()
    assert {k: status(v) for k, v in replies.items()} == {"head": 408, "body": 408}


def test_the_rate_floor_cuts_a_slow_body_long_before_its_deadline():
    srv = Server(header_timeout_s=10, body_timeout_s=60, body_min_rate=100)
    try:
        s = srv.connect()
        s.sendall(head("/v1/images/generations"))
        reply = trickle(s, BODY, limit=SLACK_S)  # the 60 s deadline alone would hold it past this
        assert status(reply) == 408 and "100 bytes/s" in detail(reply), reply
        assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
    finally:
        srv.stop()


def test_at_the_cap_a_new_client_evicts_the_connection_owing_a_head_the_longest():
    srv = Server(max_connections=3)
    slow = []
    try:
        for _ in range(3):
            slow.append(srv.connect())
            slow[-1].sendall(b"POST /generate HTTP/1.1\r\n")
            time.sleep(0.05)  # an order to evict by
        r = httpx.post(srv.url + "/generate", content=BODY, headers={"Content-Type": "application/json"})
        assert r.status_code == 200
        reply = read_until_closed(slow[0], SLACK_S)
        assert status(reply) == 408 and "connection limit" in detail(reply)
        assert select.select(slow[1:], [], [], 0.2)[0] == []  # the younger ones are still waited for
    finally:
        for s in slow:
            s.close()
        srv.stop()


def test_past_the_cap_with_no_connection_owing_a_head_requests_get_503_with_retry_after():
    srv = Server(max_connections=3, retry_after_s=2)
    held = [srv.connect() for _ in range(3)]
    try:
        for s in held:  # idle between requests: they count, owe no head, and are not evicted
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert status(read_response(s)) == 200
        r = httpx.get(srv.url + "/healthz")
        assert r.status_code == 503 and r.headers["retry-after"] == "2" and "at most 3" in r.json()["detail"]
        held.pop().close()
        wait_for(lambda: httpx.get(srv.url + "/healthz").status_code == 200, 10, "a freed slot")
    finally:
        for s in held:
            s.close()
        srv.stop()


def test_stride_serve_runs_uvicorn_with_the_limits(monkeypatch):
    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(kw))
    s = settings(header_timeout_s=3, max_connections=7, warmup=False)
    cli.run_api(s, "warning")
    proto = seen["http"]
    assert proto.func is LimitedH11Protocol and seen["timeout_keep_alive"] == KEEP_ALIVE_S
    assert (proto.keywords["header_timeout_s"], proto.keywords["max_connections"]) == (3, 7)


def test_the_open_file_limit_is_raised_to_cover_the_cap():
    """In a child process: a soft limit of 100 (Docker's default is 1024) is raised to cap + headroom."""
    code = ("import resource; from stride_diffusion.service.http_limits import raise_open_files; "
            "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]; "
            "resource.setrlimit(resource.RLIMIT_NOFILE, (100, hard)); raise_open_files(200); "
            "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0], hard)")
    soft, hard = map(int, subprocess.check_output([sys.executable, "-c", code], text=True).split())
    assert soft == min(200 + FD_HEADROOM, hard) and soft > 100

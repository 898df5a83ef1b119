"""Bodies are bounded while they stream: a chunked or declared body past the limit is 413 without
reading the rest."""
import select
import socket

import httpx
from hostile_api import STEPS, metrics, post, settings  # noqa: F401
from service_fixtures import read_response

from stride_diffusion.service.limits import MAX_BODY


# -- 2. bodies bounded while they stream ---------------------------------------------------------------
def _raw(api, head: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", api.port), timeout=10)
    s.sendall(head)
    return s


def _status(data: bytes) -> int:
    return int(data.split(b" ", 2)[1])


def test_chunked_body_past_the_limit_is_413_without_reading_the_rest(api):
    """100 MB offered in 64 KiB chunks: the server answers 413 and closes after about the limit, so the
    client cannot push more than the limit plus what the kernel's socket buffers absorb."""
    s = _raw(api, b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")
    chunk = b"%x\r\n" % 65536 + b" " * 65536 + b"\r\n"
    sent, reply = 0, b""
    try:
        while sent < 100 * 2 ** 20:
            if select.select([s], [], [], 0)[0]:
                break
            s.sendall(chunk)
            sent += 65536
    except (BrokenPipeError, ConnectionResetError):
        pass
    try:
        while True:
            part = s.recv(65536)
            if not part:
                break
            reply += part
    except (TimeoutError, ConnectionResetError):
        pass
    s.close()
    assert reply and _status(reply) == 413, reply[:200]
    assert sent < 16 * 2 ** 20, f"the client pushed {sent} bytes: the server kept reading"
    assert httpx.get(api.url + "/healthz").status_code == 200


def test_declared_length_past_the_limit_is_413_before_any_body(api):
    s = _raw(api, b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % (100 * 2 ** 20))
    reply = read_response(s)  # answered although not one byte of the body was sent
    s.close()
    assert _status(reply) == 413 and str(MAX_BODY).encode() in reply



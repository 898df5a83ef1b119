"""ASGI guards around the whole app: a body bound enforced while the body streams, and a last-resort
handler that turns any unexpected error into a JSON 500 with a request id.

Pure ASGI (no BaseHTTPMiddleware): the receive wrapper sees every chunk as the server reads it, so a
chunked upload past the limit is refused after `limit` bytes, never read whole; the server then closes
the connection instead of draining the rest.
"""
from __future__ import annotations

import json
import logging
import uuid

from .params import ApiError

log = logging.getLogger("stride.api")
MAX_BODY = 64 * 1024
DETAIL_MAX = 500  # characters of an error's message, and 200 of the field it names: what input they quote is cut


def clip(text: str | None, limit: int = DETAIL_MAX) -> str | None:
    """An error's text cut to `limit` characters: a 60 KB key or value is not echoed back whole."""
    if text is None or len(text) <= limit:
        return text
    return text[:limit - 30] + f"... ({len(text)} characters)"


class BodyTooLarge(ApiError):
    def __init__(self, limit: int):
        super().__init__(413, f"body larger than {limit} bytes; the API takes a few small JSON fields", "body", limit)


def request_id(scope) -> str:
    """The id of this request (the job id too): set once by `Guard`, read by the handlers."""
    return scope.setdefault("state", {}).setdefault("request_id", uuid.uuid4().hex)


class Guard:
    """`limit` bytes per request body; an exception that escapes the app becomes a JSON 500 (once
    logged, counted by `on_error`). FastAPI's exception handlers answer ApiError (BodyTooLarge too)."""

    def __init__(self, app, limit: int = MAX_BODY, on_error=None, new_id=None):
        self.app, self.limit, self.on_error, self.new_id = app, limit, on_error, new_id

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = scope.setdefault("state", {})["request_id"] = self.new_id() if self.new_id else uuid.uuid4().hex
        started = False
        seen = 0
        length = dict(scope.get("headers") or []).get(b"content-length", b"")

        async def bounded_receive():
            nonlocal seen
            if length.isdigit() and int(length) > self.limit:  # refuse before reading a byte of it
                raise BodyTooLarge(self.limit)
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(self.limit)
            return msg

        async def tracked_send(msg):
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, bounded_receive, tracked_send)
        except Exception as e:
            if not started:  # FastAPI's handler for Exception answers first; this covers what escapes it
                log_error(scope, e)
                if self.on_error:
                    self.on_error()
                await send_500(send, rid)


def log_error(scope, e: BaseException):
    log.error("request %s %s %s failed", request_id(scope), scope.get("method"), scope.get("path"), exc_info=e)


def error_body(rid: str) -> dict:
    return {"detail": "internal error; the server logged it under this request id", "request_id": rid}


async def send_500(send, rid: str):
    body = json.dumps(error_body(rid)).encode()
    await send({"type": "http.response.start", "status": 500,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"x-stride-request-id", rid.encode())]})
    await send({"type": "http.response.body", "body": body})

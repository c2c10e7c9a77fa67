"""What stands between the network and the routes: body limits, body deadlines, authentication
before the body, a limit on failed authentications, and error bodies that cannot fail.

`Guard` is pure ASGI (it sees each request before FastAPI reads a byte of its body):
- write and admin requests (POST /v1/events, /v1/admin/...) are authenticated from the
  `X-API-Key` header first; a refused request is answered without reading its body. A client
  address with `auth_failures` failures within `auth_window_s` gets 429 with Retry-After on
  every write and admin request until the oldest failure leaves the window (its key is not
  even checked: a lock that still answered right keys would let the guessing go on).
- a body larger than `max_body_bytes` (`max_events_body_bytes` for POST /v1/events) is refused
  with 413: from its Content-Length before it is read, or, sent chunked, as soon as the bytes
  received pass the limit.
- a body not complete `body_timeout_s` after the request started gets 408.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import time
from collections import deque
from typing import Any

from recfb.serving.config import ServeConfig

MAX_CLIENTS = 10_000  # failure records kept; beyond, the expired ones are dropped


def key_matches(given: str | bytes | None, expected: str) -> bool:
    """Constant-time comparison over bytes: any header value (non-ASCII too) is just wrong."""
    if given is None:
        return False
    if isinstance(given, str):
        given = given.encode("utf-8", "surrogatepass")
    return hmac.compare_digest(given, expected.encode("utf-8", "surrogatepass"))


def protected(method: str, path: str) -> bool:
    """The requests that need the key: writes and the admin routes."""
    return path.startswith("/v1/admin") or (path.rstrip("/") == "/v1/events" and method != "GET")


class AuthFailures:
    """Failed authentications per client address within a sliding window."""

    def __init__(self, limit: int, window_s: float) -> None:
        self.limit, self.window = limit, window_s
        self.seen: dict[str, deque[float]] = {}

    def _recent(self, client: str, now: float) -> deque[float]:
        times = self.seen.get(client, deque())
        while times and times[0] <= now - self.window:
            times.popleft()
        return times

    def retry_after(self, client: str, now: float) -> int | None:
        """Seconds until this client may try again, or None when it is not locked."""
        times = self._recent(client, now)
        if len(times) < self.limit:
            return None
        return max(1, math.ceil(times[-self.limit] + self.window - now))

    def fail(self, client: str, now: float) -> None:
        if client not in self.seen and len(self.seen) >= MAX_CLIENTS:
            for other in list(self.seen):
                if not self._recent(other, now):
                    del self.seen[other]
            if len(self.seen) >= MAX_CLIENTS:  # all live: forget the oldest-seen one
                del self.seen[next(iter(self.seen))]
        times = self._recent(client, now)
        times.append(now)
        while len(times) > self.limit:  # only the last `limit` decide the lock
            times.popleft()
        self.seen[client] = times


class Guard:
    """Pure-ASGI limits and authentication in front of the app (see the module docstring)."""

    def __init__(self, app: Any, cfg: ServeConfig, api_key: str | None) -> None:
        self.app, self.cfg, self.api_key = app, cfg, api_key
        self.failures = AuthFailures(cfg.auth_failures, cfg.auth_window_s)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        if protected(method, path) and not await self._authenticated(scope, send):
            return
        limit = (
            self.cfg.max_events_body_bytes
            if path.rstrip("/") == "/v1/events"
            else self.cfg.max_body_bytes
        )
        length = header(scope, b"content-length")
        if length is not None:
            if not length.isdigit():
                await reply(send, 400, "Content-Length is not a number of bytes", close=True)
                return
            if int(length) > limit:
                await reply(send, 413, f"request body over {limit} bytes", close=True)
                return
        state = {"app_started": False, "answered": False, "bytes": 0, "done": False}
        deadline = time.monotonic() + self.cfg.body_timeout_s

        async def refuse(status: int, detail: str) -> dict:
            """Answer for the app (unless it has begun its own answer) and tell it the client
            is gone: FastAPI turns errors raised from `receive` into 400s of its own."""
            if not state["app_started"] and not state["answered"]:
                state["answered"] = True
                await reply(send, status, detail, close=True)
            return {"type": "http.disconnect"}

        async def limited_receive() -> dict:
            if state["answered"]:
                return {"type": "http.disconnect"}
            if state["done"]:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0))
            except TimeoutError:
                return await refuse(
                    408, f"request body not received within {self.cfg.body_timeout_s:g} s"
                )
            if message["type"] == "http.request":
                state["bytes"] += len(message.get("body", b""))
                if state["bytes"] > limit:
                    return await refuse(413, f"request body over {limit} bytes")
                state["done"] = not message.get("more_body", False)
            return message

        async def guarded_send(message: dict) -> None:
            if state["answered"]:
                return  # the guard has answered: the app's late answer goes nowhere
            if message["type"] == "http.response.start":
                state["app_started"] = True
            await send(message)

        scope["recfb.guarded"] = time.perf_counter()  # the guard's stage ends (telemetry)
        await self.app(scope, limited_receive, guarded_send)

    async def _authenticated(self, scope: dict, send: Any) -> bool:
        """Check the key before the body; answer and return False when it is refused."""
        if not self.api_key:
            await reply(
                send, 403, "writes are disabled: the server has no API key configured", close=True
            )
            return False
        client = (scope.get("client") or ("unknown", 0))[0]
        now = time.monotonic()
        wait = self.failures.retry_after(client, now)
        if wait is not None:
            await reply(
                send,
                429,
                f"too many failed authentications from this address; retry in {wait} s",
                close=True,
                headers=[(b"retry-after", str(wait).encode())],
            )
            return False
        if key_matches(header_bytes(scope, b"x-api-key"), self.api_key):
            return True
        self.failures.fail(client, now)
        await reply(send, 401, "missing or wrong X-API-Key header", close=True)
        return False


def header_bytes(scope: dict, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value
    return None


def header(scope: dict, name: bytes) -> str | None:
    value = header_bytes(scope, name)
    return None if value is None else value.decode("latin-1").strip()


async def reply(
    send: Any, status: int, detail: str, close: bool = False, headers: list | None = None
) -> None:
    """A JSON error answered by the guard itself ({"detail": ...}, like FastAPI's)."""
    body = json.dumps({"detail": detail}).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:  # the unread body stays on the connection: it cannot carry another request
        head.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": head + (headers or [])})
    await send({"type": "http.response.body", "body": body})

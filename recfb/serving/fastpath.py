"""The plain GET /v1/users/{user_id}/recommendations answered without FastAPI's per-request
routing and parameter solving (a few hundred microseconds of a ~1.5 ms request).

Only a request whose every part is unambiguous is taken: method GET, no root path, a user id
of 1-256 characters without '/', and a query string that is empty or exactly `k=<digits>`
with 1 <= k <= max_k. Anything else (exclude, category, other keys, a bad k) goes on to the
FastAPI route, which validates it and answers errors in its own shape. The answer is built by
the route's own functions (`recommend_one`, `respond`): the same bytes and headers. A failure
inside falls back to the route too, before anything was sent, so errors are FastAPI's.
"""

from __future__ import annotations

import re
import time
from typing import Any

from recfb.serving.retrieval import Timings
from recfb.serving.routes.recommendations import recommend_one, respond
from recfb.serving.service import Service

PATH = re.compile(r"/v1/users/([^/]+)/recommendations")
QUERY = re.compile(rb"k=([1-9][0-9]{0,5})")


class FastRecommendations:
    """Pure-ASGI front of the recommendations route (see the module docstring)."""

    def __init__(self, app: Any, service: Service, route: Any) -> None:
        self.app, self.service, self.route = app, service, route

    def _plain(self, scope: dict) -> tuple[str, int] | None:
        """(user id, k) of a request the fast path may answer, else None."""
        if scope["type"] != "http" or scope["method"] != "GET" or scope.get("root_path"):
            return None
        match = PATH.fullmatch(scope["path"])
        if match is None or len(match.group(1)) > 256:
            return None
        query = scope.get("query_string", b"")
        cfg = self.service.cfg
        if not query:
            return match.group(1), cfg.default_k
        k = QUERY.fullmatch(query)
        if k is None or int(k.group(1)) > cfg.max_k:
            return None
        return match.group(1), int(k.group(1))

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        plain = self._plain(scope)
        served = self.service.current
        if plain is None or served is None:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        user_id, k = plain
        timings = Timings()
        try:
            body = recommend_one(self.service, served, user_id, k, [], None, timings)
        except Exception:  # noqa: BLE001 - the route answers it, in FastAPI's shape
            await self.app(scope, receive, send)
            return
        scope["route"] = self.route  # the latency histogram's route label
        response = respond(self.service, body, timings, scope, started)
        await response(scope, receive, send)

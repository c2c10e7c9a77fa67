"""The policies a loop can serve, behind one small interface.

`served` policies answer through the service's own code: in process, `recommend_one` (what
GET /v1/users/{id}/recommendations runs) and `accept_events` (what POST /v1/events runs) on
a `Service`; over HTTP, the same routes of a real server. A retrain swaps the new bundle in
as the alias follower does (`Service.load`; over HTTP, POST /v1/admin/bundle).
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from recfb.errors import RecfbError
from recfb.serving.config import ServeConfig
from recfb.serving.schemas import EventBatch
from recfb.serving.service import Service

API_KEY = "recfb-loop"
_POST_CHUNK = 5000  # events per POST (below serve.max_events_per_post)


class Transport:
    """The service a policy posts to and (when served) asks: in process or over HTTP."""

    def __init__(self, cfg: ServeConfig) -> None:
        self.cfg = cfg

    def post(self, events: list[dict]) -> int:
        raise NotImplementedError

    def recommend(self, user_ids: list[str], k: int, now_ms: int) -> list[list[str]]:
        raise NotImplementedError

    def load(self, bundle: Path) -> None:
        raise NotImplementedError

    def refresh_rates(self, now_ms: int) -> Any:
        """The served bundle's online rates recomputed at `now_ms` (None without rates)."""
        return None

    def close(self) -> None:
        pass


class InProcess(Transport):
    """A `Service` in this process, called through the routes' own functions."""

    def __init__(self, cfg: ServeConfig) -> None:
        super().__init__(cfg)
        self.service = Service(cfg, API_KEY)

    def post(self, events: list[dict]) -> int:
        from recfb.serving.routes.events import accept_events

        new = 0
        for lo in range(0, len(events), _POST_CHUNK):
            batch = EventBatch.model_validate({"events": events[lo : lo + _POST_CHUNK]})
            new += accept_events(self.service, batch)["new"]
        return new

    def recommend(self, user_ids: list[str], k: int, now_ms: int) -> list[list[str]]:
        from recfb.serving.retrieval import Timings
        from recfb.serving.routes.recommendations import recommend_one

        served = self.service.bundle()
        out = []
        for user in user_ids:
            body = recommend_one(self.service, served, user, k, [], None, Timings(), now_ms)
            out.append([it["item_id"] for it in body["items"]])
        return out

    def load(self, bundle: Path) -> None:
        self.service.load(bundle)

    def refresh_rates(self, now_ms: int) -> Any:
        served = self.service.current
        if served is None or served.rates is None:
            return None
        return served.rates.refresh(self.service.log, now_ms)

    def close(self) -> None:
        self.service.log.close()


class Http(Transport):
    """A real uvicorn server on a free local port, asked over HTTP (slower; tests and demos).

    Fold-in and rates use the server's wall clock here, not the simulated one."""

    def __init__(self, cfg: ServeConfig) -> None:
        import httpx
        import uvicorn

        from recfb.serving.app import create_app

        super().__init__(cfg)
        app = create_app(cfg, API_KEY)
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RecfbError("loop: the HTTP server did not start within 30 s")
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.client = httpx.Client(
            base_url=f"http://127.0.0.1:{port}", headers={"X-API-Key": API_KEY}, timeout=60
        )

    def post(self, events: list[dict]) -> int:
        new = 0
        for lo in range(0, len(events), _POST_CHUNK):
            r = self.client.post("/v1/events", json={"events": events[lo : lo + _POST_CHUNK]})
            if r.status_code != 200:
                raise RecfbError(f"loop: POST /v1/events answered {r.status_code}: {r.text[:300]}")
            new += r.json()["new"]
        return new

    def recommend(self, user_ids: list[str], k: int, now_ms: int) -> list[list[str]]:
        out = []
        for user in user_ids:
            r = self.client.get(f"/v1/users/{user}/recommendations", params={"k": k})
            if r.status_code != 200:
                raise RecfbError(f"loop: recommendations answered {r.status_code}: {r.text[:300]}")
            out.append([it["item_id"] for it in r.json()["items"]])
        return out

    def load(self, bundle: Path) -> None:
        target = Path(self.cfg.models_dir) / bundle.name
        if not target.exists():
            shutil.copytree(bundle, target)
        r = self.client.post("/v1/admin/bundle", json={"path": str(target)})
        if r.status_code != 202:
            raise RecfbError(f"loop: bundle swap answered {r.status_code}: {r.text[:300]}")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            status = self.client.get("/v1/admin/bundle").json()
            if status["loading"] is None:
                if status["last_error"]:
                    raise RecfbError(f"loop: bundle swap failed: {status['last_error']}")
                if status["path"] and Path(status["path"]).resolve() == target.resolve():
                    return
            time.sleep(0.1)
        raise RecfbError("loop: the bundle swap did not finish within 120 s")

    def close(self) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(timeout=10)


def rows_of(lists: list[list[str]], item_row: dict[str, int], k: int) -> np.ndarray:
    """Item ids -> item rows of the world, padded with -1 (a shorter list, an unknown id)."""
    out = np.full((len(lists), k), -1, dtype=np.int64)
    for i, items in enumerate(lists):
        rows = [item_row.get(x, -1) for x in items[:k]]
        out[i, : len(rows)] = rows
    return out

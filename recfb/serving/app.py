"""The retrieval HTTP API (FastAPI): recommendations, similar items, events, hot swap, metrics.

(No `from __future__ import annotations` here: FastAPI reads the endpoint annotations, which
refer to the config captured in `create_app`, at run time.)

Every request reads the current bundle once, so a swap (an atomic reference assignment) never
mixes two versions inside one answer and never fails a request in flight. Events are committed
to the durable log before the 2xx. Write and admin endpoints need the `X-API-Key` header.
"""

import gc
import hmac
import json
import logging
import math
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field

from recfb.index import load_bundle
from recfb.serving.config import ServeConfig
from recfb.serving.eventlog import EventLog
from recfb.serving.retrieval import ServingBundle, Timings, rerank

log = logging.getLogger("recfb.serving")
ID = Field(min_length=1, max_length=256)


# --- request and response schemas ---------------------------------------------------------
class EventIn(BaseModel):
    """One event in the canonical schema; `ts` is ISO 8601 or epoch seconds (default: now)."""

    model_config = ConfigDict(extra="forbid")
    event_id: str = ID
    user_id: str = ID
    item_id: str = ID
    event: str = Field(min_length=1, max_length=64)
    ts: datetime | None = None
    value: float | None = Field(None, allow_inf_nan=False)
    order_id: str | None = Field(None, max_length=256)


class EventBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    events: list[EventIn] = Field(min_length=1)


class EventsAccepted(BaseModel):
    accepted: int = Field(description="events in the request, all durably logged")
    new: int = Field(description="of which not seen before (the rest repeated an event_id)")


class ScoredItem(BaseModel):
    item_id: str
    score: float


class Recommendations(BaseModel):
    user_id: str
    items: list[ScoredItem]
    source: str = Field(
        description="model | session (fold-in of a new user) | popularity | two_stage (the "
        "bundle's ranker over candidates from history, cascade, ANN and trending)"
    )
    bundle_version: str


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_ids: list[str] = Field(min_length=1)
    k: int | None = Field(None, ge=1)
    exclude: list[str] = Field(default_factory=list)
    category: str | None = None


class BatchRecommendations(BaseModel):
    results: list[Recommendations]
    bundle_version: str


class SimilarItems(BaseModel):
    item_id: str
    items: list[ScoredItem]
    bundle_version: str


class ItemRates(BaseModel):
    item_id: str
    as_of: str
    windows_days: dict[str, float]
    clicks: int
    purchases: float = Field(description="attributed: a purchase may be shared among clicks")
    cvr_naive: float | None
    cvr_corrected: float | None
    purchases_in_window: int | None = None
    refunds: int | None = None
    refund_naive: float | None = None
    refund_corrected: float | None = None
    netcvr_naive: float | None
    netcvr_corrected: float | None
    conversion_delay: dict[str, Any]
    bundle_version: str


class SwapRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(min_length=1, description="bundle directory to load and swap in")


# --- metrics ---------------------------------------------------------------------------------
class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        buckets = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
        self.latency = Histogram(
            "recfb_request_seconds",
            "request latency by route",
            ["route", "method", "status"],
            buckets=buckets,
            registry=self.registry,
        )
        self.stage = Histogram(
            "recfb_stage_seconds",
            "time per stage of a recommendation request",
            ["stage"],
            buckets=buckets,
            registry=self.registry,
        )
        self.events = Counter(
            "recfb_events_ingested", "events durably logged", ["kind"], registry=self.registry
        )
        self.bundle = Gauge(
            "recfb_bundle_info", "the bundle being served", ["version"], registry=self.registry
        )


# --- the service -----------------------------------------------------------------------------
class Service:
    """Holds the current bundle and the event log; swaps bundles in the background."""

    def __init__(self, cfg: ServeConfig, api_key: str | None) -> None:
        self.cfg = cfg
        self.api_key = api_key
        self.metrics = Metrics()
        self.log = EventLog(cfg.event_log, cfg.synchronous)
        self.current: ServingBundle | None = None
        self.loading: str | None = None
        self.last_error: str | None = None
        self._swap_lock = threading.Lock()

    def load(self, path: str | Path) -> ServingBundle:
        started = time.perf_counter()
        served = ServingBundle(load_bundle(path), self.cfg)
        if served.rates is not None:
            served.rates.refresh(self.log)
        old = self.current
        self.current = served  # the swap: one reference assignment
        # a bundle is millions of long-lived objects (id maps); a full GC pass over them
        # stalls every request for ~100 ms at 1M items, so they leave the collector's view
        # (refcounting still frees a swapped-out bundle; unfreeze lets a cycle go too)
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        if old is not None:
            self.metrics.bundle.remove(old.version)
        self.metrics.bundle.labels(version=served.version).set(1)
        log.info(
            "bundle loaded",
            extra={"bundle": served.version, "seconds": round(time.perf_counter() - started, 3)},
        )
        return served

    def swap_in_background(self, path: str) -> bool:
        """Start loading `path`; False if a load is already running."""
        if not self._swap_lock.acquire(blocking=False):
            return False
        self.loading, self.last_error = path, None

        def work() -> None:
            try:
                self.load(path)
            except Exception as exc:  # reported on GET /v1/admin/bundle, old bundle kept
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.error("bundle swap failed", extra={"path": path, "error": self.last_error})
            finally:
                self.loading = None
                self._swap_lock.release()

        threading.Thread(target=work, name="bundle-swap", daemon=True).start()
        return True

    def bundle(self) -> ServingBundle:
        served = self.current
        if served is None:
            raise HTTPException(503, "no bundle loaded yet (see GET /readyz)")
        return served


class AliasFollower:
    """Polls the registry alias and swaps to the bundle of the version that holds it."""

    def __init__(self, service: Service, model: str, alias: str, poll_s: float) -> None:
        from recfb import tracking

        self.service, self.model, self.alias, self.poll_s = service, model, alias, poll_s
        self.tracking_uri = tracking.configure()  # resolved once, not on every poll
        self.version: str | None = None
        self.error: str | None = None

    def lookup(self) -> tuple[str, str] | None:
        """(version, bundle path) holding the alias now; None (and `error`) when unknown."""
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        try:
            mv = MlflowClient(tracking_uri=self.tracking_uri).get_model_version_by_alias(
                self.model, self.alias
            )
        except MlflowException as exc:
            self.error = f"{self.model}@{self.alias}: {exc}"
            return None
        self.error = None
        return str(mv.version), mv.source

    def poll_once(self) -> None:
        found = self.lookup()
        if found is None:
            return
        version, source = found
        current = self.service.current
        if version != self.version or current is None:
            if (
                current is not None
                and Path(source).resolve() == Path(current.bundle.path).resolve()
            ):
                self.version = version
                return
            if self.service.swap_in_background(source):
                log.info(
                    "alias moved", extra={"alias": self.alias, "version": version, "path": source}
                )
                self.version = version

    def run(self) -> None:
        while True:
            time.sleep(self.poll_s)
            try:
                self.poll_once()
            except Exception as exc:  # keep following; the error shows on /v1/admin/bundle
                self.error = f"{type(exc).__name__}: {exc}"


def newest_bundle(models_dir: str | Path) -> Path | None:
    """The most recently created bundle in the model store (by manifest created_at)."""
    found = []
    for manifest in Path(models_dir).glob("*/manifest.json"):
        try:
            found.append((json.loads(manifest.read_text())["created_at"], manifest.parent))
        except (OSError, ValueError, KeyError):
            continue
    return max(found)[1] if found else None


def _json(data: Any, status: int = 200) -> Response:
    return Response(json.dumps(data).encode(), status_code=status, media_type="application/json")


def create_app(cfg: ServeConfig, api_key: str | None = None) -> FastAPI:
    """The ASGI app; the bundle is loaded before the server accepts connections."""
    service = Service(cfg, api_key)
    app = FastAPI(
        title="recfb retrieval API",
        version="1",
        description="Recommendations from a recfb model bundle, corrected by online events.",
    )
    app.state.service = service
    follower = None
    path = cfg.bundle
    if cfg.follow.model:
        follower = AliasFollower(service, cfg.follow.model, cfg.follow.alias, cfg.follow.poll_s)
        found = follower.lookup() if path is None else None
        if found is not None:
            follower.version, path = found
        threading.Thread(target=follower.run, name="alias-follower", daemon=True).start()
    path = path or newest_bundle(cfg.models_dir)
    if path is not None:
        service.load(path)
    else:
        log.warning("no bundle found; not ready", extra={"models_dir": cfg.models_dir})

    def require_key(x_api_key: Annotated[str | None, Header()] = None) -> None:
        if not service.api_key:
            raise HTTPException(403, "writes are disabled: the server has no API key configured")
        if x_api_key is None or not hmac.compare_digest(x_api_key, service.api_key):
            raise HTTPException(401, "missing or wrong X-API-Key header")

    app.add_middleware(TimingMiddleware, metrics=service.metrics)

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"])
    async def readyz() -> Response:
        served = service.current
        if served is None:
            return _json({"ready": False, "reason": "no bundle loaded"}, 503)
        return _json({"ready": True, "bundle_version": served.version})

    @app.get("/metrics", tags=["ops"])
    def metrics() -> Response:
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def recommend_one(
        served: ServingBundle,
        user_id: str,
        k: int,
        exclude: list[str],
        category: str | None,
        timings: Timings,
    ) -> dict:
        started = time.perf_counter()
        user_row = served.user_row.get(user_id)
        events = service.log.user_events(user_id, cfg.foldin.max_events)
        targets, online_excluded = served.session_state(events, int(time.time() * 1000))
        query = served.query_vector(user_row, targets)
        started = timings.add("foldin", started)
        excluded = online_excluded | served.excluded.get(user_row, frozenset())
        excluded.update(served.item_row[i] for i in exclude if i in served.item_row)
        timings.add("filter", started)
        if served.online is not None:
            return two_stage_one(
                served, user_id, user_row, query, events, excluded, k, category, timings
            )
        table = None
        if cfg.rerank.weight > 0 and served.rates is not None:
            table = served.rates.current(service.log)
        if table is not None and query is not None:
            fetch = max(k, cfg.rerank.candidates)
            rows, scores = served.rank(query, fetch, excluded, category, timings)
            started = time.perf_counter()
            rows, scores = rerank(rows, scores, table, cfg.rerank.weight, cfg.rerank.floor, k)
            timings.add("rerank", started)
        else:
            rows, scores = served.rank(query, k, excluded, category, timings)
        source = "popularity" if query is None else ("model" if user_row is not None else "session")
        return {
            "user_id": user_id,
            "items": [
                {"item_id": served.item_ids[r], "score": float(s) if math.isfinite(s) else 0.0}
                for r, s in zip(rows, scores, strict=True)
            ],
            "source": source,
            "bundle_version": served.version,
        }

    def two_stage_one(
        served: ServingBundle,
        user_id: str,
        user_row: int | None,
        query,
        events: list,
        excluded: set[int],
        k: int,
        category: str | None,
        timings: Timings,
    ) -> dict:
        """Candidates (history incl. the log, cascade, ANN over the folded-in query,
        trending) -> the same features as offline -> LambdaRank -> exclusion and filters."""
        allowed = None
        if category is not None:
            allowed = served.category.get(category, np.empty(0, dtype=np.int64))

        def search(n: int) -> tuple[list[int], list[float]]:
            return served.rank(query, n, excluded, None, timings)

        rows, scores, parts = served.online.rank(
            user_row,
            served.logged_rows(events),
            search if query is not None else None,
            excluded,
            allowed,
            k,
            int(time.time() * 1000),
        )
        for stage, seconds in parts.items():
            timings.stages[stage] = timings.stages.get(stage, 0.0) + seconds
        if len(rows) < k:  # a thin candidate set: fill from popularity
            more, more_scores = served.rank(None, k, excluded | set(rows), category, timings)
            take = more[: k - len(rows)]
            floor = min(scores) if scores else 0.0
            rows, scores = rows + take, scores + [floor - 1.0 - i for i in range(len(take))]
        source = "two_stage" if user_row is not None or events else "popularity"
        return {
            "user_id": user_id,
            "items": [
                {"item_id": served.item_ids[r], "score": float(s) if math.isfinite(s) else 0.0}
                for r, s in zip(rows, scores, strict=True)
            ],
            "source": source,
            "bundle_version": served.version,
        }

    def observe(timings: Timings, request: Request, started: float) -> None:
        timings.stages["parse"] = started - request.scope.get("recfb.start", started)
        for stage, seconds in timings.stages.items():
            service.metrics.stage.labels(stage=stage).observe(seconds)

    @app.get(
        "/v1/users/{user_id}/recommendations",
        response_model=Recommendations,
        tags=["recommendations"],
    )
    async def recommendations(
        request: Request,
        user_id: Annotated[str, PathParam(min_length=1, max_length=256)],
        k: Annotated[int | None, Query(ge=1, le=cfg.max_k)] = None,
        exclude: Annotated[
            str | None, Query(max_length=100_000, description="comma-separated item ids")
        ] = None,
        category: Annotated[str | None, Query(max_length=256)] = None,
    ) -> Response:
        """Top-k items for a user: bundle vector + fold-in of the user's logged events,
        minus excluded items; users the bundle does not know get their session or popularity."""
        started = time.perf_counter()
        served = service.bundle()
        timings = Timings()
        extra = [i for i in exclude.split(",") if i] if exclude else []
        body = recommend_one(served, user_id, k or cfg.default_k, extra, category, timings)
        t = time.perf_counter()
        response = _json(body)
        timings.add("serialise", t)
        observe(timings, request, started)
        return response

    @app.post("/v1/recommendations", response_model=BatchRecommendations, tags=["recommendations"])
    def batch_recommendations(request: Request, body: BatchRequest) -> Response:
        """The same for many users at once (at most `max_batch_users`)."""
        started = time.perf_counter()
        if len(body.user_ids) > cfg.max_batch_users:
            raise _unprocessable(["body", "user_ids"], f"at most {cfg.max_batch_users} users")
        if body.k is not None and body.k > cfg.max_k:
            raise _unprocessable(["body", "k"], f"k must be <= {cfg.max_k}")
        served = service.bundle()
        timings = Timings()
        k = body.k or cfg.default_k
        results = [
            recommend_one(served, u, k, body.exclude, body.category, timings) for u in body.user_ids
        ]
        t = time.perf_counter()
        response = _json({"results": results, "bundle_version": served.version})
        timings.add("serialise", t)
        observe(timings, request, started)
        return response

    @app.get("/v1/items/{item_id}/similar", response_model=SimilarItems, tags=["recommendations"])
    async def similar(
        item_id: Annotated[str, PathParam(min_length=1, max_length=256)],
        k: Annotated[int | None, Query(ge=1, le=cfg.max_k)] = None,
    ) -> Response:
        """Items whose vectors score highest against this item's vector (itself excluded)."""
        served = service.bundle()
        row = served.item_row.get(item_id)
        if row is None:
            raise HTTPException(404, f"item_id {item_id!r} is not in bundle {served.version}")
        rows, scores = served.rank(
            served.bundle.item_vectors[row], k or cfg.default_k, {row}, None, Timings()
        )
        return _json(
            {
                "item_id": item_id,
                "items": [
                    {"item_id": served.item_ids[r], "score": float(s)}
                    for r, s in zip(rows, scores, strict=True)
                ],
                "bundle_version": served.version,
            }
        )

    @app.get("/v1/items/{item_id}/rates", response_model=ItemRates, tags=["rates"])
    def item_rates(item_id: Annotated[str, PathParam(min_length=1, max_length=256)]) -> Response:
        """Naive and delay-corrected CVR, refund rate and NetCVR of an item over recent
        traffic, with their sample sizes (404 when the bundle has no delay models)."""
        served = service.bundle()
        row = served.item_row.get(item_id)
        if row is None:
            raise HTTPException(404, f"item_id {item_id!r} is not in bundle {served.version}")
        table = served.rates.current(service.log) if served.rates is not None else None
        if table is None:
            raise HTTPException(
                404, f"bundle {served.version} has no delay models (no conversion in its log)"
            )
        rec = table.frame.row(row, named=True)
        fits = served.rates.fits
        conv = (
            fits.conversion.for_segment(served.rates.segment[row])
            if (served.rates.segment is not None)
            else fits.conversion.overall
        )
        body = {
            "item_id": item_id,
            "as_of": datetime.fromtimestamp(table.as_of_ms / 1000, UTC).isoformat(),
            "windows_days": {
                "clicks": cfg.rates.click_window_days,
                "purchases": cfg.rates.purchase_window_days,
            },
            **{k: _finite(v) for k, v in rec.items() if k != "item_idx"},
            "conversion_delay": {"family": conv.family, "median_hours": conv.median_s() / 3600},
            "bundle_version": served.version,
        }
        return _json(body)

    @app.post(
        "/v1/events",
        response_model=EventsAccepted,
        dependencies=[Depends(require_key)],
        tags=["events"],
    )
    def post_events(batch: EventBatch) -> Response:
        """Log a batch of events durably (idempotent on event_id) before acknowledging."""
        if len(batch.events) > cfg.max_events_per_post:
            raise _unprocessable(["body", "events"], f"at most {cfg.max_events_per_post} events")
        served = service.current
        if served is not None:
            for i, ev in enumerate(batch.events):
                if ev.event not in served.signals:
                    raise _unprocessable(
                        ["body", "events", i, "event"],
                        f"{ev.event!r} is not a signal of the bundle's signal map; "
                        f"expected one of {sorted(served.signals)}",
                    )
        now = datetime.now(UTC)
        rows = [
            (
                ev.event_id,
                ev.user_id,
                ev.item_id,
                ev.event,
                int(_utc(ev.ts or now).timestamp() * 1000),
                ev.value,
                ev.order_id,
            )
            for ev in batch.events
        ]
        new = service.log.append(rows)
        service.metrics.events.labels(kind="new").inc(new)
        service.metrics.events.labels(kind="repeat").inc(len(rows) - new)
        return _json({"accepted": len(rows), "new": new})

    @app.get("/v1/admin/bundle", dependencies=[Depends(require_key)], tags=["admin"])
    def bundle_status() -> dict:
        served = service.current
        return {
            "bundle_version": served.version if served else None,
            "path": str(served.bundle.path) if served else None,
            "manifest": served.bundle.manifest if served else None,
            "loading": service.loading,
            "last_error": service.last_error,
            "following": {
                "model": follower.model,
                "alias": follower.alias,
                "version": follower.version,
                "error": follower.error,
            }
            if follower
            else None,
        }

    @app.post(
        "/v1/admin/bundle", status_code=202, dependencies=[Depends(require_key)], tags=["admin"]
    )
    def swap_bundle(body: SwapRequest) -> dict:
        """Load a bundle in the background and swap it in atomically when it is ready."""
        if not Path(body.path).is_dir():
            raise _unprocessable(["body", "path"], f"{body.path} is not a directory")
        if not service.swap_in_background(body.path):
            raise HTTPException(409, f"a swap is already running ({service.loading})")
        return {"loading": body.path}

    return app


def _finite(v: Any) -> Any:
    """JSON has no NaN: a rate with no trials is null."""
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _utc(ts: datetime) -> datetime:
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


def _unprocessable(loc: list, msg: str) -> HTTPException:
    return HTTPException(422, [{"loc": loc, "msg": msg, "type": "value_error"}])


class TimingMiddleware:
    """Request latency histograms and one structured log line per request (pure ASGI)."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        scope["recfb.start"] = start
        status = {"code": 500}

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            elapsed = time.perf_counter() - start
            route = scope.get("route")
            name = getattr(route, "path", "unmatched")
            self.metrics.latency.labels(
                route=name, method=scope["method"], status=str(status["code"])
            ).observe(elapsed)
            if log.isEnabledFor(logging.INFO) or status["code"] >= 500:
                log.info(
                    "request",
                    extra={
                        "route": name,
                        "method": scope["method"],
                        "status": status["code"],
                        "ms": round(elapsed * 1000, 3),
                    },
                )


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, message and any `extra` fields."""

    _skip = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        data = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        data |= {k: v for k, v in vars(record).items() if k not in self._skip}
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("recfb")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def serve(cfg: ServeConfig, api_key: str | None) -> None:
    """Run the API on uvicorn until interrupted."""
    import uvicorn

    configure_logging(cfg.log_level)
    app = create_app(cfg, api_key)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_config=None, access_log=False)


__all__ = ["create_app", "newest_bundle", "serve"]

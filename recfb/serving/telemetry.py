"""What the service tells operators: Prometheus metrics, per-request timing, JSON log lines."""

import json
import logging
import os
import time
from datetime import UTC, datetime
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

log = logging.getLogger("recfb.serving")
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # set by `serve` for several workers
BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    """The service's own registry (not the global one: several apps can live in one test)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "recfb_request_seconds",
            "request latency by route",
            ["route", "method", "status"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.stage = Histogram(
            "recfb_stage_seconds",
            "time per stage of a recommendation request",
            ["stage"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.events = Counter(
            "recfb_events_ingested", "events durably logged", ["kind"], registry=self.registry
        )
        self.bundle = Gauge(
            "recfb_bundle_info",
            "the bundle being served",
            ["version"],
            registry=self.registry,
            multiprocess_mode="liveall",  # with several workers: one sample per process
        )

    def exposition(self) -> bytes:
        """The text format of GET /metrics: this process's registry, or, where the server
        runs several workers (PROMETHEUS_MULTIPROC_DIR set), all workers' samples summed by
        prometheus_client's multiprocess collector."""
        if os.environ.get(MULTIPROC_ENV):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)


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
            self._record(scope, status["code"], time.perf_counter() - start)

    def _record(self, scope: dict, code: int, elapsed: float) -> None:
        name = getattr(scope.get("route"), "path", "unmatched")
        self.metrics.latency.labels(route=name, method=scope["method"], status=str(code)).observe(
            elapsed
        )
        if log.isEnabledFor(logging.INFO) or code >= 500:
            log.info(
                "request",
                extra={
                    "route": name,
                    "method": scope["method"],
                    "status": code,
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

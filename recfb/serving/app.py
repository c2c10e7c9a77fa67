"""The retrieval HTTP API (FastAPI): recommendations, similar items, events, hot swap, metrics.

`create_app` starts the service (its bundle loaded before the server accepts connections) and
wires the routers of `recfb.serving.routes` and the timing middleware; the state lives in
`recfb.serving.service`, the bodies in `recfb.serving.schemas`. Events are committed to the
durable log before the 2xx. Write and admin endpoints need the `X-API-Key` header, checked
before their body is read; body sizes, body deadlines and failed authentications are limited
by `recfb.serving.guard`.

Nothing here (nor anything a request or a bundle load reaches) imports torch, lightning or
torch_geometric: the server runs from the `serve` install extra alone.
"""

import json
import os
import tempfile

from fastapi import FastAPI

from recfb.serving.config import ServeConfig
from recfb.serving.fastpath import FastRecommendations
from recfb.serving.guard import Guard
from recfb.serving.routes import admin, events, items, ops, recommendations
from recfb.serving.routes.common import install_error_handlers
from recfb.serving.service import newest_bundle, start_service
from recfb.serving.telemetry import MULTIPROC_ENV, TimingMiddleware, configure_logging

RECOMMENDATIONS = "/v1/users/{user_id}/recommendations"
ROUTERS = (ops, recommendations, items, events, admin)  # also the order of the OpenAPI paths


def create_app(cfg: ServeConfig, api_key: str | None = None) -> FastAPI:
    """The ASGI app; the bundle is loaded before the server accepts connections."""
    service = start_service(cfg, api_key)
    app = FastAPI(
        title="recfb retrieval API",
        version="1",
        description="Recommendations from a recfb model bundle, corrected by online events.",
    )
    app.state.service = service
    install_error_handlers(app)
    routers = [module.router(service) for module in ROUTERS]
    for api in routers:
        app.include_router(api)
    if cfg.fast_path:  # inside the guard: the plain recommendations GET skips the routing
        route = next(r for api in routers for r in api.routes if r.path == RECOMMENDATIONS)
        app.add_middleware(FastRecommendations, service=service, route=route)
    app.add_middleware(Guard, cfg=cfg, api_key=service.api_key)  # inside the timing
    app.add_middleware(TimingMiddleware, metrics=service.metrics)
    return app


CONFIG_ENV = "RECFB_SERVE_WORKER_CONFIG"  # the config handed to each worker process


def serve(cfg: ServeConfig, api_key: str | None) -> None:
    """Run the API on uvicorn until interrupted; with `cfg.workers` > 1, as that many
    processes on one socket (uvicorn's supervisor), each loading the bundle itself (verified,
    memory-mapped: the index and vectors are shared through the page cache) and summing its
    metrics with the others' through PROMETHEUS_MULTIPROC_DIR."""
    import uvicorn

    configure_logging(cfg.log_level)
    run = {"host": cfg.host, "port": cfg.port, "log_config": None, "access_log": False}
    if cfg.workers == 1:
        _single_process_settings(cfg)
        uvicorn.run(create_app(cfg, api_key), **run)
        return
    with tempfile.TemporaryDirectory(prefix="recfb-metrics-") as metrics_dir:
        # read by the workers only: the key travels as the CLI got it, in the environment
        os.environ[CONFIG_ENV] = json.dumps(
            {"cfg": cfg.model_dump(mode="json"), "api_key": api_key}
        )
        os.environ[MULTIPROC_ENV] = metrics_dir
        uvicorn.run("recfb.serving.app:worker_app", factory=True, workers=cfg.workers, **run)


def worker_app() -> FastAPI:
    """One worker process's app (uvicorn calls this in each process it starts)."""
    data = json.loads(os.environ[CONFIG_ENV])
    cfg = ServeConfig.model_validate(data["cfg"])
    configure_logging(cfg.log_level)
    _single_process_settings(cfg)
    return create_app(cfg, data["api_key"])


def _single_process_settings(cfg: ServeConfig) -> None:
    """FAISS threads per process: one query at a time gains nothing from OpenMP, whose
    threads spin against the event loop and the other workers."""
    import faiss

    faiss.omp_set_num_threads(cfg.faiss_threads)


__all__ = ["create_app", "newest_bundle", "serve"]

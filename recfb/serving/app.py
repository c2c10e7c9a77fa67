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

from fastapi import FastAPI

from recfb.serving.config import ServeConfig
from recfb.serving.guard import Guard
from recfb.serving.routes import admin, events, items, ops, recommendations
from recfb.serving.routes.common import install_error_handlers
from recfb.serving.service import newest_bundle, start_service
from recfb.serving.telemetry import TimingMiddleware, configure_logging

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
    app.add_middleware(Guard, cfg=cfg, api_key=service.api_key)  # inside the timing
    app.add_middleware(TimingMiddleware, metrics=service.metrics)
    for module in ROUTERS:
        app.include_router(module.router(service))
    return app


def serve(cfg: ServeConfig, api_key: str | None) -> None:
    """Run the API on uvicorn until interrupted."""
    import uvicorn

    configure_logging(cfg.log_level)
    app = create_app(cfg, api_key)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_config=None, access_log=False)


__all__ = ["create_app", "newest_bundle", "serve"]

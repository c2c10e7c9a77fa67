"""Liveness, readiness (a bundle is loaded) and Prometheus metrics."""

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from recfb.serving.routes.common import json_response
from recfb.serving.service import Service


def router(service: Service) -> APIRouter:
    api = APIRouter(tags=["ops"])

    @api.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz() -> Response:
        served = service.current
        if served is None:
            return json_response({"ready": False, "reason": "no bundle loaded"}, 503)
        return json_response({"ready": True, "bundle_version": served.version})

    @api.get("/metrics")
    def metrics() -> Response:
        return Response(service.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return api

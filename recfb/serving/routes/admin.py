"""The served bundle's status and the hot swap (both behind the API key)."""

from pathlib import Path

from fastapi import APIRouter, Depends, HTTPException

from recfb.serving.routes.common import api_key_check, unprocessable
from recfb.serving.schemas import SwapRequest
from recfb.serving.service import Service


def router(service: Service) -> APIRouter:
    api = APIRouter(tags=["admin"], dependencies=[Depends(api_key_check(service))])

    @api.get("/v1/admin/bundle")
    def bundle_status() -> dict:
        served = service.current
        follower = service.follower
        return {
            "bundle_version": served.version if served else None,
            "path": str(served.bundle.path) if served else None,
            "manifest": served.bundle.manifest if served else None,
            "loading": service.loading,
            "last_error": service.last_error,
            "following": follower.status() if follower else None,
        }

    @api.post("/v1/admin/bundle", status_code=202)
    def swap_bundle(body: SwapRequest) -> dict:
        """Load a bundle in the background and swap it in atomically when it is ready."""
        if not Path(body.path).is_dir():
            raise unprocessable(["body", "path"], f"{body.path} is not a directory")
        if not service.swap_in_background(body.path):
            raise HTTPException(409, f"a swap is already running ({service.loading})")
        return {"loading": body.path}

    return api

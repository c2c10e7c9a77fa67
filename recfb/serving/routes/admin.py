"""The served bundle's status and the hot swap (both behind the API key).

The swap takes a bundle directory inside `serve.models_dir` (a name there, or a path from the
working directory that resolves there: no `..` or symlink out of it) or a registry URI
`models:/NAME@ALIAS` / `models:/NAME/VERSION`; anything else gets one uniform 422 that says
nothing about whether the path exists."""

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
        if service.cfg.workers > 1:  # the request reaches one worker of several
            raise HTTPException(
                409,
                f"this server runs {service.cfg.workers} worker processes and a swap would "
                "reach one of them: follow a registry alias (serve.follow.model; every worker "
                "follows it) or restart on the new bundle",
            )
        target = swap_target(service, body.path)
        if not service.swap_in_background(target):
            raise HTTPException(409, f"a swap is already running ({service.loading})")
        return {"loading": target}

    return api


OUTSIDE = "must name a bundle directory inside serve.models_dir or a models:/ registry URI"


def swap_target(service: Service, location: str) -> str:
    """The bundle the swap may load, or a 422: the same answer for any path outside
    models_dir, existing or not."""
    if location.startswith("models:/"):
        return location
    root = Path(service.cfg.models_dir).resolve()
    raw = Path(location)
    # a relative path: from the working directory (models/v2) or from models_dir (v2)
    bases = [raw] if raw.is_absolute() else [Path.cwd() / raw, root / raw]
    path = None
    for base in bases:
        try:
            resolved = base.resolve()
        except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL byte
            continue
        if resolved != root and resolved.is_relative_to(root):
            path = resolved
            break
    if path is None:
        raise unprocessable(["body", "path"], OUTSIDE)
    if not path.is_dir():
        rel = path.relative_to(root)
        raise unprocessable(["body", "path"], f"no bundle directory {rel} in serve.models_dir")
    return str(path)

"""Joining a Ray cluster with what recfb's workers need from the driver's environment."""

from __future__ import annotations

import os
from typing import Any

from recfb.distributed.config import RayConfig

# what a worker reads to find the registry, its caches and the bundle signing key
FORWARDED_ENV = (
    "MLFLOW_TRACKING_URI",
    "RECFB_CACHE_DIR",
    "RECFB_CONFIG_DIR",
    "RECFB_BUNDLE_KEY",
    "RECFB_ALLOW_UNSIGNED",
    # object-store inputs: where the store is and the driver's credentials for it (workers
    # with a role of their own need none: leave these unset on the driver)
    "AWS_ENDPOINT_URL",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ALLOW_HTTP",
    "AWS_PROFILE",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
)


def import_ray() -> Any:
    try:
        import ray
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            "the ray engine needs Ray: pip install 'recfb[ray]'", name="ray"
        ) from exc
    return ray


def connect(cfg: RayConfig) -> Any:
    """`ray` connected to the cluster at `cfg.address` (a private local one when None),
    with the forwarded environment set on every worker. Idempotent within a process."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    env = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
    # a worker's Polars uses the CPUs it reserved, as Ray sets OMP_NUM_THREADS: one thread
    # pool per core, not one per worker on every core
    env["POLARS_MAX_THREADS"] = str(max(1, int(cfg.cpus_per_worker)))
    ray.init(
        address=cfg.address,
        runtime_env={"env_vars": env},
        include_dashboard=False,
        log_to_driver=False,
        logging_level="warning",
    )
    return ray

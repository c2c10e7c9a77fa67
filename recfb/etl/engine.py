"""`recfb etl` on the engine its config names: this process (`recfb.etl.pipeline`) or a
Ray cluster (`recfb.etl.on_ray`), which runs the local engine's phases per shard. Apart
from both, so neither imports the other's dispatcher."""

from __future__ import annotations

from recfb.etl.config import EtlConfig
from recfb.etl.pipeline import EtlResult, run_etl_local


def run_etl(cfg: EtlConfig, quiet: bool = False) -> EtlResult:
    """Run the whole ETL (files in, an output directory out); returns the output directory
    and the statistics written there. Both engines write the same tables."""
    if cfg.engine == "ray":
        from recfb.etl.on_ray import run_etl_ray

        return run_etl_ray(cfg, quiet)
    return run_etl_local(cfg, quiet)

"""Which engine runs a stage, and where the Ray cluster is."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Engine = Literal["local", "ray"]


class RayConfig(BaseModel):
    """A Ray cluster to run on: `address` (host:port of its head, `auto` for the one this
    host belongs to, None to start a private one for the command) and how many workers a job
    spreads over."""

    model_config = ConfigDict(extra="forbid")

    address: str | None = Field(
        None, description="head node host:port, `auto`, or None (a private local cluster)"
    )
    workers: int = Field(2, ge=1, description="Ray actors or tasks a job runs on at once")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs each worker reserves")
    shards: int | None = Field(
        None, ge=1, description="ETL: user shards (hash of user_id); default 2 x workers"
    )
    rows_per_read: int = Field(
        4_000_000,
        ge=1,
        description="ETL: a parquet input with more rows is read by several tasks, this many "
        "rows each (one huge file is not one worker's)",
    )

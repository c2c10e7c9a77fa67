"""Typed configuration of `recfb serve` (conf/serve.yaml; every key overridable)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from recfb.signals.rules import DEFAULT_MIN_TS

MAX_LIST = 10_000  # the schema's cap on any list in a request (config caps may be lower)


class FoldinConfig(BaseModel):
    """How recent events move a user's query vector (see recfb/serving/retrieval.py)."""

    model_config = ConfigDict(extra="forbid")

    l2: float = Field(1.0, gt=0, description="ridge toward the bundle vector, x mean |item|^2")
    half_life_hours: float = Field(24.0, gt=0, description="an event's weight halves this often")
    negative_weight: float = Field(2.0, ge=0, description="weight of a dislike or refund")
    max_events: int = Field(200, ge=1, description="most recent events read per request")


class RatesConfig(BaseModel):
    """Online item rates corrected for delayed feedback (see recfb/serving/rates.py)."""

    model_config = ConfigDict(extra="forbid")

    clock: Literal["wall", "data"] = Field(
        "wall",
        description="'now' for ages and windows: the wall clock, or the newest event known "
        "(bundle cut-off or log) for replays of old logs",
    )
    click_window_days: float = Field(7.0, gt=0, description="clicks this recent are the trials")
    purchase_window_days: float = Field(28.0, gt=0, description="purchases for the refund rate")
    refresh_s: float = Field(60.0, gt=0, description="recompute when the table is this old")
    cvr_prior_strength: Annotated[float, Field(ge=0)] | Literal["auto"] = Field(
        2.0,
        description="pseudo-clicks at the segment CVR; `auto`: empirical Bayes, toward the "
        "segment's pooled rate with the strength chosen by held-out likelihood (lower "
        "per-item error on thin items, benchmarks/results/rate_shrinkage.md)",
    )
    refund_prior_strength: Annotated[float, Field(ge=0)] | Literal["auto"] = Field(
        2.0, description="pseudo-purchases at the segment refund rate, or `auto` (as above)"
    )


class RerankConfig(BaseModel):
    """Blend of relevance and corrected NetCVR: score + weight * log(max(NetCVR, floor)).

    For a softmax-trained model exp(score) is proportional to P(item | user), so weight 1 ranks
    by expected net conversions; 0 (default) leaves the model's order alone."""

    model_config = ConfigDict(extra="forbid")

    weight: float = Field(0.0, ge=0, description="0 = off (default until measured better)")
    candidates: int = Field(100, ge=1, description="index candidates re-ranked per request")
    floor: float = Field(1e-4, gt=0, le=1, description="NetCVR floor inside the log")
    rates: Literal["corrected", "naive"] = Field(
        "corrected",
        description="the NetCVR re-ranked by: delay-corrected (default) or naive (immature "
        "clicks and purchases counted as failures; the closed loop compares the two)",
    )


class FollowConfig(BaseModel):
    """Follow a registry alias: serve the bundle of the version that holds it, swap when it
    moves (MLFLOW_TRACKING_URI says which registry)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="registered model name; None: do not follow")
    alias: str = "production"
    poll_s: float = Field(30.0, gt=0, description="how often the alias is looked up")


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bundle: str | None = Field(
        None,
        description="bundle directory or models:/ URI (default: the registry's `production`, "
        "else the newest bundle in models_dir that passed the gate)",
    )
    models_dir: str = "models"
    allow_unsigned: bool = Field(
        False, description="INSECURE: serve bundles whose signature is missing or wrong"
    )
    event_log: str = Field(
        "events.db",
        description="the durable event log: a SQLite file (one server), or a PostgreSQL URI "
        "postgresql://user@host/db that several replicas share (the `postgres` extra)",
    )
    synchronous: Literal["FULL", "NORMAL"] = Field(
        "FULL", description="FULL: an acknowledged event survives a power cut; NORMAL: a crash"
    )
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key: str | None = Field(
        None, description="required on writes and admin calls (env RECFB_API_KEY wins)"
    )
    exclude: Literal["signals", "purchased", "any", "none"] = Field(
        "signals",
        description="what a user is not shown again: `signals` = the bundle's signal map "
        "rule (levels that do not repeat, by default the deepest: bought and not refunded); "
        "`purchased` = the deepest level; explicit negatives always",
    )
    default_k: int = Field(20, ge=1)
    max_k: int = Field(500, ge=1)
    max_batch_users: int = Field(1000, ge=1, le=MAX_LIST)
    max_events_per_post: int = Field(10_000, ge=1, le=MAX_LIST)
    max_exclude: int = Field(1000, ge=0, le=MAX_LIST, description="excluded ids per request")
    min_ts: datetime = Field(
        DEFAULT_MIN_TS, description="earlier events are refused (the ETL's input.min_ts)"
    )
    max_future_skew_s: float = Field(
        300.0, ge=0, description="events timed later than now + this are refused"
    )
    max_body_bytes: int = Field(
        1 << 20, ge=1024, description="largest request body; larger: 413 before it is read"
    )
    max_events_body_bytes: int = Field(
        8 << 20, ge=1024, description="largest body of POST /v1/events"
    )
    body_timeout_s: float = Field(
        10.0, gt=0, description="a request body not fully received this long after its headers: 408"
    )
    auth_failures: int = Field(
        10,
        ge=1,
        description="failed authentications from one client address within "
        "auth_window_s before its write and admin requests get 429",
    )
    auth_window_s: float = Field(60.0, gt=0, description="the window of auth_failures")
    exact_filter_below: int = Field(
        20_000, ge=0, description="a category filter this narrow is scored exactly"
    )
    foldin: FoldinConfig = Field(default_factory=FoldinConfig)
    rates: RatesConfig = Field(default_factory=RatesConfig)
    follow: FollowConfig = Field(default_factory=FollowConfig)
    rerank: RerankConfig = Field(default_factory=RerankConfig)
    log_level: str = "info"
    workers: int = Field(
        1,
        ge=1,
        le=64,
        description="server processes on one port (uvicorn workers); each verifies and "
        "memory-maps the same bundle files, so the index and vectors are held once",
    )
    mmap: bool = Field(True, description="memory-map the index and vectors (shared by all workers)")
    fast_path: bool = Field(
        True,
        description="answer plain GET recommendations (no query but k) without FastAPI's "
        "routing and parameter solving (recfb/serving/fastpath.py); same bytes",
    )
    faiss_threads: int = Field(
        1,
        ge=1,
        description="OpenMP threads per process for FAISS; one query at a time runs best on "
        "one (more threads spin against each other and the event loop)",
    )

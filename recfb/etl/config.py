"""Typed configuration of the ETL stage (`conf/etl.yaml`, `conf/datasets/*.yaml`)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from recfb.distributed.config import Engine, RayConfig
from recfb.signals.rules import DEFAULT_MIN_TS


class InputConfig(BaseModel):
    """Where the raw events are and how to read them."""

    model_config = ConfigDict(extra="forbid")
    paths: list[str] = Field(
        min_length=1,
        description="files, globs, directories, or the service's event log on PostgreSQL "
        "(postgresql://...; the `postgres` extra)",
    )
    format: Literal["auto", "parquet", "csv", "jsonl", "sqlite"] = "auto"
    adapter: Literal["canonical", "taobao", "movielens", "kuairand"] = "canonical"
    csv_separator: str = ","
    csv_has_header: bool = True
    columns: dict[str, str] = Field(
        default_factory=dict, description="rename source columns: {source_name: canonical_name}"
    )
    ts_unit: Literal["auto", "s", "ms", "us"] = Field(
        "auto",
        description="unit of integer timestamps; auto: |ts| < 1e11 -> s, < 1e14 -> ms, else us",
    )
    min_ts: datetime = Field(DEFAULT_MIN_TS, description="earlier events are quarantined")
    max_ts: datetime | None = Field(
        None, description="later events are quarantined; default: now + 1 day"
    )


class SplitConfig(BaseModel):
    """How pairs are split into train / valid / test. Never a random per-user shuffle."""

    model_config = ConfigDict(extra="forbid")
    method: Literal["temporal", "leave_last_out", "none"] = "temporal"
    leave_out: Literal["positive", "deepest"] = Field(
        "positive",
        description="leave_last_out: which pair is held out per user. `positive`: the latest "
        "positive pair (all its events). `deepest`: the user's latest pair at the deepest level "
        "(the last buy) tests and the one before validates, and only its deepest-level events "
        "leave train: its earlier views and carts stay, as in the published multi-behaviour "
        "tables (not temporal: other events after the held-out buy stay in train too)",
    )
    valid_frac: float = Field(0.1, ge=0, lt=1, description="share of events after the valid cut")
    test_frac: float = Field(0.1, ge=0, lt=1, description="share of events after the test cut")
    valid_start: datetime | None = Field(None, description="explicit cut; overrides valid_frac")
    test_start: datetime | None = Field(None, description="explicit cut; overrides test_frac")

    @model_validator(mode="after")
    def _fractions(self) -> SplitConfig:
        if self.valid_frac + self.test_frac >= 1:
            raise ValueError("valid_frac + test_frac must be < 1")
        if self.valid_start and self.test_start and self.valid_start > self.test_start:
            raise ValueError("valid_start must not be after test_start")
        return self


class FilterConfig(BaseModel):
    """Optional filters; rows they remove go to `filtered.parquet` with the reason."""

    model_config = ConfigDict(extra="forbid")
    outlier_users: bool = Field(False, description="drop users whose event rate is far above")
    outlier_rate_factor: float = Field(
        50.0, gt=1, description="a user is an outlier above this multiple of the median rate"
    )
    min_user_items: int = Field(0, ge=0, description="k-core: min distinct items per user")
    min_item_users: int = Field(0, ge=0, description="k-core: min distinct users per item")

    @property
    def k_core(self) -> bool:
        """Whether a k-core is asked for (either minimum set)."""
        return bool(self.min_user_items or self.min_item_users)

    @property
    def active(self) -> bool:
        """Whether any filter is on (then the rows keep their provenance until applied)."""
        return self.outlier_users or self.k_core


class EtlConfig(BaseModel):
    """The whole ETL configuration."""

    model_config = ConfigDict(extra="forbid")
    input: InputConfig
    signals: str = Field(description="path of the signal map YAML")
    out: str = Field("data/etl", description="output directory (replaced atomically)")
    vocab_from: str | None = Field(
        None, description="directory with users/items vocabularies to extend; default: `out`"
    )
    split: SplitConfig = Field(default_factory=SplitConfig)
    filters: FilterConfig = Field(default_factory=FilterConfig)
    engine: Engine = Field(
        "local", description="local (this process) or ray (shards of users on a Ray cluster)"
    )
    ray: RayConfig = Field(default_factory=RayConfig, description="the cluster of engine: ray")

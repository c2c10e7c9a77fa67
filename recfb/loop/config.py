"""Configuration of the closed loop (`conf/loop.yaml`): the world, the cadence, the policies.

A policy is a name plus config overrides of the stages it runs through (training, the
two-stage ranker, the service), so that "two-stage with the re-rank at weight 1" is
`{family: two_stage, serve: [rerank.weight=1]}` and nothing else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from recfb.config import load_config


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PolicySpec(_Strict):
    """One policy of the comparison.

    kind: `random` (uniform over the launched catalogue), `oracle` (the simulator's truth:
    the k items of highest true net-purchase probability per view), `library` (a
    training-free family through `recfb.Recommender`, e.g. popularity), `served` (an
    embedding or two-stage bundle answered by the service's own recommendation code).
    """

    kind: Literal["random", "oracle", "library", "served"] = "served"
    family: str = "mf"
    train: list[str] = Field(default_factory=list, description="TrainConfig overrides")
    rank: list[str] = Field(default_factory=list, description="RankConfig overrides")
    serve: list[str] = Field(default_factory=list, description="ServeConfig overrides")
    description: str = ""


class LoopConfig(_Strict):
    """World size, cadence and the policies compared (`recfb loop --help` shows an example)."""

    world: dict[str, Any] = Field(
        default_factory=lambda: {"n_users": 1500, "n_items": 800},
        description="SimConfig keys (the seed comes from `seeds`)",
    )
    days: int = Field(14, ge=1, description="simulated days the policy serves")
    warmup_days: int = Field(
        14, ge=1, description="days of the simulator's own exposure before the loop (history)"
    )
    k: int = Field(10, ge=1, description="items shown per request")
    sessions_per_day: float = Field(
        0.6, gt=0, description="requests per user per day at activity 1 (Poisson)"
    )
    organic_views: float = Field(
        3.0, ge=0, description="mean organic (popularity-driven) views per session"
    )
    new_item_share: float = Field(
        0.1, ge=0, lt=1, description="share of items launched during the loop (uniform day)"
    )
    retrain_every_days: int = Field(1, ge=1, description="the nightly retrain's cadence")
    rates_every_hours: int = Field(1, ge=1, description="the hourly refresh of online rates")
    valid_frac: float = Field(0.05, gt=0, lt=1, description="ETL valid split of each retrain")
    train_config: str = "conf/models/mf.yaml"
    train_overrides: list[str] = Field(
        default_factory=lambda: ["trainer.max_epochs=8"], description="applied to every policy"
    )
    rank_config: str = "conf/rank.yaml"
    rank_overrides: list[str] = Field(
        default_factory=lambda: ["ranker.n_estimators=150", "ranker.label_windows=2"],
        description="applied to every two-stage policy (a nightly fit in seconds, not minutes)",
    )
    signals: str = "conf/signals/simulator.yaml"
    seeds: list[int] = Field(default_factory=lambda: [1, 2, 3])
    experiment: str = "recfb-loop"
    policies: dict[str, PolicySpec] = Field(default_factory=dict)


def load_loop_config(path: str | Path | None, overrides: list[str] | None = None) -> LoopConfig:
    """`conf/loop.yaml` (or any file) plus `key=value` overrides."""
    return load_config(LoopConfig, path, overrides)

"""Typed configuration of the two-stage recommender (`conf/rank.yaml`; `--set` overrides)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SOURCES = ("history", "cascade", "embedding", "popularity")
FEATURE_GROUPS = ("pair", "item", "user", "category", "source")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SourceSizes(_Strict):
    """Candidates per user from each source (0 switches a source off)."""

    history: int = Field(
        200,
        ge=0,
        description="the user's own engaged-but-not-hidden items, deepest and newest first",
    )
    cascade: int = Field(100, ge=0, description="the cascaded multi-behaviour walk's top items")
    embedding: int = Field(100, ge=0, description="the embedding model's top items (ANN online)")
    popularity: int = Field(50, ge=0, description="trending items: what the cold are shown")


class CascadeSettings(_Strict):
    """The cascade source (`recfb.models.cascade`): restart a, pull toward the previous level b."""

    alpha: float = Field(0.0, ge=0, lt=1)
    beta: float = Field(0.9, ge=0, lt=1)
    level_weights: list[float] | None = None
    tol: float = Field(1e-4, gt=0)
    max_iter: int = Field(50, ge=1)


class RankerParams(_Strict):
    """LightGBM LambdaRank on graded next-window labels."""

    n_estimators: int = Field(500, ge=1, description="boosting rounds (early stopping cuts it)")
    learning_rate: float = Field(0.05, gt=0)
    num_leaves: int = Field(31, ge=2)
    min_child_samples: int = Field(20, ge=1)
    feature_fraction: float = Field(0.9, gt=0, le=1)
    truncation_level: int = Field(
        1000,
        ge=1,
        description="lambdarank_truncation_level: a pair gets a gradient only when one of its "
        "items is in the current top this many of its query. LightGBM's 30 sees only the top "
        "of a 150-400 candidate list; the whole list (1000) chosen on the valid windows "
        "(NDCG@10, mean of 3-4 seeds: MovieLens 0.291 -> 0.300, Taobao 0.109 -> 0.110, "
        "KuaiRand 0.049 -> 0.049)",
    )
    early_stopping_rounds: int = Field(50, ge=1)
    eval_at: int = Field(10, ge=1, description="early stopping watches NDCG at this cut-off")
    early_stopping_share: float = Field(
        0.2, gt=0, lt=1, description="share of the labelled users held out for early stopping"
    )
    label_windows: int = Field(
        5,
        ge=1,
        description="temporal splits: label windows the ranker learns from, the valid window "
        "and the windows of the same length before it (each with its own snapshot); 5 chosen "
        "on Taobao's valid window (1, 3, 5, 7 windows: NDCG@10 0.104, 0.104, 0.111, 0.108)",
    )
    max_queries: int = Field(
        20_000,
        ge=1,
        description="at most this many (window, user) queries with a positive label train the "
        "ranker, chosen by a hash (a 1M-event shop has ~50k; more cost minutes, not quality)",
    )
    num_threads: int = Field(0, ge=0, description="training threads (0: LightGBM's default)")
    seed: int = 0


class RankConfig(_Strict):
    """Everything the rank stage needs: sources, features, the ranker and its evaluation."""

    data: str = Field("data/etl", description="ETL output directory")
    embedding: Literal["als", "run", "none"] = Field(
        "als",
        description="embedding source: implicit's ALS fitted here on each snapshot (`als`), "
        "the vectors of the MLflow run `embedding_run` (`run`: what the bundle serves), or none",
    )
    embedding_run: str | None = Field(None, description="MLflow run id for embedding: run")
    embedding_dim: int = Field(64, ge=2, description="ALS factors")
    sources: SourceSizes = Field(default_factory=SourceSizes)
    cascade: CascadeSettings = Field(default_factory=CascadeSettings)
    features: list[Literal["pair", "item", "user", "category", "source"]] = Field(
        default_factory=lambda: list(FEATURE_GROUPS),
        description="feature groups the ranker sees (the ablation drops one at a time)",
    )
    item_windows_days: list[float] = Field(
        default_factory=lambda: [1.0, 7.0],
        description="item popularity per level is counted over these recent windows (and all time)",
    )
    history_days: float = Field(
        365.0,
        gt=0,
        description="the pair, user and category features and the history source look at a "
        "user's events of the last this many days; the bundle ships the same window, so the "
        "service computes what the ranker was trained on",
    )
    history_per_user: int = Field(
        2000, ge=1, description="... and at most this many of a user's newest events"
    )
    delay_corrected_rates: bool = Field(
        True,
        description="item CVR and refund rate corrected for feedback not yet arrived "
        "(`recfb.delayed`); naive rates where the log has no conversion cascade",
    )
    ranker: RankerParams = Field(default_factory=RankerParams)
    ks: list[int] = Field(default_factory=lambda: [10, 20, 50])
    experiment: str = "recfb"
    run_name: str | None = None
    out: str | None = Field(None, description="directory for the fitted ranker (default: temp)")
    seed: int = 0

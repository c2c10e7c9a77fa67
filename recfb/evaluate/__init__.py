"""Evaluation: full-ranking top-k metrics, per-level AUC and the top-k lists themselves."""

from recfb.evaluate.metrics import (
    EvalConfig,
    RankingSums,
    ScoreFn,
    full_ranking_metrics,
    item_popularity,
    level_auc,
    popularity_percentile,
    ranking_sums,
    topk_items,
)

__all__ = [
    "EvalConfig",
    "RankingSums",
    "ScoreFn",
    "full_ranking_metrics",
    "item_popularity",
    "level_auc",
    "popularity_percentile",
    "ranking_sums",
    "topk_items",
]

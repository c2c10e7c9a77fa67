"""Optional filters on clean events: outlier (bot-like) users and k-core.

Each returns (kept, removed) so the removed rows can be written to `filtered.parquet` with
their reason: a filter never silently drops data.
"""

from __future__ import annotations

import polars as pl

from recfb.etl.config import FilterConfig

_DAY_MS = 86_400_000


def outlier_users(events: pl.DataFrame, factor: float) -> pl.Series:
    """Users whose events per active day exceed `factor` x the median user's rate."""
    rates = events.group_by("user_id").agg(
        (
            pl.len() / ((pl.col("ts").max() - pl.col("ts").min()) / _DAY_MS).clip(lower_bound=1.0)
        ).alias("rate")
    )
    median = rates["rate"].median()
    return rates.filter(pl.col("rate") > factor * median)["user_id"]


def k_core(events: pl.DataFrame, min_user_items: int, min_item_users: int) -> pl.DataFrame:
    """Iteratively keep users with >= min_user_items distinct items and items with
    >= min_item_users distinct users (on engaged pairs); returns the surviving pairs."""
    pairs = events.filter(pl.col("level") > 0).select("user_id", "item_id").unique()
    while True:
        before = pairs.height
        if min_user_items:
            pairs = pairs.filter(pl.len().over("user_id") >= min_user_items)
        if min_item_users:
            pairs = pairs.filter(pl.len().over("item_id") >= min_item_users)
        if pairs.height == before:
            return pairs


def apply_filters(
    events: pl.DataFrame, cfg: FilterConfig
) -> tuple[pl.DataFrame, list[tuple[str, pl.DataFrame]]]:
    """Apply the configured filters; returns kept events and [(reason, removed rows)]."""
    removed: list[tuple[str, pl.DataFrame]] = []
    if cfg.outlier_users:
        bots = outlier_users(events, cfg.outlier_rate_factor)
        mask = pl.col("user_id").is_in(bots.implode())
        removed.append(("outlier_user", events.filter(mask)))
        events = events.filter(~mask)
    if cfg.min_user_items or cfg.min_item_users:
        core = k_core(events, cfg.min_user_items, cfg.min_item_users)
        users = core["user_id"].unique().implode()
        items = core["item_id"].unique().implode()
        mask = pl.col("user_id").is_in(users) & pl.col("item_id").is_in(items)
        removed.append(("kcore", events.filter(~mask)))
        events = events.filter(mask)
    return events, removed

"""Optional filters on clean events: outlier (bot-like) users and k-core.

Each returns (kept, removed) so the removed rows can be written to `filtered.parquet` with
their reason: a filter never silently drops data.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from recfb.etl.config import FilterConfig

_DAY_MS = 86_400_000


@dataclass(frozen=True)
class FilterDecision:
    """What the filters decided on the whole data, for a part of it (a shard of users) to
    apply: the event rate above which a user is an outlier, the k-core's users and items."""

    outlier_rate: float | None = None
    core_users: pl.Series | None = None
    core_items: pl.Series | None = None


def user_rates(events: pl.DataFrame) -> pl.DataFrame:
    """`user_id, rate`: each user's events per active day (at least one day)."""
    return events.group_by("user_id").agg(
        (
            pl.len() / ((pl.col("ts").max() - pl.col("ts").min()) / _DAY_MS).clip(lower_bound=1.0)
        ).alias("rate")
    )


def outlier_rate(rates: pl.DataFrame, factor: float) -> float:
    """The rate above which a user is an outlier: `factor` x the median user's."""
    return factor * rates["rate"].median()


def outlier_users(events: pl.DataFrame, factor: float) -> pl.Series:
    """Users whose events per active day exceed `factor` x the median user's rate."""
    rates = user_rates(events)
    return rates.filter(pl.col("rate") > outlier_rate(rates, factor))["user_id"]


def engaged_pairs(events: pl.DataFrame) -> pl.DataFrame:
    """The distinct (user, item) pairs with a positive level: what the k-core counts."""
    return events.filter(pl.col("level") > 0).select("user_id", "item_id").unique()


def k_core(events: pl.DataFrame, min_user_items: int, min_item_users: int) -> pl.DataFrame:
    """Iteratively keep users with >= min_user_items distinct items and items with
    >= min_item_users distinct users (on engaged pairs); returns the surviving pairs."""
    pairs = engaged_pairs(events)
    while True:
        before = pairs.height
        if min_user_items:
            pairs = pairs.filter(pl.len().over("user_id") >= min_user_items)
        if min_item_users:
            pairs = pairs.filter(pl.len().over("item_id") >= min_item_users)
        if pairs.height == before:
            return pairs


def apply_filters(
    events: pl.DataFrame, cfg: FilterConfig, decided: FilterDecision | None = None
) -> tuple[pl.DataFrame, list[tuple[str, pl.DataFrame]]]:
    """Apply the configured filters; returns kept events and [(reason, removed rows)].
    `decided`: the thresholds and the k-core found on the whole data (these events are a
    shard of its users), else found on `events`."""
    removed: list[tuple[str, pl.DataFrame]] = []
    if cfg.outlier_users:
        if decided is None:
            bots = outlier_users(events, cfg.outlier_rate_factor)
        else:
            rates = user_rates(events)
            bots = rates.filter(pl.col("rate") > decided.outlier_rate)["user_id"]
        mask = pl.col("user_id").is_in(bots.implode())
        removed.append(("outlier_user", events.filter(mask)))
        events = events.filter(~mask)
    if cfg.k_core:
        if decided is None:
            core = k_core(events, cfg.min_user_items, cfg.min_item_users)
            users = core["user_id"].unique().implode()
            items = core["item_id"].unique().implode()
        else:
            users, items = decided.core_users.implode(), decided.core_items.implode()
        mask = pl.col("user_id").is_in(users) & pl.col("item_id").is_in(items)
        removed.append(("kcore", events.filter(~mask)))
        events = events.filter(mask)
    return events, removed

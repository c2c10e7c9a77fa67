"""Splits: global temporal, leave-last-out per user, or none. Never a random shuffle.

Temporal: events before the valid cut train, events between the cuts validate, later
events test; each split's pair table folds only that window's events, as of the window's
end, so a pair that first appears in the future lands in the future and a label in train
never peeks past the train cut.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import polars as pl

from recfb.etl.config import SplitConfig
from recfb.etl.validate import to_ms

SPLITS = ("train", "valid", "test")
SPLIT_DTYPE = pl.Enum(SPLITS)


@dataclass(frozen=True)
class Windows:
    """Half-open windows [start, end) in epoch ms per split; `end` is the cut-off."""

    start: int
    valid_ms: int
    test_ms: int
    end: int

    def bounds(self, split: str) -> tuple[int, int]:
        return {
            "train": (self.start, self.valid_ms),
            "valid": (self.valid_ms, self.test_ms),
            "test": (self.test_ms, self.end),
        }[split]


def temporal_windows(ts: pl.Series, cfg: SplitConfig) -> Windows:
    """Cut points from explicit datetimes, else from quantiles of event time."""
    return windows_at(
        int(ts.min()),
        int(ts.max()) + 1,
        lambda q: int(ts.quantile(q, interpolation="lower")),
        cfg,
    )


def lower_rank(q: float, n: int) -> int:
    """The 0-based rank in sorted order of the `q` quantile of `n` values, interpolation
    "lower" (Polars'): what a distributed engine looks up without holding every value."""
    return math.floor(q * (n - 1))


def windows_at(start: int, end: int, quantile: Callable[[float], int], cfg: SplitConfig) -> Windows:
    """The windows over event times in [start, end), `quantile(q)` giving the "lower"
    quantile of every event time."""

    def cut(explicit, frac_after: float) -> int:
        if explicit is not None:
            return min(max(to_ms(explicit), start), end)
        if frac_after <= 0:
            return end
        return quantile(1.0 - frac_after)

    valid_ms = cut(cfg.valid_start, cfg.valid_frac + cfg.test_frac)
    test_ms = cut(cfg.test_start, cfg.test_frac)
    if cfg.valid_start is None and cfg.valid_frac == 0:
        valid_ms = test_ms
    return Windows(start, min(valid_ms, test_ms), test_ms, end)


def assign_temporal(events: pl.DataFrame, windows: Windows) -> pl.DataFrame:
    """`split` by event time: the number of cuts at or before the event picks the window
    (valid_ms <= test_ms), looked up by position rather than built as text and cast."""
    cuts_passed = (pl.col("ts") >= windows.valid_ms).cast(pl.UInt8) + (
        pl.col("ts") >= windows.test_ms
    ).cast(pl.UInt8)
    names = pl.Series(SPLITS, dtype=SPLIT_DTYPE)
    return events.with_columns(pl.lit(names).gather(cuts_passed).alias("split"))


def leave_last_out(pairs: pl.DataFrame) -> pl.DataFrame:
    """Per user: the latest positive pair -> test, the one before -> valid (when the user has
    at least 3 positive pairs), everything else (negatives, exposures) -> train."""
    candidates = pairs.filter(pl.col("label") > 0).sort(
        ["user_idx", "last_ts", "item_idx"], descending=[False, True, False]
    )
    ranked = candidates.with_columns(
        (pl.int_range(pl.len()).over("user_idx") + 1).alias("_rank"),
        pl.len().over("user_idx").alias("_n"),
    ).select(
        "user_idx",
        "item_idx",
        pl.when((pl.col("_rank") == 1) & (pl.col("_n") >= 2))
        .then(pl.lit("test"))
        .when((pl.col("_rank") == 2) & (pl.col("_n") >= 3))
        .then(pl.lit("valid"))
        .otherwise(pl.lit("train"))
        .alias("split"),
    )
    return pairs.join(ranked, on=["user_idx", "item_idx"], how="left").with_columns(
        pl.col("split").fill_null("train")
    )


def leave_last_deepest(pairs: pl.DataFrame, deepest: int) -> pl.DataFrame:
    """Per user: the latest pair at the deepest level (by `last_ts`: the caller passes the
    time of the pair's last deepest-level event) -> test when the
    user has another positive pair, the one before -> valid when the user has two deepest
    pairs; `user_idx, item_idx, split` of the held-out pairs only (their deepest-level events
    are held out; the pair's shallower events stay in train)."""
    positives = pairs.filter(pl.col("label") > 0).group_by("user_idx").agg(pl.len().alias("_pos"))
    ranked = (
        pairs.filter(pl.col("label") == deepest)
        .sort(["user_idx", "last_ts", "item_idx"], descending=[False, True, False])
        .join(positives, on="user_idx")
        .with_columns(
            (pl.int_range(pl.len()).over("user_idx") + 1).alias("_rank"),
            pl.len().over("user_idx").alias("_n"),
        )
    )
    return ranked.select(
        "user_idx",
        "item_idx",
        pl.when((pl.col("_rank") == 1) & (pl.col("_pos") >= 2))
        .then(pl.lit("test"))
        .when((pl.col("_rank") == 2) & (pl.col("_n") >= 2) & (pl.col("_pos") >= 3))
        .then(pl.lit("valid"))
        .alias("split"),
    ).drop_nulls("split")

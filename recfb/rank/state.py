"""What is known at one moment: the folded pair state and the raw events before a cut-off.

The two-stage recommender computes everything from a `Snapshot`: exclusions and the cascade
graph from the folded pairs (refunds and undos applied, as the ETL folds them), features and
the history source from the events. Offline a snapshot is cut from an ETL output (train for
fitting the ranker on the valid window, train + valid for scoring the test window); online the
service builds the same from its bundle plus the event log.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from recfb.errors import InputError
from recfb.etl.interactions import Interactions, as_interactions, source_label
from recfb.etl.signals import exclusion_labels

EVENT_COLUMNS = ["user_idx", "item_idx", "event", "level", "ts_ms"]
PAIR = ["user_idx", "item_idx"]


@dataclass
class Snapshot:
    """Pairs (`user_idx, item_idx, label`) and events (`EVENT_COLUMNS`) as of `now_ms`."""

    pairs: pl.DataFrame
    events: pl.DataFrame
    now_ms: int
    n_users: int
    n_items: int
    spec: dict  # the resolved signal map
    category: np.ndarray | None = None  # item -> category code (-1 unknown)
    time_cut: bool = True  # False: leave-last-out, held-out events lie inside the log

    @property
    def n_levels(self) -> int:
        return len(self.spec["levels"])

    @property
    def hidden_labels(self) -> tuple[int, ...]:
        return exclusion_labels(self.spec)

    @property
    def signal_names(self) -> list[str]:
        return list(self.spec["signals"])

    @property
    def level_names(self) -> list[str]:
        return [lv["name"] for lv in self.spec["levels"]]

    def hidden_pairs(self) -> pl.DataFrame:
        """`user_idx, item_idx` that must not be recommended to their user."""
        return self.pairs.filter(pl.col("label").is_in(list(self.hidden_labels))).select(PAIR)


def canonical_events(
    frame: pl.DataFrame | pl.LazyFrame, with_cancellation: bool = False
) -> pl.LazyFrame:
    """The ETL's event table in the snapshot's columns (event names as strings, ms times)."""
    cols = [
        pl.col("user_idx").cast(pl.Int64),
        pl.col("item_idx").cast(pl.Int64),
        pl.col("event").cast(pl.String),
        pl.col("level").cast(pl.Int8),
        pl.col("ts").cast(pl.Datetime("ms")).dt.epoch("ms").alias("ts_ms"),
    ]
    if with_cancellation:
        cols.append(
            pl.col("cancelled_at").cast(pl.Datetime("ms")).dt.epoch("ms").alias("cancelled_ms")
        )
    return frame.lazy().select(cols)


def item_categories(etl: str | Path | Interactions, n_items: int) -> np.ndarray | None:
    """Dense category codes per item (-1 unknown), or None where the ETL has no category."""
    events = as_interactions(etl).events
    if "category" not in events.collect_schema():
        return None
    cats = (
        events.select("item_idx", "category")
        .drop_nulls()
        .group_by("item_idx")
        .agg(pl.col("category").first())
        .collect()
    )
    codes = np.full(n_items, -1, dtype=np.int64)
    dense = cats["category"].cast(pl.String).rank("dense").cast(pl.Int64).to_numpy() - 1
    codes[cats["item_idx"].to_numpy().astype(np.int64)] = dense
    return codes


def cut_points(stats: dict) -> tuple[int | None, int | None, int]:
    """(valid start, test start, end) in epoch ms from the ETL's stats (None: no time cut)."""

    def ms(value: str | None) -> int | None:
        if value is None:
            return None
        return int(pl.Series([value]).str.to_datetime(time_unit="ms").dt.epoch("ms")[0])

    split = stats.get("split", {})
    end = ms(split.get("end")) or ms(stats.get("time_range", {}).get("last"))
    if end is None:
        raise InputError("stats.json has no split end or time range", field="split.end")
    return ms(split.get("valid_start")), ms(split.get("test_start")), end + 1


def fold_at(events: pl.DataFrame, cut_ms: int, spec: dict) -> pl.DataFrame:
    """`user_idx, item_idx, label` of the events before `cut_ms`, folded as the ETL folds a
    window (its cancellation links, `cancelled_at`, are reused): the deepest level still
    active, or -1 when an explicit negative (a dislike, a refund that falls back to negative)
    is at least as recent as the newest active positive. Used for snapshots at cuts the ETL
    did not make (the ranker's extra label windows); a test holds it to the ETL's own fold."""
    negative = [n for n, s in spec["signals"].items() if s.get("negative")]
    negative += [
        n
        for n, s in spec["signals"].items()
        if s.get("cancels") and s.get("fallback") == "negative"
    ]
    level_of = {lv["name"]: t for t, lv in enumerate(spec["levels"], start=1)}
    lifts = {
        n: level_of[s["fallback"]]
        for n, s in spec["signals"].items()
        if s.get("cancels") and s.get("fallback") not in (None, "negative")
    }
    before = events.filter(pl.col("ts_ms") < cut_ms)
    active = pl.col("cancelled_ms").is_null() | (pl.col("cancelled_ms") >= cut_ms)
    positive = (pl.col("level") > 0) & active
    neg = pl.col("event").is_in(negative) & active
    lift = pl.col("event").replace_strict(lifts, default=0, return_dtype=pl.Int8)
    folded = before.group_by(PAIR).agg(
        pl.col("level").filter(positive).max().fill_null(0).alias("_lv"),
        lift.max().alias("_lift"),
        pl.col("ts_ms").filter(positive).max().alias("_pos"),
        pl.col("ts_ms").filter(neg).max().alias("_neg"),
    )
    is_neg = pl.col("_neg").is_not_null() & (
        pl.col("_pos").is_null() | (pl.col("_neg") >= pl.col("_pos"))
    )
    return folded.select(
        *PAIR,
        pl.when(is_neg)
        .then(-1)
        .otherwise(pl.max_horizontal("_lv", "_lift"))
        .cast(pl.Int8)
        .alias("label"),
    )


def _spec(data: Interactions) -> dict:
    """The resolved signal map the ETL recorded."""
    spec = data.stats.get("signal_map_spec")
    if spec is None:
        raise InputError(
            "stats.json has no 'signal_map_spec'; rerun `recfb etl`",
            file=source_label(data),
            field="signal_map_spec",
        )
    return spec


def snapshot_at(etl: str | Path | Interactions, cut_ms: int) -> Snapshot:
    """The state at any cut (events before it, pairs folded by `fold_at`); `etl` is an ETL
    output directory or an `Interactions`."""
    data = as_interactions(etl)
    spec = _spec(data)
    events = (
        data.events.filter(pl.col("ts").cast(pl.Datetime("ms")).dt.epoch("ms") < cut_ms)
        .pipe(canonical_events, with_cancellation=True)
        .collect()
    )
    return Snapshot(
        pairs=fold_at(events, cut_ms, spec),
        events=events.drop("cancelled_ms"),
        now_ms=int(cut_ms),
        n_users=data.n_users,
        n_items=data.n_items,
        spec=spec,
        category=item_categories(data, data.n_items),
    )


def snapshot_from_etl(etl: str | Path | Interactions, upto: str) -> Snapshot:
    """The state before the valid window (`upto="train"`: what the ranker learns from) or
    before the test window (`upto="valid"`: train + valid folded, what the test is scored on).

    With a temporal split the cut is the window's start; with leave-last-out (no time cut)
    the snapshot holds every event of its splits and `now` is the end of the log. `etl` is
    an ETL output directory or an `Interactions`."""
    data = as_interactions(etl)
    valid_ms, test_ms, end_ms = cut_points(data.stats)
    if upto == "train":
        splits, pairs, now = ["train"], data.train, valid_ms
    elif upto == "valid":
        splits, pairs, now = ["train", "valid"], data.with_valid_in_train().train, test_ms
    else:
        raise ValueError(f"upto must be 'train' or 'valid', got {upto!r}")
    events = (
        data.events.filter(pl.col("split").cast(pl.String).is_in(splits))
        .pipe(canonical_events)
        .collect()
    )
    time_cut = now is not None
    if now is None:
        now = end_ms
    return Snapshot(
        pairs=pairs.select(PAIR + ["label"]).with_columns(pl.col(PAIR).cast(pl.Int64)),
        events=events,
        now_ms=int(now),
        n_users=data.n_users,
        n_items=data.n_items,
        spec=_spec(data),
        category=item_categories(data, data.n_items),
        time_cut=time_cut,
    )

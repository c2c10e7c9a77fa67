"""Features of (user, candidate item) pairs: one module, used offline and in the service.

Everything is computed from a snapshot's events as of `now_ms` (`recfb.rank.state`), so the
ranker sees in production exactly what it learnt from: an item carted a second ago counts as
soon as the event log has it. Groups (the ablation drops one at a time):

- ``pair``: the pair's history: events per raw signal, deepest level reached, hours since the
  last event of each level and since the first event;
- ``item``: events per level over recent windows and all time, distinct users, trending (the
  last day against the window's daily mean), CVR and refund rate (delay-corrected where the
  log has a conversion cascade, `recfb.delayed`);
- ``user``: activity (events, items, the last day), the share of the user's events at the
  deepest level, hours since the user's last event;
- ``category``: the share of the user's events in the candidate's category;
- ``source``: each candidate source's score and rank (missing where it did not propose it)
  and how many sources proposed the pair.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from recfb.rank.config import SOURCES
from recfb.rank.state import PAIR, Snapshot

HOUR_MS = 3_600_000.0
DAY_MS = 24 * HOUR_MS


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c == "_" else "_" for c in name)


def feature_columns(snap: Snapshot, groups: list[str], windows: list[float]) -> list[str]:
    """The ranker's columns in a fixed order (what the bundle records with the model)."""
    levels = [_safe(n) for n in snap.level_names]
    cols: list[str] = []
    if "pair" in groups:
        cols += [f"pair_n_{_safe(s)}" for s in snap.signal_names]
        cols += ["pair_max_level", "pair_n_events", "pair_h_since_first"]
        cols += [f"pair_h_since_{lv}" for lv in levels]
    if "item" in groups:
        for w in [*windows, None]:
            tag = "all" if w is None else f"{w:g}d"
            cols += [f"item_n_{lv}_{tag}" for lv in levels]
        cols += ["item_users", "item_trend", "item_cvr", "item_refund_rate"]
    if "user" in groups:
        cols += ["user_n_events", "user_n_items", "user_n_events_1d", "user_deep_share"]
        cols += ["user_h_since_last"]
    if "category" in groups and snap.category is not None:
        cols += ["cat_user_share"]
    if "source" in groups:
        cols += [f"{s}_{kind}" for s in SOURCES for kind in ("score", "rank")]
        cols += ["n_sources"]
    return cols


def item_stats(
    snap: Snapshot, windows: list[float], rates: pl.DataFrame | None = None
) -> pl.DataFrame:
    """One row per item (all `n_items`, in order): the ``item`` group's columns as of `now`.

    `rates` (``item_idx, cvr, refund_rate``) are the delay-corrected rates; without them the
    naive rates (deepest-level events over first-level events, with one pseudo-trial at the
    catalogue's rate) are used."""
    levels = [_safe(n) for n in snap.level_names]
    ev = snap.events.lazy()
    aggs = []
    for w in [*windows, None]:
        tag = "all" if w is None else f"{w:g}d"
        recent = pl.lit(True) if w is None else pl.col("ts_ms") >= snap.now_ms - w * DAY_MS
        for t, lv in enumerate(levels, start=1):
            aggs.append(((pl.col("level") == t) & recent).sum().alias(f"item_n_{lv}_{tag}"))
    aggs.append(pl.col("user_idx").filter(pl.col("level") > 0).n_unique().alias("item_users"))
    aggs.append(pl.len().alias("_n_all"))
    aggs.append((pl.col("ts_ms") >= snap.now_ms - DAY_MS).sum().alias("_n_1d"))
    span = max(windows) if windows else 7.0
    aggs.append((pl.col("ts_ms") >= snap.now_ms - span * DAY_MS).sum().alias("_n_span"))
    grouped = ev.group_by("item_idx").agg(aggs).collect()
    out = (
        pl.DataFrame({"item_idx": np.arange(snap.n_items, dtype=np.int64)})
        .join(grouped, on="item_idx", how="left")
        .fill_null(0)
    )
    out = out.with_columns(
        ((pl.col("_n_1d") + 1) / (pl.col("_n_span") / span + 1)).alias("item_trend")
    )
    first, deepest = f"item_n_{levels[0]}_all", f"item_n_{levels[-1]}_all"
    if rates is not None:
        out = out.join(rates.select("item_idx", "cvr", "refund_rate"), on="item_idx", how="left")
        out = out.rename({"cvr": "item_cvr", "refund_rate": "item_refund_rate"})
    else:
        total_first = max(float(out[first].sum()), 1.0)
        base = float(out[deepest].sum()) / total_first
        out = out.with_columns(
            ((pl.col(deepest) + base) / (pl.col(first) + 1)).alias("item_cvr"),
            pl.lit(None, dtype=pl.Float64).alias("item_refund_rate"),
        )
    return out.drop("_n_all", "_n_1d", "_n_span").sort("item_idx")


class ItemTable:
    """Item statistics as one float32 matrix (rows = item_idx), so a request gathers its
    candidates' rows without touching the frame."""

    def __init__(self, frame: pl.DataFrame) -> None:
        self.frame = frame.sort("item_idx")
        self.names = [c for c in self.frame.columns if c != "item_idx"]
        self.column = {name: j for j, name in enumerate(self.names)}
        self.matrix = (
            self.frame.select(pl.col(self.names).cast(pl.Float32).fill_null(np.nan))
            .to_numpy()
            .astype(np.float32)
        )


def pair_history(events: pl.LazyFrame, now_ms: int, snap: Snapshot) -> pl.LazyFrame:
    """The ``pair`` group for every (user, item) with events: counts, depth, recency."""
    aggs = [(pl.col("event") == s).sum().alias(f"pair_n_{_safe(s)}") for s in snap.signal_names]
    aggs += [
        pl.col("level").max().cast(pl.Int32).alias("pair_max_level"),
        pl.len().alias("pair_n_events"),
        ((now_ms - pl.col("ts_ms").min()) / HOUR_MS).alias("pair_h_since_first"),
    ]
    for t, name in enumerate(snap.level_names, start=1):
        last = pl.col("ts_ms").filter(pl.col("level") == t).max()
        aggs.append(((now_ms - last) / HOUR_MS).alias(f"pair_h_since_{_safe(name)}"))
    return events.group_by(PAIR).agg(aggs)


def user_activity(events: pl.LazyFrame, now_ms: int, n_levels: int) -> pl.LazyFrame:
    """The ``user`` group per user with events."""
    return events.group_by("user_idx").agg(
        pl.len().alias("user_n_events"),
        pl.col("item_idx").n_unique().alias("user_n_items"),
        (pl.col("ts_ms") >= now_ms - DAY_MS).sum().alias("user_n_events_1d"),
        (pl.col("level") == n_levels).mean().alias("user_deep_share"),
        ((now_ms - pl.col("ts_ms").max()) / HOUR_MS).alias("user_h_since_last"),
    )


def build_features(
    candidates: pl.DataFrame,
    events: pl.DataFrame,
    items: ItemTable,
    snap: Snapshot,
    now_ms: int,
    columns: list[str],
) -> np.ndarray:
    """Feature matrix (float32, one row per candidate in order, `columns` in order; NaN =
    missing) for `candidates` (``user_idx, item_idx`` and each source's score and rank),
    from the candidate users' `events` as of `now_ms` and the `items` statistics."""
    # one lazy query for every group: a request's few rows pay one collect, not one a step
    ev = events.lazy().filter(pl.col("user_idx").is_in(candidates["user_idx"].unique().implode()))
    plan = candidates.lazy().with_row_index("_row")
    plan = plan.join(pair_history(ev, now_ms, snap), on=PAIR, how="left")
    plan = plan.join(user_activity(ev, now_ms, snap.n_levels), on="user_idx", how="left")
    if "cat_user_share" in columns and snap.category is not None:
        cat = pl.Series("cat", snap.category)
        shares = (
            ev.with_columns(pl.col("item_idx").map_batches(lambda s: cat.gather(s)).alias("cat"))
            .group_by("user_idx", "cat")
            .agg(pl.len().alias("_n"))
            .with_columns(
                (pl.col("_n") / pl.col("_n").sum().over("user_idx")).alias("cat_user_share")
            )
            .select("user_idx", "cat", "cat_user_share")
        )
        plan = plan.with_columns(
            pl.col("item_idx").map_batches(lambda s: cat.gather(s)).alias("cat")
        ).join(shares, on=["user_idx", "cat"], how="left")
    names = plan.collect_schema().names()
    counts = [c for c in names if c.startswith("pair_n_")] + ["pair_max_level", "cat_user_share"]
    present = [f"{s}_rank" for s in SOURCES if f"{s}_rank" in names]
    frame = (
        plan.with_columns([pl.col(c).fill_null(0) for c in counts if c in names])
        .with_columns(
            pl.sum_horizontal([pl.col(c).is_not_null() for c in present]).alias("n_sources")
        )
        .sort("_row")
        .collect()
    )
    out = np.full((frame.height, len(columns)), np.nan, dtype=np.float32)
    item_rows = frame["item_idx"].to_numpy().astype(np.int64)
    own = [(j, c) for j, c in enumerate(columns) if c in frame.columns]
    if own:  # one conversion for every column the frame holds (a request has few rows)
        block = frame.select(pl.col(c).cast(pl.Float32) for _, c in own).to_numpy()
        out[:, [j for j, _ in own]] = block  # nulls arrive as NaN
    from_items = [(j, items.column[c]) for j, c in enumerate(columns) if c in items.column]
    from_items = [(j, k) for j, k in from_items if columns[j] not in frame.columns]
    if from_items:
        out[:, [j for j, _ in from_items]] = items.matrix[
            np.ix_(item_rows, [k for _, k in from_items])
        ]
    return out

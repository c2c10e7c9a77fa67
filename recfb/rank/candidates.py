"""Candidate sources: each proposes items per user with its score and rank kept.

- ``history``: the user's own engaged items that the exclusion rule does not hide (viewed,
  carted, liked but not bought), deepest level first, then the newest: most of what a shopper
  buys next is here;
- ``cascade``: the cascaded multi-behaviour walk (`recfb.models.cascade`);
- ``embedding``: an embedding model's top items (exact offline; the FAISS index online);
- ``popularity``: trending items, what a user with no history is shown.
Every source masks the hidden pairs itself, so a candidate is always servable.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import polars as pl

from recfb.rank.config import SOURCES
from recfb.rank.features import DAY_MS, HOUR_MS
from recfb.rank.state import PAIR, Snapshot

ScoreFn = Callable[[Any], Any]  # LongTensor (B,) -> (B, n_items); torch only offline


def _ranked(frame: pl.DataFrame | pl.LazyFrame, source: str, n: int) -> pl.DataFrame:
    """Keep each user's n best by score; add the 1-based rank; name the columns by source
    (one lazy query: a request's handful of rows pays one collect, not one per step)."""
    return (
        frame.lazy()
        .sort(["user_idx", "score", "item_idx"], descending=[False, True, False])
        .with_columns((pl.int_range(pl.len()).over("user_idx") + 1).alias("rank"))
        .filter(pl.col("rank") <= n)
        .select(
            pl.col("user_idx").cast(pl.Int64),
            pl.col("item_idx").cast(pl.Int64),
            pl.col("score").cast(pl.Float32).alias(f"{source}_score"),
            pl.col("rank").cast(pl.Int32).alias(f"{source}_rank"),
        )
        .collect()
    )


def history_score(max_level: pl.Expr, hours_since_last: pl.Expr) -> pl.Expr:
    """Deepest level first, then the newest (a day's half-life breaks ties within a level)."""
    return max_level.cast(pl.Float64) + pl.lit(0.5).pow(hours_since_last / 24.0)


def history_candidates(
    events: pl.DataFrame, hidden: pl.DataFrame, now_ms: int, n: int
) -> pl.DataFrame:
    """The users' own engaged items minus the hidden pairs, best `n` by `history_score`."""
    if n == 0 or events.height == 0:
        return _ranked(
            pl.DataFrame(schema={**dict.fromkeys(PAIR, pl.Int64), "score": pl.Float64}),
            "history",
            0,
        )
    pairs = (
        events.lazy()
        .filter(pl.col("level") > 0)
        .group_by(PAIR)
        .agg(pl.col("level").max().alias("_lv"), pl.col("ts_ms").max().alias("_last"))
    )
    if hidden.height:
        pairs = pairs.join(hidden.lazy(), on=PAIR, how="anti")
    pairs = pairs.with_columns(
        history_score(pl.col("_lv"), (now_ms - pl.col("_last")) / HOUR_MS).alias("score")
    )
    return _ranked(pairs.select(*PAIR, "score"), "history", n)


def topn_candidates(
    score: ScoreFn, users: np.ndarray, snap: Snapshot, n: int, source: str
) -> pl.DataFrame:
    """The best `n` unhidden items per user of a full-catalogue scorer (offline)."""
    from recfb.evaluate import EvalConfig, topk_items  # torch: kept out of the service

    config = EvalConfig(ks=(max(n, 1),), exclude="signals", hidden_labels=snap.hidden_labels)
    items, scores = topk_items(score, snap.n_items, users, snap.pairs, config, max(n, 1))
    n_users, width = items.shape
    frame = pl.DataFrame(
        {
            "user_idx": np.repeat(users.astype(np.int64), width),
            "item_idx": items.reshape(-1).numpy(),
            "score": scores.reshape(-1).numpy(),
        }
    ).filter((pl.col("item_idx") >= 0) & pl.col("score").is_finite())
    return _ranked(frame, source, n)


def trending_scores(snap: Snapshot, window_days: float = 7.0) -> np.ndarray:
    """Distinct users with a positive event on each item in the last `window_days`, plus a
    small all-time share that breaks ties and keeps a quiet catalogue ranked."""
    recent = snap.events.filter(
        (pl.col("level") > 0) & (pl.col("ts_ms") >= snap.now_ms - window_days * DAY_MS)
    )
    out = np.zeros(snap.n_items)
    for frame, scale in ((recent, 1.0), (snap.events.filter(pl.col("level") > 0), 1e-3)):
        counts = frame.group_by("item_idx").agg(pl.col("user_idx").n_unique().alias("n"))
        np.add.at(
            out, counts["item_idx"].to_numpy().astype(np.int64), scale * counts["n"].to_numpy()
        )
    return out.astype(np.float32)


def merge_sources(frames: dict[str, pl.DataFrame]) -> pl.DataFrame:
    """One row per (user, item) proposed by any source, with every source's score and rank
    (null where a source did not propose it), sorted by user (the ranker's query groups)."""
    columns = [f"{s}_{kind}" for s in SOURCES for kind in ("score", "rank")]
    schema = {**dict.fromkeys(PAIR, pl.Int64)}
    for s in SOURCES:
        schema |= {f"{s}_score": pl.Float32, f"{s}_rank": pl.Int32}
    parts = [pl.DataFrame(schema=schema), *frames.values()]
    # one group-by over the stacked lists instead of a join per source: each source gives a
    # pair at most once, so `first` non-null is its value
    return (
        pl.concat([p.lazy() for p in parts], how="diagonal_relaxed")
        .group_by(PAIR)
        .agg(pl.col(c).drop_nulls().first() for c in columns)
        .select(*PAIR, *columns)  # one column order, whatever ran
        .sort(PAIR)
        .collect()
    )

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
from recfb.rank.features import (
    DAY_MS,
    HOUR_MS,
    CandidateSet,
    EventArrays,
    Groups,
    run_starts,
    sorted_unique,
)
from recfb.rank.state import Snapshot

ScoreFn = Callable[[Any], Any]  # LongTensor (B,) -> (B, n_items); torch only offline


def ranked(
    user: np.ndarray, item: np.ndarray, score: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each user's `n` best by score (ties: the lower item index), with the 1-based rank:
    (user, item, score, rank), sorted by user then rank."""
    order = np.lexsort((item, -score, user))
    user, item, score = user[order], item[order], score[order]
    starts = np.flatnonzero(run_starts(user))
    rank = np.arange(len(user)) - np.repeat(starts, np.diff(np.append(starts, len(user)))) + 1
    keep = rank <= n
    return user[keep], item[keep], score[keep], rank[keep]


def _frame(
    source: str, user: np.ndarray, item: np.ndarray, score: np.ndarray, rank: np.ndarray
) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "user_idx": pl.Series(user, dtype=pl.Int64),
            "item_idx": pl.Series(item, dtype=pl.Int64),
            f"{source}_score": pl.Series(score, dtype=pl.Float32),
            f"{source}_rank": pl.Series(rank, dtype=pl.Int32),
        }
    )


def _ranked(frame: pl.DataFrame, source: str, n: int) -> pl.DataFrame:
    """`ranked` over a frame's ``user_idx, item_idx, score``, columns named by source."""
    parts = ranked(
        frame["user_idx"].cast(pl.Int64).to_numpy(),
        frame["item_idx"].cast(pl.Int64).to_numpy(),
        frame["score"].cast(pl.Float64).to_numpy(),
        n,
    )
    return _frame(source, *parts)


def history_score(max_level: np.ndarray, hours_since_last: np.ndarray) -> np.ndarray:
    """Deepest level first, then the newest (a day's half-life breaks ties within a level)."""
    return max_level.astype(np.float64) + 0.5 ** (hours_since_last / 24.0)


def history_arrays(
    events: EventArrays, hidden_keys: np.ndarray | None, now_ms: int, n: int, n_items: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The users' own engaged items minus the hidden pairs (`user * n_items + item`, sorted),
    best `n` by `history_score`: (user, item, score, rank)."""
    positive = events.take(events.level > 0) if len(events) else events
    if n == 0 or len(positive) == 0:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty, np.empty(0), empty
    groups = Groups.of(positive.user * n_items + positive.item)
    keys = groups.keys
    level, last = groups.max(positive.level), groups.max(positive.ts)
    if hidden_keys is not None and len(hidden_keys):
        keep = ~np.isin(keys, hidden_keys)
        keys, level, last = keys[keep], level[keep], last[keep]
    score = history_score(level, (now_ms - last) / HOUR_MS)
    return ranked(keys // n_items, keys % n_items, score, n)


def history_candidates(
    events: pl.DataFrame, hidden: pl.DataFrame, now_ms: int, n: int, snap: Snapshot
) -> pl.DataFrame:
    """The users' own engaged items minus the `hidden` pairs, best `n` by `history_score`."""
    arrays = EventArrays.from_frame(events, snap.signal_names)
    hidden_keys = None
    if hidden.height:
        hidden_keys = (
            hidden["user_idx"].cast(pl.Int64).to_numpy() * snap.n_items
            + hidden["item_idx"].cast(pl.Int64).to_numpy()
        )
    return _frame("history", *history_arrays(arrays, hidden_keys, now_ms, n, snap.n_items))


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


def merge_arrays(
    parts: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
) -> CandidateSet:
    """One row per (user, item) proposed by any source (`parts`: source -> user, item,
    score, rank), sorted by user then item, with every source's score and rank."""
    users = [p[0] for p in parts.values()]
    items = [p[1] for p in parts.values()]
    user = np.concatenate(users).astype(np.int64) if users else np.empty(0, np.int64)
    item = np.concatenate(items).astype(np.int64) if items else np.empty(0, np.int64)
    width = int(item.max()) + 1 if len(item) else 1
    # one key per pair, ascending by (user, item); floor division keeps a new user's -1
    keys = sorted_unique(user * width + item)
    scores = np.full((len(keys), len(SOURCES)), np.nan, dtype=np.float32)
    ranks = np.full((len(keys), len(SOURCES)), np.nan, dtype=np.float32)
    for source, (u, i, s, r) in parts.items():
        rows = np.searchsorted(keys, u.astype(np.int64) * width + i.astype(np.int64))
        scores[rows, SOURCES.index(source)] = s
        ranks[rows, SOURCES.index(source)] = r
    return CandidateSet(keys // width, keys % width, scores, ranks)


def merge_sources(frames: dict[str, pl.DataFrame]) -> pl.DataFrame:
    """`merge_arrays` over each source's frame (``user_idx, item_idx, {source}_score,
    {source}_rank``), as a frame with every source's score and rank (null: not proposed)."""
    parts = {
        source: (
            frame["user_idx"].cast(pl.Int64).to_numpy(),
            frame["item_idx"].cast(pl.Int64).to_numpy(),
            frame[f"{source}_score"].cast(pl.Float32).to_numpy(),
            frame[f"{source}_rank"].cast(pl.Float32).to_numpy(),
        )
        for source, frame in frames.items()
    }
    return merge_arrays(parts).to_frame()

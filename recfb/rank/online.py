"""The two-stage recommender inside the service: the same candidates and features as offline.

A bundle's rank files (`rank.json`, `ranker.txt`, `item_stats.parquet`, `history.parquet`,
`cascade_candidates.parquet`) hold what the offline snapshot knew at publication; a request
adds the user's logged events, so an item carted a second ago is a history candidate at once
and every pair feature counts it. The cascade walk over the whole graph is too slow for a
request, so its candidates are computed for every known user when the bundle is written; new
users get history, embedding (fold-in) and popularity candidates. No torch here.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl

from recfb.rank.candidates import history_candidates, merge_sources
from recfb.rank.features import ItemTable, build_features
from recfb.rank.ranker import Ranker
from recfb.rank.state import EVENT_COLUMNS, PAIR, Snapshot

RANK_FILES = (
    "rank.json",
    "ranker.txt",
    "item_stats.parquet",
    "history.parquet",
    "cascade_candidates.parquet",
)
NEW_USER = -1  # user_idx of a user the bundle does not know
_EVENT_SCHEMA = {
    "user_idx": pl.Int64,
    "item_idx": pl.Int64,
    "event": pl.String,
    "level": pl.Int8,
    "ts_ms": pl.Int64,
}


def _by_user(frame: pl.DataFrame) -> tuple[pl.DataFrame, dict[int, tuple[int, int]]]:
    """The frame sorted by user with each user's (offset, length): a request slices its rows."""
    frame = frame.sort("user_idx", maintain_order=True)
    counts = frame.group_by("user_idx", maintain_order=True).len()
    users = counts["user_idx"].to_numpy()
    lengths = counts["len"].to_numpy()
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    spans = {int(u): (int(o), int(n)) for u, o, n in zip(users, offsets, lengths, strict=True)}
    return frame, spans


class OnlineRanker:
    """Candidates -> features -> LambdaRank for one request, from a bundle directory."""

    def __init__(self, path: Path, spec: dict, category: np.ndarray | None) -> None:
        meta = json.loads((path / "rank.json").read_text())
        self.meta = meta
        self.columns: list[str] = meta["columns"]
        self.sizes: dict[str, int] = meta["sources"]
        self.ranker = Ranker.load(path / "ranker.txt", self.columns)
        self.items = ItemTable(pl.read_parquet(path / "item_stats.parquet"))
        self.snap = Snapshot(
            pairs=pl.DataFrame(schema={**dict.fromkeys(PAIR, pl.Int64), "label": pl.Int8}),
            events=pl.DataFrame(schema=_EVENT_SCHEMA),
            now_ms=int(meta["now_ms"]),
            n_users=int(meta["n_users"]),
            n_items=len(self.items.frame),
            spec=spec,
            category=category,
        )
        self.history, self.history_span = _by_user(
            pl.read_parquet(path / "history.parquet").select(EVENT_COLUMNS).cast(_EVENT_SCHEMA)
        )
        cascade = pl.read_parquet(path / "cascade_candidates.parquet")
        self.cascade, self.cascade_span = _by_user(cascade)
        trend = self.items.matrix[:, self.items.column["trend_score"]]
        self.popular = np.argsort(-trend, kind="stable")
        self.trend = trend

    def user_events(
        self, user_row: int | None, logged: list[tuple[int, str, int, int]]
    ) -> pl.DataFrame:
        """The bundle's history of the user plus the logged events (item row, event name,
        level, ts ms) as one event frame."""
        uid = NEW_USER if user_row is None else user_row
        parts = []
        if user_row is not None and user_row in self.history_span:
            offset, length = self.history_span[user_row]
            parts.append(self.history.slice(offset, length))
        if logged:
            items, names, levels, ts = zip(*logged, strict=True)
            parts.append(
                pl.DataFrame(
                    {
                        "user_idx": [uid] * len(items),
                        "item_idx": list(items),
                        "event": list(names),
                        "level": list(levels),
                        "ts_ms": list(ts),
                    },
                    schema=_EVENT_SCHEMA,
                )
            )
        if not parts:
            return self.snap.events
        return pl.concat(parts).with_columns(pl.lit(uid, pl.Int64).alias("user_idx"))

    def candidates(
        self,
        user_row: int | None,
        events: pl.DataFrame,
        search: Callable[[int], tuple[list[int], list[float]]] | None,
        excluded: set[int],
        now_ms: int,
    ) -> pl.DataFrame:
        """Every source's candidates for one user (excluded items removed)."""
        uid = NEW_USER if user_row is None else user_row
        frames: dict[str, pl.DataFrame] = {}
        empty_hidden = pl.DataFrame(schema=dict.fromkeys(PAIR, pl.Int64))
        if self.sizes.get("history"):
            frames["history"] = history_candidates(
                events, empty_hidden, now_ms, self.sizes["history"] + len(excluded)
            )
        if user_row is not None and user_row in self.cascade_span and self.sizes.get("cascade"):
            offset, length = self.cascade_span[user_row]
            frames["cascade"] = self.cascade.slice(offset, length)
        if search is not None and self.sizes.get("embedding"):
            rows, scores = search(self.sizes["embedding"])
            frames["embedding"] = _listed(uid, rows, scores, "embedding")
        if self.sizes.get("popularity"):
            n = self.sizes["popularity"] + len(excluded)
            top = self.popular[:n]
            frames["popularity"] = _listed(
                uid, top.tolist(), self.trend[top].tolist(), "popularity"
            )
        merged = merge_sources(frames)
        if excluded:
            merged = merged.filter(~pl.col("item_idx").is_in(list(excluded)))
        return merged

    def features(self, cands: pl.DataFrame, events: pl.DataFrame, now_ms: int) -> np.ndarray:
        return build_features(cands, events, self.items, self.snap, now_ms, self.columns)

    def rank(
        self,
        user_row: int | None,
        logged: list[tuple[int, str, int, int]],
        search: Callable[[int], tuple[list[int], list[float]]] | None,
        excluded: set[int],
        allowed: np.ndarray | None,
        k: int,
        now_ms: int,
    ) -> tuple[list[int], list[float], dict[str, float]]:
        """Top-k item rows and ranker scores; seconds per part (candidates, features, score)."""
        t0 = time.perf_counter()
        events = self.user_events(user_row, logged)
        cands = self.candidates(user_row, events, search, excluded, now_ms)
        if allowed is not None:
            cands = cands.filter(pl.col("item_idx").is_in(allowed.tolist()))
        t1 = time.perf_counter()
        x = self.features(cands, events, now_ms)
        t2 = time.perf_counter()
        scores = self.ranker.predict(x, num_threads=1)
        order = np.argsort(-scores, kind="stable")[:k]
        items = cands["item_idx"].to_numpy()
        t3 = time.perf_counter()
        timing = {"candidates": t1 - t0, "features": t2 - t1, "ranker": t3 - t2}
        return items[order].tolist(), scores[order].tolist(), timing


def _listed(uid: int, rows: list[int], scores: list[float], source: str) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "user_idx": [uid] * len(rows),
            "item_idx": rows,
            f"{source}_score": scores,
            f"{source}_rank": list(range(1, len(rows) + 1)),
        },
        schema={
            "user_idx": pl.Int64,
            "item_idx": pl.Int64,
            f"{source}_score": pl.Float32,
            f"{source}_rank": pl.Int32,
        },
    )

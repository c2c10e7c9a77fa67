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

from recfb.rank.candidates import history_arrays, merge_arrays
from recfb.rank.features import CandidateSet, EventArrays, ItemTable, feature_matrix
from recfb.rank.ranker import Ranker, compiled_predictor
from recfb.rank.state import EVENT_COLUMNS, PAIR, Snapshot

RANK_FILES = (
    "rank.json",
    "ranker.txt",
    "item_stats.parquet",
    "history.parquet",
    "cascade_candidates.parquet",
)
NEW_USER = -1  # user_idx of a user the bundle does not know
Listed = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # user, item, score, rank


class _ByUser:
    """Rows sorted by user: a request slices its user's rows by binary search."""

    def __init__(self, user: np.ndarray) -> None:
        self.order = np.argsort(user, kind="stable")
        self.user = user[self.order]

    def span(self, user: int) -> slice:
        lo, hi = np.searchsorted(self.user, [user, user + 1])
        return slice(int(lo), int(hi))


class OnlineRanker:
    """Candidates -> features -> LambdaRank for one request, from a bundle directory. Every
    step is numpy over the user's own rows (the offline stages run the same functions over
    all users at once)."""

    def __init__(self, path: Path, spec: dict, category: np.ndarray | None) -> None:
        meta = json.loads((path / "rank.json").read_text())
        self.meta = meta
        self.columns: list[str] = meta["columns"]
        self.sizes: dict[str, int] = meta["sources"]
        self.ranker = Ranker.load(path / "ranker.txt", self.columns)
        self.predict = compiled_predictor(path / "ranker.txt", self.ranker)
        self.items = ItemTable(pl.read_parquet(path / "item_stats.parquet"))
        self.snap = Snapshot(
            pairs=pl.DataFrame(schema={**dict.fromkeys(PAIR, pl.Int64), "label": pl.Int8}),
            events=pl.DataFrame(schema=dict.fromkeys(EVENT_COLUMNS, pl.Int64)),
            now_ms=int(meta["now_ms"]),
            n_users=int(meta["n_users"]),
            n_items=len(self.items.frame),
            spec=spec,
            category=category,
        )
        self.signal_code = {name: i for i, name in enumerate(self.snap.signal_names)}
        history = EventArrays.from_frame(
            pl.read_parquet(path / "history.parquet").select(EVENT_COLUMNS),
            self.snap.signal_names,
        )
        self.history_index = _ByUser(history.user)
        self.history = history.take(self.history_index.order)
        cascade = pl.read_parquet(path / "cascade_candidates.parquet")
        self.cascade_index = _ByUser(cascade["user_idx"].cast(pl.Int64).to_numpy())
        order = self.cascade_index.order
        self.cascade = (
            cascade["item_idx"].cast(pl.Int64).to_numpy()[order],
            cascade["cascade_score"].cast(pl.Float32).to_numpy()[order],
            cascade["cascade_rank"].cast(pl.Float32).to_numpy()[order],
        )
        trend = self.items.matrix[:, self.items.column["trend_score"]]
        self.popular = np.argsort(-trend, kind="stable")
        self.trend = trend

    def user_events(
        self, user_row: int | None, logged: list[tuple[int, str, int, int]]
    ) -> EventArrays:
        """The bundle's history of the user plus the logged events (item row, event name,
        level, ts ms), all under the user's index (`NEW_USER` for one the bundle lacks)."""
        uid = NEW_USER if user_row is None else user_row
        parts = []
        if user_row is not None:
            parts.append(self.history.take(self.history_index.span(user_row)))
        if logged:
            items, names, levels, ts = zip(*logged, strict=True)
            parts.append(
                EventArrays(
                    user=np.full(len(items), uid, dtype=np.int64),
                    item=np.asarray(items, dtype=np.int64),
                    signal=np.array([self.signal_code.get(e, -1) for e in names], np.int16),
                    level=np.asarray(levels, dtype=np.int8),
                    ts=np.asarray(ts, dtype=np.int64),
                )
            )
        return EventArrays.concat(parts) if parts else EventArrays.empty()

    def candidates(
        self,
        user_row: int | None,
        events: EventArrays,
        search: Callable[[int], tuple[list[int], list[float]]] | None,
        excluded: set[int],
        now_ms: int,
    ) -> CandidateSet:
        """Every source's candidates for one user (excluded items removed)."""
        uid = NEW_USER if user_row is None else user_row
        parts: dict[str, Listed] = {}
        n_items = self.snap.n_items
        if self.sizes.get("history"):
            parts["history"] = history_arrays(
                events, None, now_ms, self.sizes["history"] + len(excluded), n_items
            )
        if user_row is not None and self.sizes.get("cascade"):
            span = self.cascade_index.span(user_row)
            items, scores, ranks = (a[span] for a in self.cascade)
            parts["cascade"] = (np.full(len(items), uid, np.int64), items, scores, ranks)
        if search is not None and self.sizes.get("embedding"):
            rows, scores = search(self.sizes["embedding"])
            parts["embedding"] = _listed(uid, np.asarray(rows, np.int64), np.asarray(scores))
        if self.sizes.get("popularity"):
            top = self.popular[: self.sizes["popularity"] + len(excluded)]
            parts["popularity"] = _listed(uid, top, self.trend[top])
        merged = merge_arrays(parts)
        if excluded:
            merged = merged.take(~_among(merged.item, excluded))
        return merged

    def features(self, cands: CandidateSet, events: EventArrays, now_ms: int) -> np.ndarray:
        return feature_matrix(cands, events, self.items, self.snap, now_ms, self.columns)

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
        searching = 0.0  # the ANN search is the caller's own stage, not "candidates"

        def timed_search(n: int) -> tuple[list[int], list[float]]:
            nonlocal searching
            started = time.perf_counter()
            found = search(n)
            searching += time.perf_counter() - started
            return found

        t0 = time.perf_counter()
        events = self.user_events(user_row, logged)
        cands = self.candidates(
            user_row, events, timed_search if search else None, excluded, now_ms
        )
        if allowed is not None:
            cands = cands.take(np.isin(cands.item, allowed))
        t1 = time.perf_counter()
        x = self.features(cands, events, now_ms)
        t2 = time.perf_counter()
        scores = self.predict(x) if len(cands) else np.empty(0)
        order = np.argsort(-scores, kind="stable")[:k]
        t3 = time.perf_counter()
        timing = {"candidates": t1 - t0 - searching, "features": t2 - t1, "ranker": t3 - t2}
        return cands.item[order].tolist(), scores[order].tolist(), timing


def _listed(uid: int, rows: np.ndarray, scores: np.ndarray) -> Listed:
    n = len(rows)
    return (
        np.full(n, uid, np.int64),
        rows,
        scores.astype(np.float32),
        np.arange(1, n + 1, dtype=np.float32),
    )


def _among(rows: np.ndarray, excluded: set[int]) -> np.ndarray:
    """Whether each of `rows` is in `excluded`: a binary search in the sorted few excluded
    rows (`np.isin` sorts both sides, several times slower on a request's few hundred)."""
    ex = np.sort(np.fromiter(excluded, np.int64, len(excluded)))
    pos = np.minimum(np.searchsorted(ex, rows), len(ex) - 1)
    return ex[pos] == rows

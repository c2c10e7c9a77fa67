"""One user's list from a loaded bundle: the code the HTTP service and the library share.

fold in the user's new events -> query vector -> exclusions -> (two-stage: candidates ->
features -> ranker | one stage: ANN search) -> popularity fill. The service adds the
delay-corrected re-rank and its timings around it; `recfb.Recommender` calls it as is.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from recfb.serving.rates import RatesTable
from recfb.serving.retrieval import ServingBundle, Timings, rerank


@dataclass
class Rerank:
    """The delay-corrected NetCVR re-rank of a list (`serve.rerank`): the one-stage
    search's or the two-stage ranker's top `candidates`, blended with log NetCVR."""

    table: RatesTable
    weight: float
    floor: float
    candidates: int


def served_list(
    served: ServingBundle,
    user_id: str,
    events: list,
    k: int,
    exclude_ids: list[str],
    allowed: np.ndarray | None,
    now_ms: int,
    seen_rule: str | None = None,
    timings: Timings | None = None,
    rerank_by: Rerank | None = None,
) -> tuple[list[str], list[float], str]:
    """(item ids, scores, source) of `user_id`'s top-k. `events` are the user's logged
    events (oldest first); `seen_rule` says which of the bundle's pairs are hidden
    (`recfb.signals.rule_labels`; default the service's `serve.exclude`); `allowed`
    restricts the list to these item rows (a category, a filter)."""
    timings = timings or Timings()
    seen_rule = seen_rule or served.cfg.exclude
    started = time.perf_counter()
    user_row = served.user_row.get(user_id)
    targets, online_excluded = served.session_state(events, now_ms)
    query = served.query_vector(user_row, targets)
    started = timings.add("foldin", started)
    excluded = online_excluded | served.exclusions(seen_rule).get(user_row, frozenset())
    excluded.update(served.item_row[i] for i in exclude_ids if i in served.item_row)
    timings.add("filter", started)
    if served.online is not None:
        fetch = k if rerank_by is None else max(k, rerank_by.candidates)
        rows, scores = two_stage_rows(
            served, user_row, query, events, excluded, allowed, fetch, now_ms, timings
        )
        if rerank_by is not None:
            started = time.perf_counter()
            rows, scores = rerank(
                rows, scores, rerank_by.table, rerank_by.weight, rerank_by.floor, k
            )
            timings.add("rerank", started)
        source = "two_stage" if user_row is not None or events else "popularity"
    else:
        rows, scores = one_stage_rows(served, query, k, excluded, allowed, timings, rerank_by)
        source = "popularity" if query is None else ("model" if user_row is not None else "session")
    return [served.item_ids[r] for r in rows], [float(s) for s in scores], source


def one_stage_rows(
    served: ServingBundle,
    query: np.ndarray | None,
    k: int,
    excluded: set[int],
    allowed: np.ndarray | None,
    timings: Timings,
    rerank_by: Rerank | None,
) -> tuple[list[int], list[float]]:
    """Search (popularity without a query); with a re-rank, fetch its candidates and blend
    their scores with the log of corrected NetCVR."""
    if rerank_by is None or query is None:
        return served.rank(query, k, excluded, None, timings, allowed=allowed)
    fetch = max(k, rerank_by.candidates)
    rows, scores = served.rank(query, fetch, excluded, None, timings, allowed=allowed)
    started = time.perf_counter()
    rows, scores = rerank(rows, scores, rerank_by.table, rerank_by.weight, rerank_by.floor, k)
    timings.add("rerank", started)
    return rows, scores


def two_stage_rows(
    served: ServingBundle,
    user_row: int | None,
    query: np.ndarray | None,
    events: list,
    excluded: set[int],
    allowed: np.ndarray | None,
    k: int,
    now_ms: int,
    timings: Timings,
) -> tuple[list[int], list[float]]:
    """Candidates (history incl. the log, cascade, ANN over the folded-in query, trending)
    -> the same features as offline -> LambdaRank -> exclusion and filters; a thin
    candidate set is filled from popularity."""

    def search(n: int) -> tuple[list[int], list[float]]:
        return served.rank(query, n, excluded, None, timings)

    rows, scores, parts = served.online.rank(
        user_row,
        served.logged_rows(events),
        search if query is not None else None,
        excluded,
        allowed,
        k,
        now_ms,
    )
    for stage, seconds in parts.items():
        timings.stages[stage] = timings.stages.get(stage, 0.0) + seconds
    if len(rows) < k:
        more, _ = served.rank(None, k, excluded | set(rows), None, timings, allowed=allowed)
        take = more[: k - len(rows)]
        floor = min(scores) if scores else 0.0
        rows, scores = rows + take, scores + [floor - 1.0 - i for i in range(len(take))]
    return rows, scores

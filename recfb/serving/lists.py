"""One user's list from a loaded bundle: the code the HTTP service and the library share.

fold in the user's new events -> query vector -> exclusions -> (two-stage: candidates ->
features -> ranker | one stage: ANN search) -> popularity fill. The service adds the
delay-corrected re-rank and its timings around it; `recfb.Recommender` calls it as is.
"""

from __future__ import annotations

import numpy as np

from recfb.serving.retrieval import ServingBundle, Timings


def served_list(
    served: ServingBundle,
    user_id: str,
    events: list,
    k: int,
    exclude_ids: list[str],
    allowed: np.ndarray | None,
    now_ms: int,
    seen_rule: str = "signals",
    timings: Timings | None = None,
) -> tuple[list[str], list[float], str]:
    """(item ids, scores, source) of `user_id`'s top-k. `events` are the user's logged
    events (oldest first); `seen_rule` `none` shows everything, seen or not."""
    timings = timings or Timings()
    user_row = served.user_row.get(user_id)
    targets, online_excluded = served.session_state(events, now_ms)
    query = served.query_vector(user_row, targets)
    excluded: set[int] = set()
    if seen_rule != "none":
        excluded = online_excluded | served.excluded.get(user_row, frozenset())
    excluded.update(served.item_row[i] for i in exclude_ids if i in served.item_row)
    if served.online is not None:
        rows, scores = two_stage_rows(
            served, user_row, query, events, excluded, allowed, k, now_ms, timings
        )
        source = "two_stage" if user_row is not None or events else "popularity"
    else:
        rows, scores = served.rank(query, k, excluded, None, timings, allowed=allowed)
        source = "popularity" if query is None else ("model" if user_row is not None else "session")
    return [served.item_ids[r] for r in rows], [float(s) for s in scores], source


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

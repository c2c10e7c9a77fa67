"""Top-k items for a user (and for many users at once): the bundle's vector folded in with
the user's logged events, searched, filtered, optionally re-ranked by corrected NetCVR; or,
where the bundle carries a ranker, the two-stage path (candidates -> features -> LambdaRank)."""

import math
import time
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import Response

from recfb.serving.retrieval import ServingBundle, Timings, rerank
from recfb.serving.routes.common import json_response, unprocessable
from recfb.serving.schemas import BatchRecommendations, BatchRequest, Recommendations
from recfb.serving.service import Service


def router(service: Service) -> APIRouter:
    cfg = service.cfg
    api = APIRouter(tags=["recommendations"])

    @api.get("/v1/users/{user_id}/recommendations", response_model=Recommendations)
    async def recommendations(
        request: Request,
        user_id: Annotated[str, PathParam(min_length=1, max_length=256)],
        k: Annotated[int | None, Query(ge=1, le=cfg.max_k)] = None,
        exclude: Annotated[
            str | None, Query(max_length=100_000, description="comma-separated item ids")
        ] = None,
        category: Annotated[str | None, Query(max_length=256)] = None,
    ) -> Response:
        """Top-k items for a user: bundle vector + fold-in of the user's logged events,
        minus excluded items; users the bundle does not know get their session or popularity."""
        started = time.perf_counter()
        served = service.bundle()
        timings = Timings()
        extra = [i for i in exclude.split(",") if i] if exclude else []
        body = recommend_one(service, served, user_id, k or cfg.default_k, extra, category, timings)
        return respond(service, body, timings, request, started)

    @api.post("/v1/recommendations", response_model=BatchRecommendations)
    def batch_recommendations(request: Request, body: BatchRequest) -> Response:
        """The same for many users at once (at most `max_batch_users`)."""
        started = time.perf_counter()
        if len(body.user_ids) > cfg.max_batch_users:
            raise unprocessable(["body", "user_ids"], f"at most {cfg.max_batch_users} users")
        if body.k is not None and body.k > cfg.max_k:
            raise unprocessable(["body", "k"], f"k must be <= {cfg.max_k}")
        served = service.bundle()
        timings = Timings()
        k = body.k or cfg.default_k
        results = [
            recommend_one(service, served, u, k, body.exclude, body.category, timings)
            for u in body.user_ids
        ]
        out = {"results": results, "bundle_version": served.version}
        return respond(service, out, timings, request, started)

    return api


def respond(
    service: Service, body: dict, timings: Timings, request: Request, started: float
) -> Response:
    """Serialise, then record the request's stage times (parse: before the handler ran)."""
    t = time.perf_counter()
    response = json_response(body)
    timings.add("serialise", t)
    timings.stages["parse"] = started - request.scope.get("recfb.start", started)
    for stage, seconds in timings.stages.items():
        service.metrics.stage.labels(stage=stage).observe(seconds)
    return response


def recommend_one(
    service: Service,
    served: ServingBundle,
    user_id: str,
    k: int,
    exclude: list[str],
    category: str | None,
    timings: Timings,
) -> dict:
    """One user's answer: fold-in of the logged events, exclusions, then either path."""
    started = time.perf_counter()
    user_row = served.user_row.get(user_id)
    events = service.log.user_events(user_id, service.cfg.foldin.max_events)
    targets, online_excluded = served.session_state(events, int(time.time() * 1000))
    query = served.query_vector(user_row, targets)
    started = timings.add("foldin", started)
    excluded = online_excluded | served.excluded.get(user_row, frozenset())
    excluded.update(served.item_row[i] for i in exclude if i in served.item_row)
    timings.add("filter", started)
    if served.online is not None:
        return two_stage_one(
            served, user_id, user_row, query, events, excluded, k, category, timings
        )
    rows, scores = retrieve(service, served, query, k, excluded, category, timings)
    source = "popularity" if query is None else ("model" if user_row is not None else "session")
    return answer(served, user_id, rows, scores, source)


def retrieve(
    service: Service,
    served: ServingBundle,
    query: np.ndarray | None,
    k: int,
    excluded: set[int],
    category: str | None,
    timings: Timings,
) -> tuple[list[int], list[float]]:
    """Search (popularity without a query); with re-ranking on and the rates ready, fetch
    `rerank.candidates` and blend their scores with the log of corrected NetCVR."""
    cfg = service.cfg
    table = None
    if cfg.rerank.weight > 0 and served.rates is not None:
        table = served.rates.current(service.log)
    if table is None or query is None:
        return served.rank(query, k, excluded, category, timings)
    fetch = max(k, cfg.rerank.candidates)
    rows, scores = served.rank(query, fetch, excluded, category, timings)
    started = time.perf_counter()
    rows, scores = rerank(rows, scores, table, cfg.rerank.weight, cfg.rerank.floor, k)
    timings.add("rerank", started)
    return rows, scores


def two_stage_one(
    served: ServingBundle,
    user_id: str,
    user_row: int | None,
    query: np.ndarray | None,
    events: list,
    excluded: set[int],
    k: int,
    category: str | None,
    timings: Timings,
) -> dict:
    """Candidates (history incl. the log, cascade, ANN over the folded-in query,
    trending) -> the same features as offline -> LambdaRank -> exclusion and filters."""
    allowed = None
    if category is not None:
        allowed = served.category.get(category, np.empty(0, dtype=np.int64))

    def search(n: int) -> tuple[list[int], list[float]]:
        return served.rank(query, n, excluded, None, timings)

    rows, scores, parts = served.online.rank(
        user_row,
        served.logged_rows(events),
        search if query is not None else None,
        excluded,
        allowed,
        k,
        int(time.time() * 1000),
    )
    for stage, seconds in parts.items():
        timings.stages[stage] = timings.stages.get(stage, 0.0) + seconds
    if len(rows) < k:
        rows, scores = fill_from_popularity(served, rows, scores, k, excluded, category, timings)
    source = "two_stage" if user_row is not None or events else "popularity"
    return answer(served, user_id, rows, scores, source)


def fill_from_popularity(
    served: ServingBundle,
    rows: list[int],
    scores: list[float],
    k: int,
    excluded: set[int],
    category: str | None,
    timings: Timings,
) -> tuple[list[int], list[float]]:
    """A thin candidate set topped up with popular items, scored below every ranked one."""
    more, _ = served.rank(None, k, excluded | set(rows), category, timings)
    take = more[: k - len(rows)]
    floor = min(scores) if scores else 0.0
    return rows + take, scores + [floor - 1.0 - i for i in range(len(take))]


def answer(
    served: ServingBundle, user_id: str, rows: list[int], scores: list[float], source: str
) -> dict:
    """The Recommendations body (a non-finite score, which JSON cannot carry, becomes 0)."""
    return {
        "user_id": user_id,
        "items": [
            {"item_id": served.item_ids[r], "score": float(s) if math.isfinite(s) else 0.0}
            for r, s in zip(rows, scores, strict=True)
        ],
        "source": source,
        "bundle_version": served.version,
    }

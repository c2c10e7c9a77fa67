"""Top-k items for a user (and for many users at once): the bundle's vector folded in with
the user's logged events, searched, filtered, optionally re-ranked by corrected NetCVR; or,
where the bundle carries a ranker, the two-stage path (candidates -> features -> LambdaRank)."""

import math
import time
from dataclasses import replace
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import Response

from recfb.serving.lists import Rerank, served_list
from recfb.serving.retrieval import ServingBundle, Timings
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
        if len(extra) > cfg.max_exclude:
            raise unprocessable(["query", "exclude"], f"at most {cfg.max_exclude} item ids")
        body = recommend_one(service, served, user_id, k or cfg.default_k, extra, category, timings)
        return respond(service, body, timings, request.scope, started)

    @api.post("/v1/recommendations", response_model=BatchRecommendations)
    def batch_recommendations(request: Request, body: BatchRequest) -> Response:
        """The same for many users at once (at most `max_batch_users`)."""
        started = time.perf_counter()
        if len(body.user_ids) > cfg.max_batch_users:
            raise unprocessable(["body", "user_ids"], f"at most {cfg.max_batch_users} users")
        if len(body.exclude) > cfg.max_exclude:
            raise unprocessable(["body", "exclude"], f"at most {cfg.max_exclude} item ids")
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
        return respond(service, out, timings, request.scope, started)

    return api


def respond(
    service: Service, body: dict, timings: Timings, scope: dict, started: float
) -> Response:
    """Serialise, then record the request's stage times (parse: before the handler ran)."""
    t = time.perf_counter()
    response = json_response(body)
    timings.add("serialise", t)
    # guard: the timing middleware to the guard's hand-off; parse: from there to the handler
    # (routing, parameter validation); what no stage covers is uvicorn/Starlette's own
    arrived = scope.get("recfb.start", started)
    guarded = scope.get("recfb.guarded", arrived)
    timings.stages["guard"] = guarded - arrived
    timings.stages["parse"] = started - guarded
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
    now_ms: int | None = None,
) -> dict:
    """One user's answer: the user's logged events, the category filter and the re-rank,
    through the list code the library shares (`recfb.serving.lists`). `now_ms` (default the
    wall clock) lets the closed loop (`recfb.loop`) ask in process on its simulated clock."""
    t = time.perf_counter()
    events = service.log.user_events(user_id, service.cfg.foldin.max_events)
    timings.add("events", t)
    allowed = None
    if category is not None:
        allowed = served.category.get(category, np.empty(0, dtype=np.int64))
    items, scores, source = served_list(
        served,
        user_id,
        events,
        k,
        exclude,
        allowed,
        int(time.time() * 1000) if now_ms is None else now_ms,
        timings=timings,
        rerank_by=rerank_spec(service, served),
    )
    return {
        "user_id": user_id,
        "items": [
            {"item_id": i, "score": s if math.isfinite(s) else 0.0}
            for i, s in zip(items, scores, strict=True)
        ],
        "source": source,
        "bundle_version": served.version,
    }


def rerank_spec(service: Service, served: ServingBundle) -> Rerank | None:
    """The NetCVR re-rank when it is on and the bundle's rates are ready."""
    cfg = service.cfg
    if cfg.rerank.weight <= 0 or served.rates is None:
        return None
    table = served.rates.current(service.log)
    if table is None:
        return None
    if cfg.rerank.rates == "naive":
        table = replace(table, netcvr=table.frame["netcvr_naive"].to_numpy())
    return Rerank(table, cfg.rerank.weight, cfg.rerank.floor, cfg.rerank.candidates)

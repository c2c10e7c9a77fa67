"""POST /v1/events: a batch of events committed to the durable log before the 2xx."""

from datetime import UTC, datetime

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from recfb.serving.routes.common import api_key_check, json_response, unprocessable, utc
from recfb.serving.schemas import EventBatch, EventsAccepted
from recfb.serving.service import Service


def router(service: Service) -> APIRouter:
    cfg = service.cfg
    api = APIRouter(tags=["events"])

    @api.post(
        "/v1/events", response_model=EventsAccepted, dependencies=[Depends(api_key_check(service))]
    )
    def post_events(batch: EventBatch) -> Response:
        """Log a batch of events durably (idempotent on event_id) before acknowledging."""
        if len(batch.events) > cfg.max_events_per_post:
            raise unprocessable(["body", "events"], f"at most {cfg.max_events_per_post} events")
        check_signals(service, batch)
        rows = log_rows(batch)
        new = service.log.append(rows)
        service.metrics.events.labels(kind="new").inc(new)
        service.metrics.events.labels(kind="repeat").inc(len(rows) - new)
        return json_response({"accepted": len(rows), "new": new})

    return api


def check_signals(service: Service, batch: EventBatch) -> None:
    """422 naming the event whose kind the served bundle's signal map does not know (no
    check before the first bundle is loaded)."""
    served = service.current
    if served is None:
        return
    for i, ev in enumerate(batch.events):
        if ev.event not in served.signals:
            raise unprocessable(
                ["body", "events", i, "event"],
                f"{ev.event!r} is not a signal of the bundle's signal map; "
                f"expected one of {sorted(served.signals)}",
            )


def log_rows(batch: EventBatch) -> list[tuple]:
    """The log's rows; an event without `ts` happened now, a naive `ts` is UTC."""
    now = datetime.now(UTC)
    return [
        (
            ev.event_id,
            ev.user_id,
            ev.item_id,
            ev.event,
            int(utc(ev.ts or now).timestamp() * 1000),
            ev.value,
            ev.order_id,
        )
        for ev in batch.events
    ]

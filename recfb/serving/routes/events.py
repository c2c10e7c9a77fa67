"""POST /v1/events: a batch of events committed to the durable log before the 2xx."""

from datetime import UTC, datetime, timedelta

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from recfb.serving.routes.common import api_key_check, json_response, unprocessable, utc
from recfb.serving.schemas import EventBatch, EventsAccepted
from recfb.serving.service import Service
from recfb.signals import rules


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
        return json_response(accept_events(service, batch))

    return api


def accept_events(service: Service, batch: EventBatch) -> dict:
    """Check and log a batch (the route's work; the closed loop calls it in process)."""
    check_signals(service, batch)
    now = datetime.now(UTC)
    check_times(service, batch, now)
    rows = log_rows(batch, now)
    new = service.log.append(rows)
    service.metrics.events.labels(kind="new").inc(new)
    service.metrics.events.labels(kind="repeat").inc(len(rows) - new)
    return {"accepted": len(rows), "new": new}


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
                "unknown_event",
            )


def check_times(service: Service, batch: EventBatch, now: datetime) -> None:
    """422 `ts_out_of_range` for an event before `min_ts` (the ETL's bound) or later than now
    plus `max_future_skew_s` (a future event would keep its full fold-in weight until then)."""
    cfg = service.cfg
    low = rules.to_ms(cfg.min_ts)
    high = rules.to_ms(now + timedelta(seconds=cfg.max_future_skew_s))
    for i, ev in enumerate(batch.events):
        if ev.ts is not None and not rules.ts_ok(rules.to_ms(ev.ts), low, high):
            raise unprocessable(
                ["body", "events", i, "ts"],
                f"ts: expected a time between {cfg.min_ts.isoformat()} (min_ts) and "
                f"{cfg.max_future_skew_s:g} s from now (max_future_skew_s)",
                "ts_out_of_range",
            )


def log_rows(batch: EventBatch, now: datetime) -> list[tuple]:
    """The log's rows; an event without `ts` happened now, a naive `ts` is UTC."""
    return [
        (
            ev.event_id,
            ev.user_id,
            ev.item_id,
            ev.event,
            int(utc(ev.ts or now).timestamp() * 1000),
            ev.value,
            ev.order_id,
            ev.is_organic,
        )
        for ev in batch.events
    ]

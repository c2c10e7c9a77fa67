"""Request and response bodies of the retrieval API (pydantic; they make its OpenAPI schema)."""

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

ID = Field(min_length=1, max_length=256)


class EventIn(BaseModel):
    """One event in the canonical schema; `ts` is ISO 8601 or epoch seconds (default: now)."""

    model_config = ConfigDict(extra="forbid")
    event_id: str = ID
    user_id: str = ID
    item_id: str = ID
    event: str = Field(min_length=1, max_length=64)
    ts: datetime | None = None
    value: float | None = Field(None, allow_inf_nan=False)
    order_id: str | None = Field(None, max_length=256)


class EventBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    events: list[EventIn] = Field(min_length=1)


class EventsAccepted(BaseModel):
    accepted: int = Field(description="events in the request, all durably logged")
    new: int = Field(description="of which not seen before (the rest repeated an event_id)")


class ScoredItem(BaseModel):
    item_id: str
    score: float


class Recommendations(BaseModel):
    user_id: str
    items: list[ScoredItem]
    source: str = Field(
        description="model | session (fold-in of a new user) | popularity | two_stage (the "
        "bundle's ranker over candidates from history, cascade, ANN and trending)"
    )
    bundle_version: str


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_ids: list[str] = Field(min_length=1)
    k: int | None = Field(None, ge=1)
    exclude: list[str] = Field(default_factory=list)
    category: str | None = None


class BatchRecommendations(BaseModel):
    results: list[Recommendations]
    bundle_version: str


class SimilarItems(BaseModel):
    item_id: str
    items: list[ScoredItem]
    bundle_version: str


class ItemRates(BaseModel):
    item_id: str
    as_of: str
    windows_days: dict[str, float]
    clicks: int
    purchases: float = Field(description="attributed: a purchase may be shared among clicks")
    cvr_naive: float | None
    cvr_corrected: float | None
    purchases_in_window: int | None = None
    refunds: int | None = None
    refund_naive: float | None = None
    refund_corrected: float | None = None
    netcvr_naive: float | None
    netcvr_corrected: float | None
    conversion_delay: dict[str, Any]
    bundle_version: str


class SwapRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(min_length=1, description="bundle directory to load and swap in")

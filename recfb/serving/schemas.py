"""Request and response bodies of the retrieval API (pydantic; they make its OpenAPI schema).

An event's ids and value are checked by the ETL's own rules (`recfb.signals.rules`): a failure
is a 422 whose `type` is the reason the ETL would have quarantined the row for. Every list and
text in a request has a cap (the body limit of `recfb.serving.guard` bounds the rest).
"""

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from recfb.serving.config import MAX_LIST
from recfb.signals import rules

ID_DOC = {"maxLength": rules.MAX_ID_LENGTH}


def checked_id(field: str, value: str | None) -> str | None:
    """The stripped id, or a validation error typed with the ETL's reason."""
    if value is None:
        return None
    value = rules.clean_id(value)
    reason = rules.id_reason(field, value)
    if reason is not None:
        raise PydanticCustomError(
            reason,
            "{field}: expected {expected}",
            {"field": field, "expected": rules.EXPECTED.get(reason, "a valid id")},
        )
    return None if value == "" else value


def checked_text(value: str, what: str) -> str:
    if not rules.text_ok(value):
        raise PydanticCustomError(
            "bad_text",
            "{what}: expected {expected}",
            {"what": what, "expected": rules.EXPECTED["bad_user_id"]},
        )
    return value


class EventIn(BaseModel):
    """One event in the canonical schema; `ts` is ISO 8601 or epoch seconds (default: now)."""

    model_config = ConfigDict(extra="forbid")
    event_id: str = Field(json_schema_extra=ID_DOC)
    user_id: str = Field(json_schema_extra=ID_DOC)
    item_id: str = Field(json_schema_extra=ID_DOC)
    event: str = Field(min_length=1, max_length=64)
    ts: datetime | None = None
    value: float | None = Field(None, description="a finite number >= 0")
    order_id: str | None = Field(None, json_schema_extra=ID_DOC)
    is_organic: bool | None = Field(
        None, description="true: the user found the item alone; false: a recommender showed it"
    )

    @field_validator("event_id", "user_id", "item_id", "order_id")
    @classmethod
    def _id(cls, value: str | None, info: Any) -> str | None:
        checked = checked_id(info.field_name, value)
        if checked is None and info.field_name == "event_id":
            raise PydanticCustomError("bad_event_id", "event_id: expected a non-empty id")
        return checked

    @field_validator("ts", mode="wrap")
    @classmethod
    def _ts(cls, value: Any, handler: Any) -> datetime | None:
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError(
                "bad_ts", "ts: expected an ISO 8601 date/time or Unix seconds/milliseconds"
            ) from None

    @field_validator("value")
    @classmethod
    def _value(cls, value: float | None) -> float | None:
        if not rules.value_ok(value):
            raise PydanticCustomError("bad_value", "value: expected " + rules.EXPECTED["bad_value"])
        return value


class EventBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    events: list[EventIn] = Field(min_length=1, max_length=MAX_LIST)


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
    user_ids: list[str] = Field(min_length=1, max_length=MAX_LIST)
    k: int | None = Field(None, ge=1)
    exclude: list[str] = Field(default_factory=list, max_length=MAX_LIST)
    category: str | None = Field(None, max_length=rules.MAX_ID_LENGTH)

    @field_validator("user_ids")
    @classmethod
    def _users(cls, value: list[str]) -> list[str]:
        return [checked_id("user_id", u) for u in value]

    @field_validator("exclude")
    @classmethod
    def _exclude(cls, value: list[str]) -> list[str]:
        return [checked_text(i, "exclude") for i in value]

    @field_validator("category")
    @classmethod
    def _category(cls, value: str | None) -> str | None:
        return None if value is None else checked_text(value, "category")


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
    path: str = Field(
        min_length=1, max_length=4096, description="bundle directory to load and swap in"
    )

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        too_long = any(len(part.encode()) > 255 for part in value.split("/"))
        if too_long or not rules.text_ok(value, 4096):
            raise PydanticCustomError(
                "bad_text",
                "path: expected a file system path without control characters, its names at "
                "most 255 bytes",
            )
        return value

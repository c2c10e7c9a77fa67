"""What makes one event acceptable: the ETL's quarantine rules for a single row, shared with the
API so the service never stores what the ETL would later quarantine.

Each rule exists twice from the same constants: as a Python check of one event (the API) and
as a Polars expression over a column (the ETL, `recfb.etl.validate`). A failed rule is named by
its reason code, the same in both places (the API's 422 `type`, the ETL's `reason` column).

- ids (user, item, event, order): stripped of Unicode white space at both ends; blank user and
  item ids are `null_user_id` / `null_item_id`; an id longer than `MAX_ID_LENGTH` characters or
  holding a control character (C0, DEL, C1), a bidirectional control (LRM/RLM/ALM, the
  embeddings, overrides and isolates) or a lone surrogate is `bad_<field>`.
- ts: inside [min_ts, max_ts]; the ETL's max_ts defaults to now + `ETL_FUTURE_SKEW`, the
  API's to now + `serve.max_future_skew_s` (an event from the future would keep its full
  fold-in weight until its time comes) -> `ts_out_of_range`.
- value: absent, or a finite number >= 0 -> else `bad_value`.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta

import polars as pl

MAX_ID_LENGTH = 256
DEFAULT_MIN_TS = datetime(2000, 1, 1)
ETL_FUTURE_SKEW = timedelta(days=1)

# Unicode White_Space, stripped from both ends of an id (spelled out so Python and Polars strip
# the same characters: str.strip() also strips the separators U+001C..U+001F, Rust does not).
STRIP_CHARS = (
    " \t\n\x0b\x0c\r\x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008"
    "\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
# Characters no id may hold; a pattern both `re` and Polars (Rust regex) read the same way.
# Lone surrogates cannot reach Polars (its strings are UTF-8), so only Python checks them.
BAD_ID_CHARS = r"[\u0000-\u001f\u007f-\u009f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]"
_BAD_ID = re.compile(BAD_ID_CHARS)
_SURROGATE = re.compile(r"[\ud800-\udfff]")

ID_FIELDS = ("user_id", "item_id", "event_id", "order_id")
REQUIRED_IDS = ("user_id", "item_id")  # blank -> null_<field>; event/order ids are optional

EXPECTED = {
    "null_user_id": "a non-empty user id",
    "null_item_id": "a non-empty item id",
    **{
        f"bad_{f}": f"at most {MAX_ID_LENGTH} characters, no control, bidirectional-control "
        "or unpaired surrogate characters"
        for f in ID_FIELDS
    },
    "ts_out_of_range": "a timestamp inside min_ts .. now + the allowed clock skew",
    "bad_value": "a finite number >= 0",
}


def clean_id(value: str) -> str:
    """The id as it is stored: white space stripped from both ends."""
    return value.strip(STRIP_CHARS)


def id_reason(field: str, value: str | None) -> str | None:
    """The reason code a (stripped) id breaks, or None when it is acceptable."""
    if value is None or value == "":
        return f"null_{field}" if field in REQUIRED_IDS else None
    if len(value) > MAX_ID_LENGTH or _BAD_ID.search(value) or _SURROGATE.search(value):
        return f"bad_{field}"
    return None


def text_ok(value: str, max_length: int = MAX_ID_LENGTH) -> bool:
    """Whether free text (a category, an excluded id) is as clean as an id must be."""
    return len(value) <= max_length and not (_BAD_ID.search(value) or _SURROGATE.search(value))


def value_ok(value: float | None) -> bool:
    return value is None or (math.isfinite(value) and value >= 0)


def ts_ok(ts_ms: int, min_ms: int, max_ms: int) -> bool:
    return min_ms <= ts_ms <= max_ms


def to_ms(moment: datetime) -> int:
    """A datetime (naive = UTC) as epoch milliseconds."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


# --- the same rules as Polars expressions (the ETL) ---


def strip_expr(text: pl.Expr) -> pl.Expr:
    return text.str.strip_chars(STRIP_CHARS)


def id_bad_expr(text: pl.Expr) -> pl.Expr:
    """True where a (stripped, non-null String) id breaks the length or character rule."""
    return (text.str.len_chars() > MAX_ID_LENGTH) | text.str.contains(BAD_ID_CHARS)


def value_bad_expr(raw: pl.Expr, number: pl.Expr) -> pl.Expr:
    """True where a value arrived but is not a finite number >= 0."""
    return raw.is_not_null() & (number.is_null() | ~number.is_finite() | (number < 0))


def ts_out_of_range_expr(ts_ms: pl.Expr, min_ms: int, max_ms: int) -> pl.Expr:
    return (ts_ms < min_ms) | (ts_ms > max_ms)

"""Validation: type every canonical column and give each bad row one quarantine reason.

Rules (documented in the README):
- ids: integers stay integers, anything else becomes a stripped string; empty -> null; text
  ids longer than 256 characters or holding control or bidirectional-control characters are
  quarantined (`recfb.signals.rules`, the rules the API applies to each posted event too).
- ts: datetimes are used as they are (time zones converted to UTC); integers (or integer
  strings) are Unix time in the configured unit, or by magnitude when `ts_unit: auto`
  (|ts| < 1e11 -> seconds, < 1e14 -> milliseconds, else microseconds); other strings are parsed
  as ISO-8601 date/times. Internally `ts` is Int64 milliseconds since the epoch (UTC).
- value: must be a finite number >= 0 when present.
- records no reader could parse (`MALFORMED_REASONS`, set by the readers) keep that reason
  and a printable excerpt in `raw_line`; no field rule applies to them.
"""

from __future__ import annotations

from datetime import UTC, datetime

import polars as pl

from recfb.etl.config import InputConfig
from recfb.etl.exposure import ORGANIC, organic_flag
from recfb.etl.readers import (
    MALFORMED_RAW,
    MALFORMED_REASON,
    MALFORMED_REASONS,
    OPTIONAL,
    PROVENANCE,
)
from recfb.signals import rules
from recfb.signals.rules import to_ms

# Reasons, in the order they are checked (a row gets the first that applies).
REASONS = (
    *MALFORMED_REASONS,  # records no reader could parse (set by the readers)
    "null_user_id",
    "null_item_id",
    "bad_user_id",
    "bad_item_id",
    "null_event",
    "null_ts",
    "bad_ts",
    "ts_out_of_range",
    "unknown_event",
    "bad_value",
    "bad_event_id",
    "bad_order_id",
)
REASON_FIELD = {
    **dict.fromkeys(MALFORMED_REASONS),  # the whole record, no one field
    "null_user_id": "user_id",
    "null_item_id": "item_id",
    "bad_user_id": "user_id",
    "bad_item_id": "item_id",
    "bad_event_id": "event_id",
    "bad_order_id": "order_id",
    "null_event": "event",
    "null_ts": "ts",
    "bad_ts": "ts",
    "ts_out_of_range": "ts",
    "unknown_event": "event",
    "bad_value": "value",
}
REASON_EXPECTED = {
    "bad_utf8": "UTF-8 text (the record's raw bytes are in `raw_line`, escaped)",
    "bad_json": "one JSON object per line",
    "not_json_object": "a JSON object ({...}) per line, not an array, string, number or null",
    "ragged_row": "no more fields than the CSV header names",
    "unclosed_quote": "every quoted CSV field closed before the end of the file",
    **rules.EXPECTED,
    "null_event": "a non-empty event name",
    "null_ts": "a timestamp",
    "bad_ts": "a datetime, Unix seconds/milliseconds, or an ISO-8601 string",
    "ts_out_of_range": "a timestamp inside input.min_ts .. input.max_ts",
    "unknown_event": "an event name listed in the signal map",
}

_DATETIME_FORMATS = (
    "%Y-%m-%dT%H:%M:%S%.f%#z",
    "%Y-%m-%d %H:%M:%S%.f%#z",
    "%Y-%m-%dT%H:%M:%S%.fZ",
    "%Y-%m-%dT%H:%M:%S%.f",
    "%Y-%m-%d %H:%M:%S%.f",
    "%Y-%m-%d",
)
_CANON = ("user_id", "item_id", "event", "ts", *OPTIONAL)
_MALFORMED = (MALFORMED_REASON, MALFORMED_RAW)
_UNIT_TO_MS = {"s": 1000.0, "ms": 1.0, "us": 0.001}


def _id_expr(name: str, dtype: pl.DataType) -> pl.Expr:
    col = pl.col(name)
    if dtype.is_integer():
        return col.cast(pl.Int64)
    text = rules.strip_expr(col.cast(pl.String))
    return pl.when(text == "").then(None).otherwise(text).alias(name)


def _epoch_to_ms(num: pl.Expr, unit: str) -> pl.Expr:
    """Integer/float epoch in `unit` (or by magnitude) -> Int64 milliseconds."""
    num = num.cast(pl.Float64)
    if unit == "auto":
        size = num.abs()
        factor = pl.when(size < 1e11).then(1000.0).when(size < 1e14).then(1.0).otherwise(0.001)
    else:
        factor = pl.lit(_UNIT_TO_MS[unit])
    return (num * factor).round(0).cast(pl.Int64, strict=False)


def _ts_expr(dtype: pl.DataType, unit: str) -> pl.Expr:
    """Expression giving Int64 ms since epoch, null where unparseable."""
    col = pl.col("ts")
    if isinstance(dtype, pl.Datetime):
        if dtype.time_zone is not None:
            col = col.dt.convert_time_zone("UTC").dt.replace_time_zone(None)
        return col.dt.cast_time_unit("ms").cast(pl.Int64)
    if isinstance(dtype, pl.Date):
        return col.cast(pl.Datetime("ms")).cast(pl.Int64)
    if dtype.is_numeric():
        return _epoch_to_ms(col, unit)
    text = col.cast(pl.String).str.strip_chars()
    as_number = text.cast(pl.Float64, strict=False)
    parsed = pl.coalesce(
        [
            text.str.to_datetime(fmt, strict=False, time_unit="ms", time_zone="UTC")
            for fmt in _DATETIME_FORMATS
        ]
    )
    return pl.coalesce(
        _epoch_to_ms(as_number, unit),
        parsed.dt.replace_time_zone(None).cast(pl.Int64),
    )


def validate(
    lf: pl.LazyFrame, cfg: InputConfig, known_events: list[str]
) -> tuple[pl.LazyFrame, list[str]]:
    """Typed canonical columns plus `reason` (null for good rows) and the extra column names.

    The raw text of ts/value is kept in `ts_raw`/`value_raw` so quarantined rows show what
    arrived, not what the parser made of it.
    """
    schema = lf.collect_schema()
    extras = [c for c in schema.names() if c not in (*_CANON, *PROVENANCE, *_MALFORMED)]
    min_ms = to_ms(cfg.min_ts)
    max_ms = to_ms(cfg.max_ts or datetime.now(UTC) + rules.ETL_FUTURE_SKEW)

    has_value = "value" in schema
    typed = lf.with_columns(
        _id_expr("user_id", schema["user_id"]),
        _id_expr("item_id", schema["item_id"]),
        pl.col("event").cast(pl.String).str.strip_chars().alias("event"),
        _ts_expr(schema["ts"], cfg.ts_unit).alias("ts_ms"),
        pl.col("ts").alias("ts_raw"),  # cast to text only for quarantined rows
        *(
            [
                pl.col("value").cast(pl.Float64, strict=False).alias("value_num"),
                pl.col("value").alias("value_raw"),
            ]
            if has_value
            else [
                pl.lit(None, pl.Float64).alias("value_num"),
                pl.lit(None, pl.String).alias("value_raw"),
            ]
        ),
        # integer event ids stay integers (cheap to de-duplicate); anything else is text
        (
            pl.col("event_id").cast(pl.Int64 if schema["event_id"].is_integer() else pl.String)
            if "event_id" in schema
            else pl.lit(None, pl.String)
        ).alias("event_id"),
        (
            pl.col("order_id").cast(pl.String) if "order_id" in schema else pl.lit(None, pl.String)
        ).alias("order_id"),
    )
    ts_missing = pl.col("ts_raw").is_null()
    if schema["ts"] == pl.String:
        ts_missing = ts_missing | (pl.col("ts_raw").str.strip_chars() == "")
    value_bad = rules.value_bad_expr(pl.col("value_raw"), pl.col("value_num"))
    malformed = pl.col(MALFORMED_REASON) if MALFORMED_REASON in schema else pl.lit(None, pl.String)
    raw_line = pl.col(MALFORMED_RAW) if MALFORMED_RAW in schema else pl.lit(None, pl.String)
    typed = typed.with_columns(raw_line.alias(MALFORMED_RAW))

    def id_bad(name: str) -> pl.Expr:
        """Text ids only (integers cannot break the rules); nulls pass (their own reason)."""
        if name in schema and not schema[name].is_integer():
            return rules.id_bad_expr(pl.col(name).cast(pl.String)).fill_null(False)
        return pl.lit(False)

    reason = (
        pl.when(malformed.is_not_null())
        .then(malformed)
        .when(pl.col("user_id").is_null())
        .then(pl.lit("null_user_id"))
        .when(pl.col("item_id").is_null())
        .then(pl.lit("null_item_id"))
        .when(id_bad("user_id"))
        .then(pl.lit("bad_user_id"))
        .when(id_bad("item_id"))
        .then(pl.lit("bad_item_id"))
        .when(pl.col("event").is_null() | (pl.col("event") == ""))
        .then(pl.lit("null_event"))
        .when(ts_missing)
        .then(pl.lit("null_ts"))
        .when(pl.col("ts_ms").is_null())
        .then(pl.lit("bad_ts"))
        .when(rules.ts_out_of_range_expr(pl.col("ts_ms"), min_ms, max_ms))
        .then(pl.lit("ts_out_of_range"))
        .when(~pl.col("event").is_in(known_events))
        .then(pl.lit("unknown_event"))
        .when(value_bad)
        .then(pl.lit("bad_value"))
        .when(id_bad("event_id"))
        .then(pl.lit("bad_event_id"))
        .when(id_bad("order_id"))
        .then(pl.lit("bad_order_id"))
        .otherwise(None)
    )
    return typed.with_columns(reason.alias("reason")), extras


def good_rows(validated: pl.LazyFrame, extras: list[str]) -> pl.LazyFrame:
    """Rows without a reason, in the typed internal form (`ts` as Int64 ms; the exposure
    flag `is_organic`, where the log has it, as a Boolean: `recfb.etl.exposure`)."""
    schema = validated.collect_schema() if ORGANIC in extras else {}
    return validated.filter(pl.col("reason").is_null()).select(
        "user_id",
        "item_id",
        "event",
        pl.col("ts_ms").alias("ts"),
        pl.col("value_num").alias("value"),
        "event_id",
        "order_id",
        *[organic_flag(schema[c]) if c == ORGANIC else c for c in extras],
        *PROVENANCE,
    )


def bad_rows(validated: pl.LazyFrame, extras: list[str]) -> pl.LazyFrame:
    """Rows with a reason, every field as the text that arrived, plus where it came from."""
    return validated.filter(pl.col("reason").is_not_null()).select(
        pl.col("source_file").cast(pl.String),
        "source_row",
        "reason",
        pl.col("reason").replace_strict(REASON_FIELD, default=None).alias("field"),
        pl.col("user_id").cast(pl.String),
        pl.col("item_id").cast(pl.String),
        "event",
        pl.col("ts_raw").cast(pl.String).alias("ts"),
        pl.col("value_raw").cast(pl.String).alias("value"),
        pl.col("event_id").cast(pl.String),
        "order_id",
        *[pl.col(c).cast(pl.String) for c in extras],
        # a record no reader could parse: a bounded, printable excerpt of it
        pl.col(MALFORMED_RAW).alias("raw_line"),
    )

"""Cancellation linking (refund -> purchase, unlike -> like, ...) and conversion delays.

A cancelling event cancels one earlier event of its target type on the same (user, item):
first by `order_id` when both carry one, else the latest not-yet-cancelled target at or
before it. The second rule is bracket matching (targets open, cancellations close), done
vectorised: with x = +1 for a target and -1 for a cancellation, the running depth reflected
at zero, D_t = S_t - min(0, min_{s<=t} S_s), a cancellation whose depth before it is d > 0
matches the latest earlier target whose depth after it is d (an as-of join); d = 0 means
nothing is left to cancel (an orphan, e.g. the purchase predates the data).
"""

from __future__ import annotations

import polars as pl

from recfb.etl.frames import join_columns

PAIR = ["user_idx", "item_idx"]
LINK_TYPE = pl.Enum(["order_id", "sequence"])


def bracket_match(targets: pl.DataFrame, cancels: pl.DataFrame, keys: list[str]) -> pl.DataFrame:
    """Match cancellations to targets within `keys` groups, each to the latest target before it
    not matched yet (a stack); returns (cancel_row, target_row). Frames need keys, ts, row."""
    if targets.height == 0 or cancels.height == 0:
        return pl.DataFrame(schema={"cancel_row": pl.UInt32, "target_row": pl.UInt32})
    seq = pl.concat(
        [
            targets.select(*keys, "ts", "row", pl.lit(1, pl.Int32).alias("x")),
            cancels.select(*keys, "ts", "row", pl.lit(-1, pl.Int32).alias("x")),
        ]
    ).sort([*keys, "ts", "x"], descending=[False] * len(keys) + [False, True])
    # x descending at equal ts: a purchase and its refund in the same millisecond pair up.
    # The rows are sorted by the keys, so a group is a run: the running sums and minima per
    # group come from running ones over the whole sequence (no hash of the keys)
    first = pl.any_horizontal([pl.col(k).ne_missing(pl.col(k).shift(1)) for k in keys])
    seq = seq.with_columns(first.alias("_first"), pl.col("x").cum_sum().alias("_total"))
    seq = seq.with_columns(
        pl.col("_first").cum_sum().cast(pl.Int64).alias("_group"),
        (pl.col("_total") - pl.col("x")).alias("_before"),
    )
    # each group's sum before it, carried along its run
    base = pl.when(pl.col("_first")).then(pl.col("_before")).forward_fill()
    seq = seq.with_columns((pl.col("_total") - base).cast(pl.Int64).alias("s"))
    # a run's minimum so far: each group is offset below every earlier one (|s| <= rows),
    # so the running minimum over all rows never reaches back into an earlier group
    spread = 2 * seq.height + 1
    offset = pl.col("_group") * spread
    run_min = (pl.col("s") - offset).cum_min() + offset
    seq = seq.with_columns(
        (pl.col("s") - pl.min_horizontal(pl.lit(0), run_min)).alias("d"),
        pl.int_range(pl.len()).alias("pos"),
    )
    # depth before an event: the previous row's depth (not d - x: an orphan leaves d at 0)
    seq = seq.with_columns(
        pl.when(pl.col("_first")).then(0).otherwise(pl.col("d").shift(1)).alias("d_before")
    )
    opens = seq.filter(pl.col("x") == 1).select(
        *keys, pl.col("d").alias("depth"), "pos", pl.col("row").alias("target_row")
    )
    closes = seq.filter((pl.col("x") == -1) & (pl.col("d_before") > 0)).select(
        *keys, pl.col("d_before").alias("depth"), "pos", pl.col("row").alias("cancel_row")
    )
    matched = closes.sort("pos").join_asof(
        opens.sort("pos"),
        on="pos",
        by=[*keys, "depth"],
        strategy="backward",
        check_sortedness=False,
    )
    return matched.filter(pl.col("target_row").is_not_null()).select("cancel_row", "target_row")


SPARSE_SCHEMA = {
    "row": pl.UInt32,
    "cancelled_at": pl.Int64,
    "linked_ts": pl.Int64,
    "link": LINK_TYPE,
    "clock_delay_ms": pl.Int64,
}


def cancellation_links(events: pl.DataFrame, cancel_map: dict[str, str]) -> pl.DataFrame:
    """The rows `link_cancellations` gives a value, with their `row`: `cancelled_at` on
    cancelled events, `linked_ts` and `link` on cancellations (a few rows of many: kept apart,
    they cost no column of nulls in the whole event table)."""
    links = []
    # the signals that cancel one target (refund and chargeback of a purchase) share its
    # stack: two of them never both cancel the same target
    cancellers: dict[str, list[str]] = {}
    for cancel_name, target_name in cancel_map.items():
        cancellers.setdefault(target_name, []).append(cancel_name)
    for target_name, cancel_names in cancellers.items():
        targets = events.filter(pl.col("event") == target_name).select(
            *PAIR, "ts", "row", "order_id"
        )
        cancels = events.filter(pl.col("event").is_in(cancel_names)).select(
            *PAIR, "ts", "row", "order_id"
        )
        if cancels.height == 0:
            continue
        by_order = bracket_match(
            targets.filter(pl.col("order_id").is_not_null()),
            cancels.filter(pl.col("order_id").is_not_null()),
            [*PAIR, "order_id"],
        ).with_columns(pl.lit("order_id", LINK_TYPE).alias("link"))
        rest_targets = targets.filter(~pl.col("row").is_in(by_order["target_row"].implode()))
        by_seq = bracket_match(
            rest_targets, cancels.filter(pl.col("order_id").is_null()), PAIR
        ).with_columns(pl.lit("sequence", LINK_TYPE).alias("link"))
        links += [
            by_order.join(cancels.select("row", "ts"), left_on="cancel_row", right_on="row")
            .rename({"ts": "cancel_ts"})
            .join(targets.select("row", "ts"), left_on="target_row", right_on="row")
            .rename({"ts": "target_ts"}),
            by_seq.join(cancels.select("row", "ts"), left_on="cancel_row", right_on="row")
            .rename({"ts": "cancel_ts"})
            .join(rest_targets.select("row", "ts"), left_on="target_row", right_on="row")
            .rename({"ts": "target_ts"}),
        ]
    schema = {k: v for k, v in SPARSE_SCHEMA.items() if k != "clock_delay_ms"}
    schema["row"] = events.schema["row"]
    if not links:
        return pl.DataFrame(schema=schema)
    link = pl.concat(links)
    cancelled = link.select(
        pl.col("target_row").alias("row"), pl.col("cancel_ts").alias("cancelled_at")
    )
    linked = link.select(
        pl.col("cancel_row").alias("row"), pl.col("target_ts").alias("linked_ts"), "link"
    )
    return (
        cancelled.join(linked, on="row", how="full", coalesce=True)
        .select(list(schema))
        .cast(schema)
        .sort("row")
    )


def link_cancellations(events: pl.DataFrame, cancel_map: dict[str, str]) -> pl.DataFrame:
    """Add `cancelled_at` (ts of the event that cancelled this one), `linked_ts` (for a
    cancellation: ts of the event it cancelled) and `link` ('order_id' | 'sequence' | null).
    `cancel_map` is cancelling signal -> the signal it cancels.

    `events` needs a unique `row` column, PAIR, `event`, `ts`, `order_id`.
    """
    return join_columns(events, cancellation_links(events, cancel_map), "row")


def clock_delays(events: pl.DataFrame) -> pl.DataFrame:
    """`row, clock_delay_ms` of the purchases that have one (see `conversion_delays`)."""
    purchases = events.filter(pl.col("is_purchase")).select(*PAIR, "ts", "row").sort("ts")
    clocks = (
        events.filter(pl.col("is_clock"))
        .select(*PAIR, "ts", pl.col("ts").alias("clock_ts"))
        .sort("ts")
    )
    schema = {"row": events.schema["row"], "clock_delay_ms": pl.Int64}
    if purchases.height == 0 or clocks.height == 0:
        return pl.DataFrame(schema=schema)
    joined = purchases.join_asof(
        clocks, on="ts", by=PAIR, strategy="backward", check_sortedness=False
    ).select("row", (pl.col("ts") - pl.col("clock_ts")).alias("clock_delay_ms"))
    return joined.drop_nulls("clock_delay_ms").cast(schema).sort("row")


def conversion_delays(events: pl.DataFrame) -> pl.DataFrame:
    """Add `clock_delay_ms` to purchase rows: time since the latest clock event (e.g. a click)
    of the same pair at or before the purchase; null when there is none."""
    return join_columns(events, clock_delays(events), "row")


def sparse_links(events: pl.DataFrame, cancel_map: dict[str, str]) -> pl.DataFrame:
    """`cancellation_links` and `clock_delays` in one frame keyed by `row` (`SPARSE_SCHEMA`):
    the rows with any of those values, sorted by `row`."""
    schema = SPARSE_SCHEMA | {"row": events.schema["row"]}
    return (
        cancellation_links(events, cancel_map)
        .join(clock_delays(events), on="row", how="full", coalesce=True)
        .select(list(schema))
        .cast(schema)
        .sort("row")
    )

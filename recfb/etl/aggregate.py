"""Fold each (user, item) pair's events into its state as of a cut-off time.

Columns of a pair table (documented in the README):
  user_idx, item_idx    dense ids (see users.parquet / items.parquet)
  level                 deepest positive level still active at the cut-off (0 = none);
                        cancelled events (refunded purchase, unliked like) do not count,
                        a cancellation with a fallback level lifts the pair to that level
  negative              an explicit negative (dislike/hate not undone, or a refund whose
                        fallback is 'negative') newer than the newest active positive event
  label                 -1 if negative else level: the ordinal training label
  matured               no more feedback is expected for this label: negatives; purchases
                        older than the refund window; other levels whose last positive event
                        is older than the click->purchase window (all relative to the cut-off)
  weight                level weight from the signal map (negative_weight for negatives),
                        times immature_weight when not matured
  n_<signal>            events of each signal in the window
  first_ts, last_ts     first and last event in the window
  click_to_purchase_s   delay of the pair's first purchase (that followed a clock event, e.g.
                        a click) since the latest clock event before it
  purchase_to_refund_s  delay of the pair's first linked refund since its purchase
  n_impressions         where the log has `is_organic`: the pair's recommender impressions
                        in the window (`recfb.etl.exposure`)
  seen_before           the pair had events in an earlier split window
  <feature>             pass-through columns: the value on the pair's last event
"""

from __future__ import annotations

import numpy as np
import polars as pl

from recfb.etl.exposure import IMPRESSIONS, ORGANIC, impression_expr
from recfb.etl.signals import SignalMap

PAIR = ["user_idx", "item_idx"]
_HOUR_MS = 3_600_000


def signal_column(name: str) -> str:
    return f"n_{name}"


def _last(value: pl.Expr, order: str | None) -> pl.Expr:
    return value.max_by(order) if order else value.sort_by("ts").last()


def _first(value: pl.Expr, order: str | None) -> pl.Expr:
    return value.min_by(order) if order else value.sort_by("ts").first()


def aggregate_pairs(
    events: pl.LazyFrame | pl.DataFrame,
    smap: SignalMap,
    cutoff_ms: int | pl.Expr,
    features: list[str],
    order: str | None = None,
    keys: list[str] = PAIR,
) -> pl.LazyFrame:
    """Pair states of `events` (already restricted to one window) as of `cutoff_ms`.

    With `keys` beyond the pair (e.g. the split), one group-by folds several windows at
    once: `cutoff_ms` is then an expression of those keys, evaluated on the rows and on the
    folded pairs alike, and the extra keys stay in the output after the pair.

    `order` names a column that ranks the rows in time without ties (ts, then input order):
    with it, a pair's last and first rows are found by max/min on it, not by sorting every
    group by `ts`.

    Per-row conditions are evaluated once as masked columns before the group-by, so the
    aggregation itself is plain min/max/sum, which the streaming engine runs fast.
    """
    masked = events.lazy().with_columns(_masked(cutoff_ms))
    aggs = [
        pl.col("_pos_level").max().fill_null(0).alias("_level"),
        pl.col("fallback_level").max().fill_null(0).alias("_fallback_level"),
        pl.col("_pos_ts").max().alias("_last_pos"),
        pl.col("_neg_ts").max().alias("_last_neg"),
        pl.col("_purchase_ts").max().alias("_last_purchase"),
        pl.col("ts").min().alias("first_ts"),
        pl.col("ts").max().alias("last_ts"),
        pl.col("_p2r_ms").min(),
        *[
            (pl.col("code") == code).sum().cast(pl.UInt32).alias(signal_column(name))
            for code, name in enumerate(smap.signals)
        ],
        *[_last(pl.col(f), order).alias(f) for f in features],
    ]
    impressions = _impressions(smap, features)
    if impressions:
        aggs.append(_impression(smap).sum().cast(pl.UInt32).alias(IMPRESSIONS))
    # only purchases carry a clock delay (a small subset): the first one that followed a clock
    # event, folded apart from the main group-by where a per-group sort would be costly
    first_delay = (
        masked.filter(pl.col("clock_delay_ms").is_not_null())
        .group_by(keys)
        .agg(_first(pl.col("clock_delay_ms"), order).alias("_c2p_ms"))
    )
    folded = masked.group_by(keys).agg(aggs).join(first_delay, on=keys, how="left")
    return finish_pairs(folded, smap, cutoff_ms, features, keys)


def _masked(cutoff_ms: int | pl.Expr) -> list[pl.Expr]:
    """The per-row conditions as masked columns (null where the condition fails), so the
    aggregation itself is plain min/max/sum."""
    active = pl.col("cancelled_at").is_null() | (pl.col("cancelled_at") >= cutoff_ms)
    positive = (pl.col("level") > 0) & active
    neg_evidence = (pl.col("is_negative") & active) | pl.col("fallback_negative")
    refund = pl.col("is_refund") & pl.col("linked_ts").is_not_null()
    return [
        pl.when(positive).then(pl.col("level")).alias("_pos_level"),
        pl.when(positive).then(pl.col("ts")).alias("_pos_ts"),
        pl.when(neg_evidence).then(pl.col("ts")).alias("_neg_ts"),
        pl.when(pl.col("is_purchase") & active).then(pl.col("ts")).alias("_purchase_ts"),
        pl.when(refund).then(pl.col("ts") - pl.col("linked_ts")).alias("_p2r_ms"),
    ]


def _impressions(smap: SignalMap, features: list[str]) -> list[str]:
    """`[n_impressions]` where the logged exposure signal is folded: absent without the flag
    (outputs unchanged), and left to the log's own count when a signal is named so."""
    own_count = IMPRESSIONS in {signal_column(n) for n in smap.signals}
    return [IMPRESSIONS] if ORGANIC in features and not own_count else []


def _impression(smap: SignalMap) -> pl.Expr:
    codes = [c for c, s in enumerate(smap.signals.values()) if s.exposure]
    return impression_expr(codes)


def finish_pairs(
    folded: pl.LazyFrame,
    smap: SignalMap,
    cutoff_ms: int | pl.Expr,
    features: list[str],
    keys: list[str] = PAIR,
) -> pl.LazyFrame:
    """The pair table's columns from the folded aggregates (`_level`, `_fallback_level`,
    `_last_pos`, `_last_neg`, `_last_purchase`, `_p2r_ms`, `_c2p_ms`, the counts, first/last
    time and the features), as `aggregate_pairs` folds them."""
    impressions = _impressions(smap, features)
    att = smap.attribution
    click_window = int(att.click_to_purchase_hours * _HOUR_MS)
    refund_window = int(att.purchase_to_refund_hours * _HOUR_MS)
    level_weight = {i + 1: lv.weight for i, lv in enumerate(smap.levels)} | {0: 1.0}
    negative = pl.col("_last_neg").is_not_null() & (
        pl.col("_last_pos").is_null() | (pl.col("_last_neg") >= pl.col("_last_pos"))
    )
    matured = (
        pl.when(pl.col("negative"))
        .then(True)
        .when(pl.col("_last_purchase").is_not_null())
        .then(pl.col("_last_purchase") + refund_window <= cutoff_ms)
        .when(pl.col("_last_pos").is_not_null())
        .then(pl.col("_last_pos") + click_window <= cutoff_ms)
        .otherwise(True)
    )
    weight = pl.when(pl.col("negative")).then(smap.negative_weight).otherwise(
        pl.col("level").replace_strict(level_weight, return_dtype=pl.Float64)
    ) * pl.when(pl.col("matured")).then(1.0).otherwise(smap.immature_weight)
    return (
        folded.with_columns(
            pl.max_horizontal("_level", "_fallback_level").cast(pl.Int8).alias("level"),
            negative.alias("negative"),
        )
        .with_columns(
            pl.when(pl.col("negative"))
            .then(-1)
            .otherwise(pl.col("level"))
            .cast(pl.Int8)
            .alias("label"),
            matured.alias("matured"),
        )
        .with_columns(
            weight.cast(pl.Float32).alias("weight"),
            pl.col("first_ts").cast(pl.Datetime("ms")),
            pl.col("last_ts").cast(pl.Datetime("ms")),
            (pl.col("_c2p_ms") / 1000).alias("click_to_purchase_s"),
            (pl.col("_p2r_ms") / 1000).alias("purchase_to_refund_s"),
        )
        .select(
            *keys,
            "label",
            "level",
            "negative",
            "matured",
            "weight",
            *[signal_column(n) for n in smap.signals],
            *impressions,
            "first_ts",
            "last_ts",
            "click_to_purchase_s",
            "purchase_to_refund_s",
            *features,
        )
    )


def _single_row_pairs(
    events: pl.LazyFrame, smap: SignalMap, cutoff_ms: int | pl.Expr, features: list[str]
) -> pl.LazyFrame:
    """What `aggregate_pairs` folds for keys with one event each: the row's own values, no
    group-by."""
    masked = dict(
        zip(
            ["_pos_level", "_pos_ts", "_neg_ts", "_purchase_ts", "_p2r_ms"],
            _masked(cutoff_ms),
            strict=True,
        )
    )
    columns = [
        masked["_pos_level"].fill_null(0).alias("_level"),
        pl.col("fallback_level").fill_null(0).alias("_fallback_level"),
        masked["_pos_ts"].alias("_last_pos"),
        masked["_neg_ts"].alias("_last_neg"),
        masked["_purchase_ts"].alias("_last_purchase"),
        pl.col("ts").alias("first_ts"),
        pl.col("ts").alias("last_ts"),
        masked["_p2r_ms"],
        *[
            (pl.col("code") == code).cast(pl.UInt32).alias(signal_column(name))
            for code, name in enumerate(smap.signals)
        ],
        pl.col("clock_delay_ms").alias("_c2p_ms"),
    ]
    if _impressions(smap, features):
        columns.append(_impression(smap).fill_null(False).cast(pl.UInt32).alias(IMPRESSIONS))
    return events.with_columns(columns)


def fold_runs(
    events: pl.DataFrame,
    smap: SignalMap,
    cutoff_ms: int | pl.Expr,
    features: list[str],
    keys: list[str] = PAIR,
) -> pl.DataFrame | None:
    """`aggregate_pairs` of `events` (rows in time order, ties broken), sorted by the extra
    key (the split), then the pair. Most pairs have one event in a window: the keys and
    each row's position, packed in one UInt64 and sorted (values only), find the keys with
    one row, which need no group-by (their row is their state); the hash group-by folds the
    rest. The same packing, of the folded keys, orders the table, and with the split among
    the keys gives `seen_before` (the pair in an earlier window: the key before it in
    (pair, split) order). None where the keys and positions do not fit 64 bits."""
    n = events.height
    extra = keys[len(PAIR) :]
    if n == 0 or len(extra) > 1:
        return None
    user = events["user_idx"].to_numpy()
    first_user = int(user.min())
    user_bits = max(1, (int(user.max()) - first_user).bit_length())
    item_bits = max(1, int(events["item_idx"].max()).bit_length())
    split_bits = max(1, int(events[extra[0]].to_physical().max()).bit_length()) if extra else 0
    pos_bits = max(1, (n - 1).bit_length())
    if user_bits + item_bits + split_bits + pos_bits > 64:
        return None

    def packed(frame: pl.DataFrame) -> np.ndarray:
        """(user, item, split, position) of `frame`'s rows as sorted UInt64 values."""
        value = (frame["user_idx"].to_numpy() - np.uint32(first_user)).astype(np.uint64)
        value <<= np.uint64(item_bits)
        value |= frame["item_idx"].to_numpy()
        if extra:
            value <<= np.uint64(split_bits)
            value |= frame[extra[0]].to_physical().to_numpy().astype(np.uint64)
        value <<= np.uint64(pos_bits)
        value |= np.arange(frame.height, dtype=np.uint64)
        value.sort()
        return value

    low = np.uint64((1 << pos_bits) - 1)
    key = packed(events)
    run = key >> np.uint64(pos_bits)
    boundary = np.flatnonzero(run[1:] != run[:-1]) + 1
    del run
    starts = np.concatenate(([0], boundary))
    ends = np.concatenate((boundary, [n]))
    single_at = starts[ends - starts == 1]
    single = np.zeros(n, dtype=bool)
    single[(key[single_at] & low).astype(np.int64)] = True
    del key, starts, ends, single_at, boundary
    single = pl.Series(single)
    rows = events.lazy().with_row_index("_order")
    singles = _single_row_pairs(rows.filter(single), smap, cutoff_ms, features)
    folded = [finish_pairs(singles, smap, cutoff_ms, features, keys)]
    if not single.all():
        many = rows.filter(~single)
        folded.append(aggregate_pairs(many, smap, cutoff_ms, features, "_order", keys))
    table = pl.concat(pl.collect_all(folded), rechunk=True)
    del single, rows
    order = packed(table)
    position = (order & low).astype(np.int64)
    if extra:  # seen before: the same pair just before, in (pair, split) order
        pair = order >> np.uint64(pos_bits + split_bits)
        seen = np.zeros(table.height, dtype=bool)
        np.equal(pair[1:], pair[:-1], out=seen[1:])
        del pair
        split = ((order >> np.uint64(pos_bits)) & np.uint64((1 << split_bits) - 1)).astype(np.uint8)
        by_split = np.argsort(split, kind="stable")
        position, seen = position[by_split], seen[by_split]
        del split, by_split
    del order
    table = table[pl.Series(position)]
    return table.with_columns(pl.Series("seen_before", seen)) if extra else table

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

from typing import Any

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


_I64 = np.iinfo(np.int64)


def fold_runs(
    events: pl.DataFrame,
    smap: SignalMap,
    cutoff_ms: int | pl.Expr,
    features: list[str],
    keys: list[str] = PAIR,
) -> pl.DataFrame | None:
    """`aggregate_pairs` of `events` (rows in time order, ties broken), by sorting rather
    than hashing: the keys and each row's position packed in one UInt64 are sorted (values
    only), so each key's rows are one run in time order, and every aggregate is a segmented
    NumPy reduction over the runs (most pairs have one or two events: a hash group-by is as
    large as its input). The table is sorted by the extra keys (the split), then the pair.
    With the split among the keys, `seen_before` is added: the run before is the same pair
    (in an earlier window). None where the keys and positions do not fit 64 bits."""
    n = events.height
    extra = keys[len(PAIR) :]
    if n == 0 or len(extra) > 1:
        return None
    user = events["user_idx"].to_numpy().astype(np.uint64)
    item = events["item_idx"].to_numpy().astype(np.uint64)
    first_user = int(user.min())
    split_bits = 0
    if extra:
        split = events[extra[0]].to_physical().to_numpy().astype(np.uint64)
        split_bits = max(1, int(split.max()).bit_length())
    pos_bits = max(1, (n - 1).bit_length())
    item_bits = max(1, int(item.max()).bit_length())
    user_bits = max(1, (int(user.max()) - first_user).bit_length())
    if user_bits + item_bits + split_bits + pos_bits > 64:
        return None
    # (user, item, split, position): a pair's windows are adjacent runs, in split order
    packed = (user - np.uint64(first_user)) << np.uint64(item_bits + split_bits + pos_bits)
    packed |= item << np.uint64(split_bits + pos_bits)
    del user, item
    if extra:
        packed |= split << np.uint64(pos_bits)
        del split
    packed |= np.arange(n, dtype=np.uint64)
    packed.sort()
    order = (packed & np.uint64((1 << pos_bits) - 1)).astype(np.int64)
    run_key = packed >> np.uint64(pos_bits)
    del packed
    new_run = np.empty(n, dtype=bool)
    new_run[0] = True
    np.not_equal(run_key[1:], run_key[:-1], out=new_run[1:])
    starts = np.flatnonzero(new_run)
    last = np.append(starts[1:], n) - 1
    runs = len(starts)

    impressions = _impressions(smap, features)
    # the masked columns with a sentinel for null (none of them takes the sentinel's value)
    masked = {e.meta.output_name(): e for e in _masked(cutoff_ms)}
    rows = events.select(
        masked["_pos_level"].fill_null(0).cast(pl.Int8),
        pl.col("fallback_level").fill_null(-128).cast(pl.Int8),
        masked["_pos_ts"].fill_null(_I64.min),
        masked["_neg_ts"].fill_null(_I64.min),
        masked["_purchase_ts"].fill_null(_I64.min),
        masked["_p2r_ms"].fill_null(_I64.max),
        pl.col("ts"),
        pl.col("code").cast(pl.Int64),
        pl.col("clock_delay_ms").is_not_null().alias("_has_c2p"),
        *([_impression(smap).fill_null(False).alias(IMPRESSIONS)] if impressions else []),
    )

    def column(name: str) -> np.ndarray:
        return rows[name].to_numpy()[order]

    def nullable(values: np.ndarray, sentinel: int) -> pl.Series:
        series = pl.Series(values)
        return series.set(series == sentinel, None) if (values == sentinel).any() else series

    ts = column("ts")
    fallback = np.maximum.reduceat(column("fallback_level"), starts)
    folded: dict[str, Any] = {
        "_level": pl.Series(np.maximum.reduceat(column("_pos_level"), starts)),
        "_fallback_level": pl.Series(np.where(fallback == -128, 0, fallback).astype(np.int8)),
        "_last_pos": nullable(np.maximum.reduceat(column("_pos_ts"), starts), _I64.min),
        "_last_neg": nullable(np.maximum.reduceat(column("_neg_ts"), starts), _I64.min),
        "_last_purchase": nullable(np.maximum.reduceat(column("_purchase_ts"), starts), _I64.min),
        "first_ts": pl.Series(ts[starts]),  # runs are in time order
        "last_ts": pl.Series(ts[last]),
        "_p2r_ms": nullable(np.minimum.reduceat(column("_p2r_ms"), starts), _I64.max),
    }
    del ts
    run_of = np.cumsum(new_run) - 1
    del new_run
    n_signals = len(smap.signals)
    counts = np.bincount(run_of * n_signals + column("code"), minlength=runs * n_signals).reshape(
        runs, n_signals
    )
    for code, name in enumerate(smap.signals):
        folded[signal_column(name)] = pl.Series(counts[:, code].astype(np.uint32))
    del counts
    if impressions:
        shown = np.bincount(run_of, weights=column(IMPRESSIONS), minlength=runs)
        folded[IMPRESSIONS] = pl.Series(shown.astype(np.uint32))
    # the first clock delay of each run: its first row that has one
    has = column("_has_c2p")
    first_with = np.minimum.reduceat(np.where(has, np.arange(n), n), starts)
    del has, run_of
    with_delay = first_with < n
    delay_rows = pl.Series(order[np.where(with_delay, first_with, 0)])
    delays = events["clock_delay_ms"].gather(delay_rows)
    folded["_c2p_ms"] = delays.set(pl.Series(~with_delay), None)
    # the keys and the features from each run's last row (the last in time)
    last_rows = order[last]
    if extra:
        split_of = events[extra[0]].to_physical().to_numpy()[last_rows]
        by_split = np.argsort(split_of, kind="stable")
        same_pair = np.zeros(runs, dtype=bool)
        same_pair[1:] = run_key[last[1:]] >> np.uint64(split_bits) == (
            run_key[last[:-1]] >> np.uint64(split_bits)
        )
        folded["seen_before"] = pl.Series(same_pair)
    else:
        by_split = None
    del run_key
    key_rows = pl.Series(last_rows)
    table = pl.DataFrame(folded).with_columns(
        events.select(*keys, *features).gather(key_rows).get_columns()
    )
    if by_split is not None:
        table = table[pl.Series(by_split)]
    seen = ["seen_before"] if extra else []
    finished = finish_pairs(table.lazy(), smap, cutoff_ms, features, keys).collect()
    return finished.with_columns(table.select(seen).get_columns()) if seen else finished

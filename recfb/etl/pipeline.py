"""`recfb etl`: raw events -> validated, canonical, ordinal, split training data.

Stages: read -> validate (bad rows to quarantine) -> de-duplicate -> canonicalise signals ->
drop noise by dwell -> optional filters -> vocabularies -> link cancellations and delays ->
order the events as the log -> split -> fold pairs per split -> write everything atomically
with `stats.json`.

The scan, validation and quarantine run as one Polars lazy query collected by the streaming
engine; the later stages work on the validated columns only (integers, an Enum for the
event, small strings), which is what bounds memory at tens of millions of events. Memory
rules the later stages keep: no frame outlives its stage, a join that adds a column joins
the keys only (`join_columns`, in slices), columns that are mostly null (links, delays) live
apart keyed by `row` (`sparse_links`), `recfb etl` writes each pair table part by part as it
folds, and the events are gathered once into the log's order (`_log_order`, `_reorder`:
a column at a time), so a fold part is a slice of users and the log is written in slices;
a slice finds its rows' links by log position (`_log_links`), not by a join.
The temporal windows fold in one pass (by pair and split, `_fold_windows`; `fold_runs`
sorts rather than hashes, and only pairs with several events go through a group-by). The
validated rows are rechunked once: an eager `select` on a frame in many chunks rechunks all
of it, each time.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import polars as pl
from polars.io.plugins import register_io_source
from pydantic import BaseModel

from recfb.config import build_model
from recfb.errors import ConfigError, InputError
from recfb.etl.aggregate import PAIR, aggregate_pairs, fold_runs
from recfb.etl.config import EtlConfig, FilterConfig, InputConfig, SplitConfig
from recfb.etl.filters import FilterDecision, apply_filters
from recfb.etl.frames import filter_consuming, join_columns, rechunk_consuming
from recfb.etl.interactions import ZSTD_LEVEL, Interactions
from recfb.etl.link import sparse_links
from recfb.etl.readers import MEMORY_SOURCE, PROVENANCE, excerpt, read_events, read_frame
from recfb.etl.signals import SignalMap, load_signal_map
from recfb.etl.split import (
    SPLIT_DTYPE,
    SPLITS,
    Windows,
    assign_temporal,
    leave_last_deepest,
    leave_last_out,
    temporal_windows,
)
from recfb.etl.validate import REASON_EXPECTED, bad_rows, good_rows, validate
from recfb.etl.vocab import attach_index, extend_vocab, load_vocab
from recfb.io import atomic_dir
from recfb.progress import StageTimer

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")
_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)


@dataclass
class EtlResult:
    out: Path
    stats: dict[str, Any]


def _quantiles(values: pl.Series) -> dict[str, float | int | None]:
    values = values.drop_nulls()
    out: dict[str, float | int | None] = {"count": values.len()}
    for q in _QUANTILES:
        out[f"p{int(q * 100)}"] = float(values.quantile(q)) if values.len() else None
    return out


def _ms_text(ms: int) -> str:
    return str(pl.Series([ms], dtype=pl.Int64).cast(pl.Datetime("ms"))[0])


def _level_names(smap: SignalMap) -> dict[int, str]:
    return {-1: "negative", 0: "none"} | {i + 1: lv.name for i, lv in enumerate(smap.levels)}


def _counts(df: pl.DataFrame, column: str) -> dict[str, int]:
    if df.height == 0:
        return {}
    grouped = df.group_by(column).len().sort(column)
    return {str(k): int(v) for k, v in grouped.iter_rows()}


def _validated(
    raw: pl.LazyFrame, input_cfg: InputConfig, smap: SignalMap
) -> tuple[pl.LazyFrame, list[str]]:
    """Typed rows with their quarantine reason; an unknown event is an error when the signal
    map says so (`unknown_events: error`)."""
    validated, extras = validate(raw, input_cfg, list(smap.signals))
    if smap.unknown_events == "error":
        unknown = (
            validated.filter(pl.col("reason") == "unknown_event")
            .select("source_file", "source_row", "event")
            .head(1)
            .collect()
        )
        if unknown.height:
            f, r, e = unknown.row(0)
            raise InputError(
                f"unknown event '{excerpt(e)}'; expected one of {sorted(smap.signals)} "
                "(or set unknown_events: quarantine in the signal map)",
                file=f,
                row=r,
                field="event",
            )
    return validated, extras


def _read_tolerantly(attempt: Callable[[bool], T], source: str) -> T:
    """`attempt(False)`: Polars reads every file as it is (the fast path). When Polars fails
    on the data, `attempt(True)`: the readers find the file it fails on and split a CSV/JSONL
    file's malformed records off into the quarantine, so only broken input pays for it."""
    try:
        return attempt(False)
    except pl.exceptions.PolarsError:
        pass
    try:
        return attempt(True)
    except pl.exceptions.PolarsError as exc:
        raise InputError(f"reading failed: {excerpt(str(exc))}", file=source) from exc


def validate_in_memory(
    read: Callable[[bool], pl.LazyFrame], input_cfg: InputConfig, smap: SignalMap, source: str
) -> tuple[pl.DataFrame, pl.DataFrame, list[str]]:
    """Good rows, quarantined rows and the extra column names, collected (no stage files);
    `read(tolerant)` gives the raw rows (see `_read_tolerantly`)."""

    def collect(tolerant: bool) -> tuple[pl.DataFrame, pl.DataFrame, list[str]]:
        validated, extras = _validated(read(tolerant), input_cfg, smap)
        # every good row's event is in the map: an Enum holds it in one byte, not a string
        good = good_rows(validated, extras).with_columns(pl.col("event").cast(_event_type(smap)))
        good, bad = pl.collect_all([good, bad_rows(validated, extras)], engine="streaming")
        good = rechunk_consuming(good)
        if good.height and good["source_row"].max() < 1 << 32:
            # record numbers in 4 bytes while the rows are held (back to Int64 in reports)
            good = good.with_columns(pl.col("source_row").cast(pl.UInt32))
        return good, bad, extras

    return _read_tolerantly(collect, source)


def _stage_validation(
    cfg: EtlConfig, smap: SignalMap
) -> tuple[pl.DataFrame, pl.DataFrame, list[str], list[Path]]:
    """`recfb etl`'s read + validate: good rows, quarantined rows, extra columns, files read.
    The streaming engine collects only the typed columns the later stages use (no stage
    files: writing and reading them back cost more than they saved)."""
    files: list[Path] = []

    def read(tolerant: bool) -> pl.LazyFrame:
        raw, found = read_events(cfg.input, tolerant=tolerant)
        files[:] = found
        return raw

    source = ", ".join(cfg.input.paths[:5])
    events, quarantine, extras = validate_in_memory(read, cfg.input, smap, source)
    return events, quarantine, extras, files


def _event_type(smap: SignalMap) -> pl.Enum:
    """The event names as an Enum; its physical value is the signal's code."""
    return pl.Enum(list(smap.signals))


_DEDUPE_ROWS = 4_000_000  # rows per sort in _first_occurrence: bounds its working memory


# up to this many rows the key hash is cut to 32 bits: its colliding pairs (n^2 / 2^33, all
# checked exactly) stay under 1% of the rows
_HASH32_ROWS = 1 << 26


def _first_occurrence(
    frame: pl.DataFrame, keys: list[str], within: pl.Series | None = None
) -> pl.Series:
    """True where a row is the first (in row order) with its key: `is_first_distinct` by
    sorting, which beats a hash table of tens of millions of keys. The key's values (an
    integer id itself, else its hash) are sorted, values only (NumPy's vectorised sort; no
    row indices carried): the values that repeat (duplicates and hash collisions: a few)
    pick the rows that get the exact check. The values are sorted in parts of about
    `_DEDUPE_ROWS` by value modulo the number of parts (equal values share a part), so the
    sorts' working memory stays that of one part. Null single keys are left to the caller.
    With `within` (a mask), only those rows take part (the others are False): the first
    among them wins."""
    key = pl.struct(keys) if len(keys) > 1 else pl.col(keys[0])
    if len(keys) == 1 and frame.schema[keys[0]].is_integer() and within is None:
        value = frame[keys[0]]
    else:
        if len(keys) == 1 and frame.schema[keys[0]].is_integer():
            combined = pl.col(keys[0])
        else:
            # one hash per column, combined: hashing the struct builds its rows in full
            # first; the streaming engine computes it a morsel at a time
            hashes = [pl.col(k).to_physical().hash(seed=i) for i, k in enumerate(keys)]
            combined = pl.reduce(lambda a, b: a ^ b, hashes)
            if frame.height <= _HASH32_ROWS:  # half the memory; collisions are checked
                combined = (combined % (1 << 32)).cast(pl.UInt32)
        query = frame.lazy()
        if within is not None:  # rows outside are null: never sorted, never candidates
            query = query.with_columns(within.alias("_within"))
            combined = pl.when(pl.col("_within")).then(combined)
        value = query.select(combined.alias("hash")).collect(engine="streaming").to_series()
    n_parts = min(255, max(1, -(-frame.height // _DEDUPE_ROWS)))
    part_of = None
    if n_parts > 1:  # a morsel at a time: no whole-length intermediate of the key's width
        part_expr = (pl.col(value.name) % n_parts).abs().cast(pl.UInt8)
        part_of = value.to_frame().lazy().select(part_expr).collect(engine="streaming")
        part_of = part_of.to_series()
    repeated = []
    for part in range(n_parts):
        values = value if part_of is None else value.filter(part_of == part)
        ordered = np.sort(values.drop_nulls().to_numpy())
        del values
        repeated.append(np.unique(ordered[1:][ordered[1:] == ordered[:-1]]))
        del ordered
    del part_of
    repeats = pl.Series(np.concatenate(repeated)).cast(value.dtype)
    first = pl.repeat(True, frame.height, eager=True) if within is None else within.clone()
    if repeats.len():
        candidates = value.is_in(repeats.implode()).arg_true()
        exact = frame.select(key.gather(candidates).is_first_distinct()).to_series()
        first = first.scatter(candidates, exact)
    return first


def _dedupe(
    events: pl.DataFrame, noise: pl.Expr, unused: list[str]
) -> tuple[pl.DataFrame, dict[str, int], pl.DataFrame]:
    """Drop repeated event_ids, then repeated (user, item, event, ts); the first copy wins.
    Returns the kept rows, the counts and the first copies that are `noise` (for the
    canonicalise stage's report): one filter drops duplicates and noise together, and the
    `unused` columns are left out of the kept rows rather than filtered.

    Also numbers the kept rows (`row`) in input order: later joins may reorder rows, and
    `row` keeps every tie-break (equal timestamps) deterministic.
    """
    n0 = events.height
    id_col = pl.col("event_id")
    mask = events.select(id_col.is_null() | _first_occurrence(events, ["event_id"])).to_series()
    n1 = int(mask.sum())
    # the second rule among the first rule's survivors, then one filter for both and noise
    mask = _first_occurrence(events, ["user_id", "item_id", "event", "ts"], within=mask)
    n2 = int(mask.sum())
    noisy = events.select(noise).to_series() & mask
    noise_rows = events.filter(noisy)
    for name in unused:  # in place: the caller's frame is the one emptied as it is filtered
        events.drop_in_place(name)
    events = filter_consuming(events, mask & ~noisy).with_row_index("row")
    return events, {"same_event_id": n0 - n1, "same_user_item_event_ts": n1 - n2}, noise_rows


def _meaning(smap: SignalMap, names: list[str] | None = None) -> list[pl.Expr]:
    """Each signal's meaning (code, level, flags; `names` of them, else all) as columns looked
    up by the event's code (its Enum's physical value): no join."""
    table = smap.signal_table()
    dtypes = {"code": pl.UInt8, "level": pl.Int8, "fallback_level": pl.Int8}
    dtypes["min_dwell_s"] = pl.Float64
    code = pl.col("event").to_physical()
    if names is None:
        names = _meaning_names(smap)
    return [
        pl.lit(pl.Series(name, table[name], dtype=dtypes.get(name))).gather(code).alias(name)
        for name in names
    ]


def _meaning_names(smap: SignalMap) -> list[str]:
    """The names of the meaning columns `_meaning` adds by default."""
    return [n for n in smap.signal_table() if n not in ("event", "cancels", "is_exposure")]


# the signal columns the fold looks up again rather than carry into the event log's order
_FOLD_MEANING = [
    "code",
    "is_negative",
    "fallback_level",
    "fallback_negative",
    "is_purchase",
    "is_refund",
]


def _filtered_frame(reason: str, rows: pl.DataFrame) -> pl.DataFrame:
    return rows.select(
        pl.col("source_file").cast(pl.String),
        pl.col("source_row").cast(pl.Int64),
        pl.lit(reason).alias("reason"),
        pl.col("user_id").cast(pl.String),
        pl.col("item_id").cast(pl.String),
        pl.col("event").cast(pl.String),
        pl.col("ts").cast(pl.Datetime("ms")),
        "value",
        "event_id",
        "order_id",
    )


def run_etl_local(cfg: EtlConfig, quiet: bool = False) -> EtlResult:
    """The whole ETL in this process; returns the output directory and the statistics
    written there."""
    smap = load_signal_map(cfg.signals)
    timer = StageTimer(quiet)
    out = Path(cfg.out)
    vocab_dir = Path(cfg.vocab_from) if cfg.vocab_from else out
    users_vocab, items_vocab = load_vocab(vocab_dir, "user"), load_vocab(vocab_dir, "item")

    with atomic_dir(out) as tmp:
        with timer.stage("read + validate"):
            validated = list(_stage_validation(cfg, smap))
        extras, files = validated[2], validated[3]
        data = build_tables(
            validated.pop(0),  # no reference left here: the frame goes once deduplicated
            validated.pop(0),
            extras,
            [str(f) for f in files],
            smap,
            cfg.split,
            cfg.filters,
            users_vocab,
            items_vocab,
            timer,
            pairs_dir=tmp,
        )
        with timer.stage("write"):
            # the event log is still a lazy query here: the streaming sink writes it; the
            # pair tables were written as they were folded
            data.write_into(tmp, pairs=False)
    return EtlResult(out=out, stats=data.stats)


def build_tables(
    events: pl.DataFrame,
    quarantine: pl.DataFrame,
    extras: list[str],
    inputs: list[str],
    smap: SignalMap,
    split: SplitConfig,
    filters: FilterConfig,
    users_vocab: pl.DataFrame,
    items_vocab: pl.DataFrame,
    timer: StageTimer,
    pairs_dir: Path | None = None,
) -> Interactions:
    """Validated rows -> de-duplicated, canonical, linked, split and folded tables: the one
    implementation behind both `run_etl` (files) and `recfb.etl.run` (memory). The returned
    event log is a lazy query over the folded events; the caller sinks or collects it. With
    `pairs_dir` the pair tables are written there as they are folded and the returned ones
    are empty (`recfb etl`: no split's table is held whole). The Ray engine runs the same
    phases (`clean_events`, `fold_events`) on shards of users, with the global parts
    (vocabularies, cut points, statistics) reduced between them."""
    rows_in = events.height + quarantine.height
    cleaned = clean_events(events, smap, filters, timer)
    del events
    if cleaned.events.height == 0:
        raise InputError(
            "no usable events left after validation and filters; see quarantine reasons "
            f"{_counts(quarantine, 'reason')}",
            file=", ".join(inputs[:5]),
        )
    with timer.stage("vocabularies"):
        users_vocab = extend_vocab(users_vocab, cleaned.events, "user")
        items_vocab = extend_vocab(items_vocab, cleaned.events, "item")
    folded = fold_events(
        cleaned.events, smap, split, extras, users_vocab, items_vocab, timer, pairs_dir
    )
    stats = _stats(
        split,
        smap,
        inputs,
        rows_in,
        _counts(quarantine, "reason"),
        cleaned.duplicates,
        _counts(cleaned.filtered, "reason"),
        folded.counts,
        folded.links,
        folded.cancels,
        {s: t.summary for s, t in folded.pair_tables.items()},
        folded.windows,
        users_vocab.height,
        items_vocab.height,
    )
    stats["timings_s"] = timer.seconds
    return Interactions(
        train=folded.pair_tables["train"].frame,
        valid=folded.pair_tables["valid"].frame,
        test=folded.pair_tables["test"].frame,
        users=users_vocab,
        items=items_vocab,
        events=folded.log,
        quarantine=quarantine.lazy(),
        filtered=cleaned.filtered.lazy(),
        stats=stats,
        signal_map=smap,
    )


@dataclass
class Cleaned:
    """De-duplicated, canonical, filtered events (`row`: their order), what was removed."""

    events: pl.DataFrame
    duplicates: dict[str, int]
    filtered: pl.DataFrame


def clean_events(
    events: pl.DataFrame,
    smap: SignalMap,
    filters: FilterConfig,
    timer: StageTimer,
    apply: bool = True,
) -> Cleaned:
    """Validated rows -> de-duplicated, canonical rows with the filters applied (the rows
    removed as noise or by a filter, with their reason, in `filtered`). `apply=False`: the
    filters are left to `finish_filters` (a shard's: they are decided on the whole data)."""
    # the rows removed as noise (dwell under the signal's minimum) go with the duplicates,
    # in one filter; the provenance only serves the reports of removed rows
    events = events.with_columns(pl.col("event").cast(_event_type(smap)))
    (min_dwell,) = _meaning(smap, ["min_dwell_s"])
    noise = pl.col("value").is_not_null() & (pl.col("value") < min_dwell).fill_null(False)
    filtering = filters.active
    with timer.stage("deduplicate"):
        events, duplicates, noise_rows = _dedupe(events, noise, [] if filtering else PROVENANCE)

    with timer.stage("canonicalise"):
        # each signal's meaning, looked up by its code (the Enum's physical value): no join
        events = events.with_columns(
            _meaning(smap, [n for n in _meaning_names(smap) if n != "min_dwell_s"])
        )
        removed = [("noise_dwell", noise_rows)]
        del noise_rows
        if not apply:
            return Cleaned(events, duplicates, _filtered_rows(removed))
        events, more = apply_filters(events, filters)
        removed += more
        filtered = _filtered_rows(removed)
        del removed
        if filtering:
            events = events.drop(*PROVENANCE)  # it only served the reports of removed rows
    return Cleaned(events, duplicates, filtered)


def finish_filters(
    events: pl.DataFrame, filters: FilterConfig, decided: FilterDecision
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The filters of a shard cleaned with `apply=False`, as decided on the whole data: the
    kept events (provenance dropped) and the removed rows with their reason."""
    events, removed = apply_filters(events, filters, decided)
    return events.drop(*PROVENANCE), _filtered_rows(removed)


def _filtered_rows(removed: list[tuple[str, pl.DataFrame]]) -> pl.DataFrame:
    return pl.concat([_filtered_frame(r, rows) for r, rows in removed], how="diagonal_relaxed")


@dataclass
class EventCounts:
    """What the statistics need of the folded events, added up shard by shard."""

    used: int
    per_split: dict[str, int]
    per_signal: dict[str, int]
    first_ts: int | None
    last_ts: int | None

    @classmethod
    def of(cls, events: pl.DataFrame) -> EventCounts:
        return cls(
            events.height,
            _counts(events.select("split"), "split"),  # counted, not copied out
            _counts(events, "event"),
            events["ts"].min(),
            events["ts"].max(),
        )

    def merge(self, other: EventCounts) -> EventCounts:
        def add(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
            return {k: a.get(k, 0) + b.get(k, 0) for k in sorted({*a, *b})}

        def pick(f: Callable[..., Any], a: Any, b: Any) -> Any:
            return b if a is None else a if b is None else f(a, b)

        return EventCounts(
            self.used + other.used,
            add(self.per_split, other.per_split),
            add(self.per_signal, other.per_signal),
            pick(min, self.first_ts, other.first_ts),
            pick(max, self.last_ts, other.last_ts),
        )


@dataclass
class Folded:
    """The split pair tables, the event log (lazy, in its order) and what the statistics
    read of the folded events and their links."""

    pair_tables: dict[str, _Pairs]
    windows: Windows | None
    log: pl.LazyFrame
    counts: EventCounts
    links: pl.DataFrame
    cancels: int


def fold_events(
    events: pl.DataFrame,
    smap: SignalMap,
    split: SplitConfig,
    extras: list[str],
    users_vocab: pl.DataFrame,
    items_vocab: pl.DataFrame,
    timer: StageTimer,
    pairs_dir: Path | None = None,
    cut: Windows | int | None = None,
) -> Folded:
    """Clean events (every id in the vocabularies) -> indexed, linked, ordered as the log,
    split and folded into pair tables. `cut` fixes the temporal windows (or, for the other
    split methods, the end of data) instead of finding them in `events`: a shard of users
    takes the whole data's."""
    with timer.stage("vocabularies"):
        events = attach_index(events, users_vocab, "user")
        events = attach_index(events, items_vocab, "item")
        events = events.drop("user_id", "item_id")  # from here on rows are addressed by index

    with timer.stage("link cancellations + delays"):
        cancel_map = {n: s.cancels for n, s in smap.signals.items() if s.cancels}
        # the few rows with a link or a delay, apart (`row`-keyed): no columns of nulls
        links = _with_flags(sparse_links(events, cancel_map), events)

        cancels = int(events["is_cancel"].sum())

    with timer.stage("order events"):
        # the rows in the event log's order, once: each user's events are then one slice
        # (a fold part is a slice, not a filter of the whole table), a position ranks a
        # pair's events in time, and the log is written slice by slice
        order = _log_order(events)
        # the link columns found by log position from here on (no join on `row`)
        log_links = _log_links(links, events, order)
        # the signal flags are looked up again where needed: not carried through the gather
        events = events.drop(*_FOLD_MEANING, "is_clock", "is_cancel", "row")
        events = _reorder(events, order)  # (emptied as it goes: no second copy)
        del order

    with timer.stage("split + fold pairs"):
        pair_tables, windows, events = _split_and_fold(
            events, log_links, smap, split, extras, pairs_dir, cut
        )

    log_columns = [
        "user_idx",
        "item_idx",
        "event",
        pl.col("level").cast(pl.Int8),
        pl.col("ts").cast(pl.Datetime("ms")),
        "value",
        "split",
        pl.col("cancelled_at").cast(pl.Datetime("ms")),
        (pl.col("clock_delay_ms") / 1000).alias("click_to_purchase_s"),
        "event_id",
        "order_id",
        *extras,
    ]

    def finish(chunk: pl.DataFrame, start: int) -> pl.DataFrame:
        """A slice of the log (from position `start`) with its link columns."""
        added = _link_columns(log_links, start, chunk.height, ["cancelled_at", "clock_delay_ms"])
        return chunk.hstack(added).select(log_columns)

    seq = _in_slices(
        events.select(
            "user_idx",
            "item_idx",
            "event",
            "level",
            "ts",
            "value",
            "split",
            "event_id",
            "order_id",
            *extras,
        ),
        finish,
    )
    return Folded(pair_tables, windows, seq, EventCounts.of(events), links, cancels)


def _in_slices(
    log: pl.DataFrame, finish: Callable[[pl.DataFrame, int], pl.DataFrame], step: int = 2_000_000
) -> pl.LazyFrame:
    """`finish(log)` (a log already in its order) as a lazy source that finishes `step` rows
    at a time: the streaming sink writes it without a second copy of the whole log."""

    def batches(
        columns: list[str] | None, predicate: pl.Expr | None, n_rows: int | None, _: int | None
    ) -> Iterator[pl.DataFrame]:
        limit = log.height if n_rows is None else min(n_rows, log.height)
        for start in range(0, limit, step):
            chunk = finish(log.slice(start, min(step, limit - start)), start)
            if columns is not None:
                chunk = chunk.select(columns)
            yield chunk if predicate is None else chunk.filter(predicate)

    schema = finish(log.clear(), 0).schema
    return register_io_source(batches, schema=schema, explain_name="ETL event log")


def _with_flags(links: pl.DataFrame, events: pl.DataFrame) -> pl.DataFrame:
    """`links` with the `ts` and the purchase/refund/cancellation flags of their rows, looked
    up by position: the events are in `row` order (every stage keeps it)."""
    rows = events["row"]
    if not rows.is_sorted():
        raise AssertionError("the events left their row order")
    where = rows.search_sorted(links["row"])
    flags = events.select(pl.col("ts", "is_purchase", "is_refund", "is_cancel").gather(where))
    return links.with_columns(flags.get_columns())


_LINK_COLUMNS = ["cancelled_at", "linked_ts", "clock_delay_ms"]


def _log_links(links: pl.DataFrame, events: pl.DataFrame, order: pl.Series) -> pl.DataFrame:
    """The link columns of `links` (`_LINK_COLUMNS`) with `_log`, each link's row's position
    in the event log (`order`: row positions in log order; the events are in `row` order),
    sorted by it: a slice of the log finds its links by position (`_link_columns`), not by a
    hash join on `row` per slice. A flag per row, gathered in log order, finds the positions
    in one pass."""
    where = events["row"].search_sorted(links["row"]).to_numpy()
    is_link = np.zeros(events.height, dtype=bool)
    is_link[where] = True
    positions = order.to_numpy()
    at = np.flatnonzero(is_link[positions])
    del is_link
    which = np.searchsorted(where, positions[at])  # `where` ascends: links are in row order
    return links.select(_LINK_COLUMNS)[pl.Series(which)].with_columns(
        pl.Series("_log", at, dtype=pl.Int64)
    )


def _link_columns(
    log_links: pl.DataFrame, start: int, length: int, names: list[str]
) -> pl.DataFrame:
    """`names` of `_log_links` for log positions `start` .. `start + length`: null where the
    row has no link (a gather from the slice's links plus one row of nulls)."""
    at = log_links["_log"].to_numpy()
    lo, hi = np.searchsorted(at, [start, start + length])
    found = log_links.select(names).slice(int(lo), int(hi - lo))
    index = np.full(length, hi - lo, dtype=np.uint32)
    index[at[lo:hi] - start] = np.arange(hi - lo, dtype=np.uint32)
    return pl.concat([found, found.clear(1)])[pl.Series(index)]


def _log_order(events: pl.DataFrame) -> pl.Series:
    """Row positions in the event log's order, (user_idx, ts, row); the events are in `row`
    order. Two sorts of values, not of indices: (ts, position) packed into one integer gives
    each row its time rank, then (user_idx, time rank) packed gives the order, the positions
    read back from the low bits. Where ts and the positions do not fit one UInt64 together
    (a time range of centuries), three stable one-key sorts, last key first."""
    n = events.height
    bits = max(1, (n - 1).bit_length())
    low = (1 << bits) - 1
    first, last = events["ts"].min(), events["ts"].max()
    if n and int(last - first).bit_length() + bits > 64:
        order = events["row"].arg_sort()  # row is unique: no ties to keep
        for key in ("ts", "user_idx"):
            keys = events.select(pl.col(key).gather(order))
            order = order.gather(keys.select(pl.arg_sort_by(key, maintain_order=True)).to_series())
        return order
    position = pl.int_range(pl.len(), dtype=pl.UInt64)
    by_time = _sorted(events, (pl.col("ts") - first).cast(pl.UInt64) * (1 << bits) + position)
    by_time = (by_time & low).cast(pl.UInt32)
    rank = pl.zeros(n, pl.UInt32, eager=True).scatter(
        by_time, pl.int_range(n, dtype=pl.UInt32, eager=True)
    )
    by_user = _sorted(events, pl.col("user_idx").cast(pl.UInt64) * (1 << bits) + rank)
    del rank
    return by_time.gather((by_user & low).cast(pl.UInt32))


def _sorted(frame: pl.DataFrame, value: pl.Expr) -> pl.Series:
    """`value` (UInt64) on `frame`, sorted: by NumPy, whose vectorised sort of 64-bit keys
    beats Polars' by a quarter here."""
    values = frame.select(value).to_series().to_numpy(writable=True)
    values.sort()
    return pl.Series(values)


def _reorder(events: pl.DataFrame, order: pl.Series) -> pl.DataFrame:
    """`events` gathered in `order`, a column per thread of Polars' pool size (a random gather
    waits on memory: two at once take half the time), emptying `events` as it goes: a column
    is released once gathered, so at most one extra column per thread is held."""
    workers = max(1, min(pl.thread_pool_size(), 4))
    done: dict[str, pl.Series] = {}
    names = events.columns
    with ThreadPoolExecutor(workers) as pool:
        running: deque[tuple[str, Future[pl.Series]]] = deque()
        for name in names:
            running.append((name, pool.submit(events.drop_in_place(name).gather, order)))
            if len(running) >= workers:
                finished, future = running.popleft()
                done[finished] = future.result()
        for finished, future in running:
            done[finished] = future.result()
    return pl.DataFrame([done[name] for name in names])


def _pair_key() -> pl.Expr:
    """(user_idx, item_idx) packed into one UInt64: cheap set membership, and a one-key sort
    in (user_idx, item_idx) order."""
    return (pl.col("user_idx").cast(pl.UInt64) * (1 << 32) + pl.col("item_idx")).alias("key")


# the columns the fold reads besides the keys and the features
_FOLD_INPUTS = [
    "level",
    "ts",
    "cancelled_at",
    "linked_ts",
    "clock_delay_ms",
    *_FOLD_MEANING,
]
_FOLD_EVENTS = 4_000_000  # events per fold part: bounds the group-by's hash table


def _user_slices(users: pl.Series) -> list[tuple[int, int]]:
    """(offset, length) slices of about `_FOLD_EVENTS` events each over `users` (sorted),
    cut where the user changes: a pair lies in one slice."""
    n = users.len()
    n_parts = max(1, -(-n // _FOLD_EVENTS))
    cuts = {0, n}
    for i in range(1, n_parts):
        cuts.add(int(users.search_sorted(users[i * n // n_parts], side="left")))
    bounds = sorted(cuts)
    return [(a, b - a) for a, b in zip(bounds, bounds[1:], strict=False) if b > a] or [(0, 0)]


def _fold_parts(
    events: pl.DataFrame,
    links: pl.DataFrame,
    split: str | None,
    smap: SignalMap,
    cutoff: int | pl.Expr,
    features: list[str],
    keys: list[str] = PAIR,
) -> Iterator[pl.DataFrame]:
    """The pair table of `events` (of one split, if given), sorted on the pair key, folded
    over slices of the events (in the log's order: user-major) of about `_FOLD_EVENTS`
    events each: a pair lies in one slice, so the parts, in the order given, make the whole
    sorted table while one slice's pairs are held at a time. The parts hold disjoint users.
    A row's position in the log ranks a pair's events in time. `links` gives the rows' link
    and delay columns by log position (`_log_links`); `keys` and `cutoff` as in
    `aggregate_pairs`. With the split among the keys, `fold_runs` adds `seen_before`; where
    it cannot pack the keys, the hash group-by folds the part and the caller finds
    `seen_before`."""
    for offset, length in _user_slices(events["user_idx"]):
        part = events.slice(offset, length)
        part = part.hstack(_link_columns(links, offset, length, _LINK_COLUMNS))
        part = part.lazy().with_row_index("_order", offset)
        if split is not None:
            part = part.filter(pl.col("split") == split)
        part = part.with_columns(_meaning(smap, _FOLD_MEANING))
        rows = part.select(*keys, *_FOLD_INPUTS, *features).collect()  # in the log's order
        folded = fold_runs(rows, smap, cutoff, features, keys)
        if folded is None:  # keys too wide to pack: the hash group-by
            folded = aggregate_pairs(part, smap, cutoff, features, "_order", keys)
            # the extra keys first: a part folded by (pair, split) is one slice per split
            folded = folded.collect(engine="streaming").sort(*keys[len(PAIR) :], _pair_key())
        del rows
        yield folded


@dataclass
class _PairSummary:
    """What the statistics need of a pair table, added up part by part (parts of disjoint
    users, each sorted by user), so a table written as it is folded need not be kept."""

    pairs: int = 0
    users: int = 0
    items: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    labels: dict[int, int] = field(default_factory=dict)
    matured: int = 0
    seen: int = 0

    def add(self, part: pl.DataFrame) -> None:
        self.pairs += part.height
        if part.height == 0:
            return
        users = part["user_idx"].to_numpy()
        self.users += int(np.count_nonzero(users[1:] != users[:-1])) + 1
        items = part["item_idx"].to_numpy()
        if items.max() >= self.items.size:  # items seen: a flag per item index
            self.items = np.concatenate(
                (self.items, np.zeros(int(items.max()) + 1 - self.items.size, dtype=bool))
            )
        self.items[items] = True
        label = part["label"].to_numpy().astype(np.int64)
        low = int(label.min())
        for value, n in enumerate(np.bincount(label - low).tolist(), start=low):
            if n:
                self.labels[value] = self.labels.get(value, 0) + n
        self.matured += int(part["matured"].sum())
        self.seen += int(part["seen_before"].sum())

    def merge(self, other: _PairSummary) -> _PairSummary:
        """The summary of two tables of disjoint users (shards)."""
        size = max(self.items.size, other.items.size)
        items = np.zeros(size, dtype=bool)
        items[: self.items.size] |= self.items
        items[: other.items.size] |= other.items
        labels = {
            k: self.labels.get(k, 0) + other.labels.get(k, 0) for k in {*self.labels, *other.labels}
        }
        return _PairSummary(
            self.pairs + other.pairs,
            self.users + other.users,
            items,
            labels,
            self.matured + other.matured,
            self.seen + other.seen,
        )

    def stats(self, names: dict[int, str]) -> dict[str, Any]:
        return {
            "pairs": self.pairs,
            "users": self.users,
            "items": int(np.count_nonzero(self.items)),
            "pairs_per_label": {names[k]: self.labels[k] for k in sorted(self.labels)},
            "matured_share": self.matured / self.pairs if self.pairs else None,
            "seen_before_share": self.seen / self.pairs if self.pairs else None,
        }


@dataclass
class _Pairs:
    """One split's pair table: the frame, or (once written) an empty frame of its schema."""

    frame: pl.DataFrame
    summary: _PairSummary


class _PairSink:
    """One split's pair table as its parts come: kept (`path` None), else streamed to the
    parquet file at `path` by a sink running in its own thread, a part at a time (several
    splits are folded in one pass, so their tables are written side by side)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.summary = _PairSummary()
        self.parts: list[pl.DataFrame] = []
        self.schema: pl.Schema | None = None
        self.queue: queue.Queue[pl.DataFrame | None] = queue.Queue(maxsize=1)
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def add(self, part: pl.DataFrame) -> None:
        self.summary.add(part)
        if self.schema is None:
            self.schema = part.schema
            if self.path is not None:
                self.thread = threading.Thread(target=self._write, daemon=True)
                self.thread.start()
        if self.path is None:
            self.parts.append(part)
        else:
            self._put(part)

    def _write(self) -> None:
        def batches(
            columns: list[str] | None, predicate: pl.Expr | None, n_rows: int | None, _: int | None
        ) -> Iterator[pl.DataFrame]:
            if columns is not None or predicate is not None or n_rows is not None:
                raise ValueError("the pair table source is only ever written whole")
            while (part := self.queue.get()) is not None:
                yield part
                del part  # the sink holds it until written

        try:
            source = register_io_source(batches, schema=self.schema, explain_name="ETL pairs")
            source.sink_parquet(self.path, compression_level=ZSTD_LEVEL, engine="streaming")
        except BaseException as exc:  # raised in the folding thread by _put / close
            self.error = exc

    def _put(self, item: pl.DataFrame | None) -> None:
        assert self.thread is not None
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.queue.put(item, timeout=0.2)
                return
            except queue.Full:
                if not self.thread.is_alive():
                    raise RuntimeError("the pair table writer stopped") from self.error

    def close(self) -> _Pairs:
        """The table in memory, or the summary of the one written (waits for the writer)."""
        if self.path is None:
            frame = pl.concat(self.parts, rechunk=False)
            self.parts = []
            return _Pairs(frame, self.summary)
        if self.thread is not None:
            self._put(None)
            self.thread.join()
            if self.error is not None:
                raise self.error
        return _Pairs(pl.DataFrame(schema=self.schema), self.summary)

    def abort(self) -> None:
        """End the writer thread after a failure elsewhere (its file is discarded)."""
        if self.thread is not None and self.thread.is_alive():
            with contextlib.suppress(BaseException):
                self._put(None)
            self.thread.join()


def _pair_table(parts: Iterator[pl.DataFrame], path: Path | None) -> _Pairs:
    """The parts as one table in memory (`path` None), else written to `path` as they come,
    holding one part at a time."""
    sink = _PairSink(path)
    try:
        for part in parts:
            sink.add(part)
        return sink.close()
    except BaseException:
        sink.abort()
        raise


def _seen_in(key: pl.Series, earlier: list[pl.Series]) -> pl.Series:
    """Whether each pair key is in one of the `earlier` windows' key sets."""
    seen = pl.repeat(False, len(key), eager=True)
    for previous in earlier:
        seen = seen | key.is_in(previous.implode())
    return seen


def _with_seen(
    parts: Iterator[pl.DataFrame], earlier: list[pl.Series], keys: list[pl.Series]
) -> Iterator[pl.DataFrame]:
    """`seen_before` on each part: its pair key is in one of the `earlier` key sets; each
    part's keys are appended to `keys`."""
    for part in parts:
        key = part.select(_pair_key()).to_series()
        part = part.with_columns(_seen_in(key, earlier).alias("seen_before"))
        keys.append(key)
        yield part
        del part


def _split_and_fold(
    events: pl.DataFrame,
    links: pl.DataFrame,
    smap: SignalMap,
    split_cfg: SplitConfig,
    features: list[str],
    out: Path | None,
    cut: Windows | int | None = None,
) -> tuple[dict[str, _Pairs], Windows | None, pl.DataFrame]:
    """Pair tables per split, the temporal windows (if any), and events with `split`. With
    `out`, each table is written to `<out>/<split>.parquet` (as it is folded, where the split
    allows) and only its summary kept. `cut`: the windows (temporal) or end of data (the
    other methods) to use, rather than those of `events`."""
    method = split_cfg.method

    def path(split: str) -> Path | None:
        return None if out is None else out / f"{split}.parquet"

    if method == "temporal":
        windows = cut if isinstance(cut, Windows) else temporal_windows(events["ts"], split_cfg)
        events = assign_temporal(events, windows)
        return _fold_windows(events, links, smap, windows, features, path), windows, events
    end = cut if isinstance(cut, int) else int(events["ts"].max()) + 1
    pairs = pl.concat(list(_fold_parts(events, links, None, smap, end, features)), rechunk=False)
    pairs = pairs.with_columns(pl.lit(False).alias("seen_before"))
    if method == "none":
        empty = pairs.clear()
        frames = {"train": pairs, "valid": empty, "test": empty}
        tables = {s: _pair_table(iter([frames.pop(s)]), path(s)) for s in SPLITS}
        return tables, None, events.with_columns(pl.lit("train").alias("split"))
    if split_cfg.leave_out == "deepest":
        return _leave_last_deepest(events, links, pairs, smap, end, features, path)
    assigned = leave_last_out(pairs)
    del pairs
    events = join_columns(events, assigned.select(*PAIR, "split"), PAIR)
    tables = {}
    for s in SPLITS:
        table = assigned.filter(pl.col("split") == s).drop("split").sort(_pair_key())
        tables[s] = _pair_table(iter([table]), path(s))
        del table
    return tables, None, events


def _fold_windows(
    events: pl.DataFrame,
    links: pl.DataFrame,
    smap: SignalMap,
    windows: Windows,
    features: list[str],
    path: Callable[[str], Path | None],
) -> dict[str, _Pairs]:
    """The temporal splits' pair tables in one pass: each user slice folds its events by
    (pair, split), each split as of its own window's end; `seen_before` is the pair's key in
    an earlier window of the same slice (a pair's events all lie in its user's slice): the
    fold's own, else found here by set membership."""
    split = pl.col("split")
    cutoff = (
        pl.when(split == "train")
        .then(windows.valid_ms)
        .when(split == "valid")
        .then(windows.test_ms)
        .otherwise(windows.end)
    )
    sinks = {s: _PairSink(path(s)) for s in SPLITS}
    try:
        for part in _fold_parts(events, links, None, smap, cutoff, features, [*PAIR, "split"]):
            earlier: list[pl.Series] = []
            counts = dict(part.group_by("split").len().iter_rows())
            offset = 0
            for name in SPLITS:  # the part is sorted by split (in SPLITS order), then key
                table = part.slice(offset, counts.get(name, 0)).drop("split")
                offset += table.height
                if "seen_before" not in table.columns:  # the hash group-by's part
                    key = table.select(_pair_key()).to_series()
                    table = table.with_columns(_seen_in(key, earlier).alias("seen_before"))
                    earlier.append(key)
                sinks[name].add(table)
                del table
            del part
        return {name: sink.close() for name, sink in sinks.items()}
    except BaseException:
        for sink in sinks.values():
            sink.abort()
        raise


def _leave_last_deepest(
    events: pl.DataFrame,
    links: pl.DataFrame,
    pairs: pl.DataFrame,
    smap: SignalMap,
    end: int,
    features: list[str],
    path: Callable[[str], Path | None],
) -> tuple[dict[str, _Pairs], None, pl.DataFrame]:
    """Each user's last buy tests, the one before validates: those pairs' deepest-level events
    move to the split, everything else (their views and carts included) folds into train."""
    bought = (
        events.filter(pl.col("level") == smap.n_levels)
        .group_by(PAIR)
        .agg(pl.col("ts").max().alias("_bought"))
    )
    by_buy = pairs.join(bought, on=PAIR, how="left").with_columns(
        pl.coalesce("_bought", "last_ts").alias("last_ts")
    )
    del pairs
    held = leave_last_deepest(by_buy, smap.n_levels)
    del by_buy
    events = join_columns(events, held, PAIR).with_columns(
        pl.when(pl.col("split").is_not_null() & (pl.col("level") == smap.n_levels))
        .then(pl.col("split"))
        .otherwise(pl.lit("train"))
        .cast(SPLIT_DTYPE)
        .alias("split")
    )
    tables: dict[str, _Pairs] = {}
    train_keys: list[pl.Series] = []
    for split in SPLITS:
        parts = _fold_parts(events, links, split, smap, end, features)
        if split == "train":
            seen = _with_seen(parts, [], train_keys)
        else:  # the held-out buy was viewed or carted before: repeat intent
            seen = _with_seen(parts, [pl.concat(train_keys, rechunk=False)], [])
        tables[split] = _pair_table(seen, path(split))
    return tables, None, events


def _stats(
    split_cfg: SplitConfig,
    smap: SignalMap,
    inputs: list[str],
    rows_in: int,
    quarantined: dict[str, int],
    duplicates: dict[str, int],
    filtered_counts: dict[str, int],
    counts: EventCounts,
    links: pl.DataFrame,
    cancels: int,
    pair_summaries: dict[str, _PairSummary],
    windows: Windows | None,
    n_users: int,
    n_items: int,
) -> dict[str, Any]:
    """Everything a reviewer checks first: reconciliation, volumes, levels, delays."""
    used = counts.used
    accounted = (
        used + sum(quarantined.values()) + sum(duplicates.values()) + sum(filtered_counts.values())
    )
    names = _level_names(smap)
    per_split = {}
    for split, summary in pair_summaries.items():
        events_in = {"events": counts.per_split.get(split, 0)}
        per_split[split] = events_in | summary.stats(names)
    refunds = links.filter(pl.col("is_refund"))
    linked = links.filter(pl.col("is_cancel") & pl.col("link").is_not_null())
    stats: dict[str, Any] = {
        "signal_map": smap.name,
        # the whole resolved map, so later stages (the serving fold-in) read online events
        # with the meaning the training data was built with
        "signal_map_spec": smap.model_dump(mode="json"),
        "inputs": inputs,
        "reconciliation": {
            "rows_in": rows_in,
            "rows_used": used,
            "quarantined": quarantined,
            "duplicates_removed": duplicates,
            "filtered": filtered_counts,
            "balanced": accounted == rows_in,
        },
        "quarantine_expected": {r: REASON_EXPECTED[r] for r in quarantined},
        "time_range": {"first": _ms_text(counts.first_ts), "last": _ms_text(counts.last_ts)},
        "split": {"method": split_cfg.method},
        "events_per_signal": counts.per_signal,
        "splits": per_split,
        "cancellations": {
            "linked_by": _counts(linked, "link"),
            "unlinked": cancels - linked.height,
        },
        "delays_s": {
            "click_to_purchase": _quantiles(
                links.filter(pl.col("is_purchase"))["clock_delay_ms"] / 1000
            ),
            "purchase_to_refund": _quantiles(
                (refunds["ts"] - refunds["linked_ts"]).drop_nulls() / 1000
            ),
        },
        "vocabulary": {
            "users": n_users,
            "items": n_items,
        },
        "levels": {str(k): v for k, v in names.items()},
    }
    if windows is not None:
        stats["split"] |= {
            "valid_start": _ms_text(windows.valid_ms),
            "test_start": _ms_text(windows.test_ms),
            "end": _ms_text(windows.end),
        }
    return stats


# a pandas DataFrame is accepted too (converted with pl.from_pandas; pandas stays optional)
EventsInput = pl.DataFrame | pl.LazyFrame | str | Path | list[str | Path]
SignalMapInput = SignalMap | dict[str, Any] | str | Path


def _as_signal_map(obj: SignalMapInput) -> SignalMap:
    """A SignalMap from a SignalMap, a dict or the path of a YAML file."""
    if isinstance(obj, SignalMap):
        return obj
    if isinstance(obj, dict):
        return build_model(SignalMap, obj, "signal map")
    if isinstance(obj, str | Path):
        return load_signal_map(obj)
    raise ConfigError(
        f"signal_map: expected a SignalMap, a dict or a YAML path, got {type(obj).__name__}"
    )


def _section(model: type[M], value: M | dict[str, Any] | None, name: str) -> M:
    """A config section given as the model, a dict (validated, errors name the field) or None
    (the defaults)."""
    if isinstance(value, model):
        return value
    if value is None:
        value = {}
    if not isinstance(value, dict):
        got = type(value).__name__
        raise ConfigError(f"{name}: expected a dict or {model.__name__}, got {got}")
    return build_model(model, value, name)


def _raw_events(
    events: Any, input: Any
) -> tuple[Callable[[bool], pl.LazyFrame], InputConfig, list[str]]:
    """`read(tolerant)` giving the raw canonical rows (with provenance; see
    `_read_tolerantly`), the input settings and the inputs' names."""
    if type(events).__module__.split(".")[0] == "pandas":
        events = pl.from_pandas(events)
    if isinstance(events, pl.DataFrame | pl.LazyFrame):
        # the paths only say where file input comes from: a frame needs none
        cfg = _section(InputConfig, _with_paths(input, [MEMORY_SOURCE]), "input")
        if cfg.adapter != "canonical":
            raise ConfigError(
                f"input.adapter: '{cfg.adapter}' reads files; a frame must already be in the "
                "canonical schema (rename columns with input.columns)"
            )
        raw = read_frame(events, cfg)
        return lambda tolerant: raw, cfg, [MEMORY_SOURCE]
    if isinstance(events, str | Path):
        events = [events]
    if isinstance(events, list | tuple) and all(isinstance(e, str | Path) for e in events):
        cfg = _section(InputConfig, _with_paths(input, [str(e) for e in events]), "input")
        raw, files = read_events(cfg)

        def read(tolerant: bool) -> pl.LazyFrame:
            return read_events(cfg, tolerant=True)[0] if tolerant else raw

        return read, cfg, [str(f) for f in files]
    raise ConfigError(
        "events: expected a Polars DataFrame/LazyFrame, a pandas DataFrame, or a path, glob "
        f"or list of them, got {type(events).__name__}"
    )


def _with_paths(input: Any, paths: list[str]) -> Any:
    """`input` with its paths set to where the events come from (they are given apart)."""
    if isinstance(input, InputConfig):
        return input.model_copy(update={"paths": paths})
    if input is None:
        return {"paths": paths}
    if isinstance(input, dict):
        return input | {"paths": paths}
    return input  # _section names the wrong type


def run(
    events: EventsInput,
    signal_map: SignalMapInput,
    *,
    split: SplitConfig | dict[str, Any] | None = None,
    filters: FilterConfig | dict[str, Any] | None = None,
    input: InputConfig | dict[str, Any] | None = None,
    out: str | Path | None = None,
    vocab_from: str | Path | Interactions | None = None,
    quiet: bool = True,
) -> Interactions:
    """The ETL on events held in memory (a Polars or pandas frame) or read from paths/globs,
    returning its tables in memory. Same validation, quarantine, de-duplication, folding and
    split as `recfb etl`; nothing is written unless `out` is given, then the directory
    `recfb etl` writes is written there atomically. The vocabularies extend `vocab_from` (a
    directory or an earlier run), by default `out`'s, as `recfb etl` does."""
    smap = _as_signal_map(signal_map)
    split_cfg = _section(SplitConfig, split, "split")
    filter_cfg = _section(FilterConfig, filters, "filters")
    read, input_cfg, inputs = _raw_events(events, input)
    if isinstance(vocab_from, Interactions):
        users_vocab, items_vocab = vocab_from.users, vocab_from.items
    else:
        vocab_dir = vocab_from if vocab_from is not None else out
        users_vocab, items_vocab = load_vocab(vocab_dir, "user"), load_vocab(vocab_dir, "item")
    timer = StageTimer(quiet)
    with timer.stage("read + validate"):
        validated = list(validate_in_memory(read, input_cfg, smap, ", ".join(inputs[:5])))
    extras = validated[2]
    data = build_tables(
        validated.pop(0),  # no reference left here: the frame goes once deduplicated
        validated.pop(0),
        extras,
        inputs,
        smap,
        split_cfg,
        filter_cfg,
        users_vocab,
        items_vocab,
        timer,
    )
    with timer.stage("collect"):
        data.events = data.events.collect(engine="streaming").lazy()
    if out is not None:
        data.directory = data.save(out)
    return data

"""Features of (user, candidate item) pairs: one module, used offline and in the service.

Everything is computed from a snapshot's events as of `now_ms` (`recfb.rank.state`), so the
ranker sees in production exactly what it learnt from: an item carted a second ago counts as
soon as the event log has it. Groups (the ablation drops one at a time):

- ``pair``: the pair's history: events per raw signal, deepest level reached, hours since the
  last event of each level and since the first event;
- ``item``: events per level over recent windows and all time, distinct users, trending (the
  last day against the window's daily mean), CVR and refund rate (delay-corrected where the
  log has a conversion cascade, `recfb.delayed`);
- ``user``: activity (events, items, the last day), the share of the user's events at the
  deepest level, hours since the user's last event;
- ``category``: the share of the user's events in the candidate's category;
- ``source``: each candidate source's score and rank (missing where it did not propose it)
  and how many sources proposed the pair.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import lru_cache

import numpy as np
import polars as pl

from recfb.rank.config import SOURCES
from recfb.rank.state import Snapshot

HOUR_MS = 3_600_000.0
DAY_MS = 24 * HOUR_MS


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c == "_" else "_" for c in name)


def feature_columns(snap: Snapshot, groups: list[str], windows: list[float]) -> list[str]:
    """The ranker's columns in a fixed order (what the bundle records with the model)."""
    levels = [_safe(n) for n in snap.level_names]
    cols: list[str] = []
    if "pair" in groups:
        cols += [f"pair_n_{_safe(s)}" for s in snap.signal_names]
        cols += ["pair_max_level", "pair_n_events", "pair_h_since_first"]
        cols += [f"pair_h_since_{lv}" for lv in levels]
    if "item" in groups:
        for w in [*windows, None]:
            tag = "all" if w is None else f"{w:g}d"
            cols += [f"item_n_{lv}_{tag}" for lv in levels]
        cols += ["item_users", "item_trend", "item_cvr", "item_refund_rate"]
    if "user" in groups:
        cols += ["user_n_events", "user_n_items", "user_n_events_1d", "user_deep_share"]
        cols += ["user_h_since_last"]
    if "category" in groups and snap.category is not None:
        cols += ["cat_user_share"]
    if "source" in groups:
        cols += [f"{s}_{kind}" for s in SOURCES for kind in ("score", "rank")]
        cols += ["n_sources"]
    return cols


def item_stats(
    snap: Snapshot, windows: list[float], rates: pl.DataFrame | None = None
) -> pl.DataFrame:
    """One row per item (all `n_items`, in order): the ``item`` group's columns as of `now`.

    `rates` (``item_idx, cvr, refund_rate``) are the delay-corrected rates; without them the
    naive rates (deepest-level events over first-level events, with one pseudo-trial at the
    catalogue's rate) are used."""
    levels = [_safe(n) for n in snap.level_names]
    ev = snap.events.lazy()
    aggs = []
    for w in [*windows, None]:
        tag = "all" if w is None else f"{w:g}d"
        recent = pl.lit(True) if w is None else pl.col("ts_ms") >= snap.now_ms - w * DAY_MS
        for t, lv in enumerate(levels, start=1):
            aggs.append(((pl.col("level") == t) & recent).sum().alias(f"item_n_{lv}_{tag}"))
    aggs.append(pl.col("user_idx").filter(pl.col("level") > 0).n_unique().alias("item_users"))
    aggs.append(pl.len().alias("_n_all"))
    aggs.append((pl.col("ts_ms") >= snap.now_ms - DAY_MS).sum().alias("_n_1d"))
    span = max(windows) if windows else 7.0
    aggs.append((pl.col("ts_ms") >= snap.now_ms - span * DAY_MS).sum().alias("_n_span"))
    grouped = ev.group_by("item_idx").agg(aggs).collect()
    out = (
        pl.DataFrame({"item_idx": np.arange(snap.n_items, dtype=np.int64)})
        .join(grouped, on="item_idx", how="left")
        .fill_null(0)
    )
    out = out.with_columns(
        ((pl.col("_n_1d") + 1) / (pl.col("_n_span") / span + 1)).alias("item_trend")
    )
    first, deepest = f"item_n_{levels[0]}_all", f"item_n_{levels[-1]}_all"
    if rates is not None:
        out = out.join(rates.select("item_idx", "cvr", "refund_rate"), on="item_idx", how="left")
        out = out.rename({"cvr": "item_cvr", "refund_rate": "item_refund_rate"})
    else:
        total_first = max(float(out[first].sum()), 1.0)
        base = float(out[deepest].sum()) / total_first
        out = out.with_columns(
            ((pl.col(deepest) + base) / (pl.col(first) + 1)).alias("item_cvr"),
            pl.lit(None, dtype=pl.Float64).alias("item_refund_rate"),
        )
    return out.drop("_n_all", "_n_1d", "_n_span").sort("item_idx")


def recent_events(events: pl.DataFrame, now_ms: int, days: float, per_user: int) -> pl.DataFrame:
    """Each user's events of the last `days` before `now_ms`, at most the newest `per_user`:
    the history the pair, user and category features and the history source see, offline
    and (as the bundle's `history.parquet`) online."""
    from_end = pl.len().over("user_idx") - pl.int_range(pl.len()).over("user_idx")
    return (
        events.filter(pl.col("ts_ms") >= now_ms - days * DAY_MS)
        .sort(["user_idx", "ts_ms"], maintain_order=True)
        .filter(from_end <= per_user)
    )


class ItemTable:
    """Item statistics as one float32 matrix (rows = item_idx), so a request gathers its
    candidates' rows without touching the frame."""

    def __init__(self, frame: pl.DataFrame) -> None:
        self.frame = frame.sort("item_idx")
        self.names = [c for c in self.frame.columns if c != "item_idx"]
        self.column = {name: j for j, name in enumerate(self.names)}
        self.matrix = (
            self.frame.select(pl.col(self.names).cast(pl.Float32).fill_null(np.nan))
            .to_numpy()
            .astype(np.float32)
        )


@dataclass
class EventArrays:
    """Events as parallel numpy arrays (`signal` is the index into the signal map's names, -1
    for a name it does not know): what the feature and history code group over. A request's
    few hundred rows cost microseconds here, where a dataframe query has a fixed cost of a
    few hundred (the service's p99 budget is 10 ms)."""

    user: np.ndarray  # int64
    item: np.ndarray  # int64
    signal: np.ndarray  # int16
    level: np.ndarray  # int8
    ts: np.ndarray  # int64, ms

    @classmethod
    def from_frame(cls, events: pl.DataFrame, signal_names: list[str]) -> EventArrays:
        """From a frame with `EVENT_COLUMNS` (event names as strings)."""
        code = {name: i for i, name in enumerate(signal_names)}
        return cls(
            user=events["user_idx"].cast(pl.Int64).to_numpy(),
            item=events["item_idx"].cast(pl.Int64).to_numpy(),
            signal=events["event"]
            .cast(pl.String)
            .replace_strict(code, default=-1, return_dtype=pl.Int16)
            .to_numpy(),
            level=events["level"].cast(pl.Int8).to_numpy(),
            ts=events["ts_ms"].cast(pl.Int64).to_numpy(),
        )

    @classmethod
    def empty(cls) -> EventArrays:
        return cls(
            *(np.empty(0, dtype=d) for d in (np.int64, np.int64, np.int16, np.int8, np.int64))
        )

    def __len__(self) -> int:
        return len(self.ts)

    def take(self, index: np.ndarray | slice) -> EventArrays:
        return EventArrays(*(getattr(self, f.name)[index] for f in fields(self)))

    @staticmethod
    def concat(parts: list[EventArrays]) -> EventArrays:
        if len(parts) == 1:
            return parts[0]
        names = [f.name for f in fields(EventArrays)]
        return EventArrays(*(np.concatenate([getattr(p, n) for p in parts]) for n in names))


def run_starts(ordered: np.ndarray) -> np.ndarray:
    """Whether each row of a sorted array starts a run of equal values."""
    first = np.empty(len(ordered), dtype=bool)
    first[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    return first


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """`np.unique` of a 1-d array by one sort: the same values, without its hashing pass that
    costs tens of microseconds on a request's few hundred rows."""
    ordered = np.sort(values)
    return ordered[run_starts(ordered)]


@dataclass
class Groups:
    """`keys` grouped by a sort: the distinct keys (ascending), each row's group and the
    sort order with the groups' start offsets, so `reduceat` aggregates any aligned column."""

    keys: np.ndarray
    order: np.ndarray
    starts: np.ndarray
    row_group: np.ndarray  # group of each (unsorted) row

    @classmethod
    def of(cls, key: np.ndarray) -> Groups:
        order = np.argsort(key, kind="stable")
        ordered = key[order]
        first = run_starts(ordered)
        starts = np.flatnonzero(first)
        row_group = np.empty(len(key), dtype=np.int64)
        row_group[order] = np.cumsum(first) - 1
        return cls(ordered[starts], order, starts, row_group)

    def __len__(self) -> int:
        return len(self.keys)

    def sizes(self) -> np.ndarray:
        return np.diff(np.append(self.starts, len(self.order)))

    def max(self, values: np.ndarray) -> np.ndarray:
        """Per group (along the first axis of a 1-d or 2-d `values`)."""
        return np.maximum.reduceat(values[self.order], self.starts) if len(self) else values[:0]

    def min(self, values: np.ndarray) -> np.ndarray:
        return np.minimum.reduceat(values[self.order], self.starts) if len(self) else values[:0]

    def sum(self, values: np.ndarray) -> np.ndarray:
        return np.add.reduceat(values[self.order], self.starts) if len(self) else values[:0]

    def lookup(self, key: np.ndarray) -> Lookup:
        """Where each of `key` is among the groups (a missing one points past the end)."""
        pos = np.searchsorted(self.keys, key)
        hit = pos < len(self.keys)
        hit[hit] = self.keys[pos[hit]] == key[hit]
        return Lookup(np.where(hit, pos, len(self.keys)))


@dataclass
class Lookup:
    """Per-group values gathered for other rows, with a fill where a row has no group."""

    index: np.ndarray

    def gather(self, values: np.ndarray, fill: float) -> np.ndarray:
        """`values` (groups, ...) -> (rows, ...), float64."""
        ext = np.empty((len(values) + 1, *values.shape[1:]), dtype=np.float64)
        ext[:-1] = values
        ext[-1] = fill
        return ext[self.index]


_NO_TS = np.iinfo(np.int64).min
USER_COLUMNS = (
    "user_n_events",
    "user_n_items",
    "user_n_events_1d",
    "user_deep_share",
    "user_h_since_last",
)


def _hours_since(now_ms: int, ts: np.ndarray) -> np.ndarray:
    """Hours from `ts` to now (float64, as the offline frames computed it); NaN where unset."""
    out = (now_ms - ts) / HOUR_MS
    out[ts == _NO_TS] = np.nan
    return out


def pair_features(
    ev: EventArrays,
    cand_key: np.ndarray,
    n_items: int,
    signal_names: list[str],
    level_names: list[str],
    now_ms: int,
) -> tuple[list[str], np.ndarray, Groups]:
    """The ``pair`` group for candidate pairs (`user * n_items + item`): counts per signal,
    deepest level (0 without events), hours since the first event and the last per level,
    as (names, float64 matrix with a column per name). Also returns the pair groups (the
    user features count distinct items from them). One gather for all columns: a request
    pays numpy's per-call cost once, not per feature."""
    groups = Groups.of(ev.user * n_items + ev.item)
    n_signals, n_levels = len(signal_names), len(level_names)
    known = ev.signal >= 0
    counts = np.bincount(
        groups.row_group[known] * n_signals + ev.signal[known], minlength=len(groups) * n_signals
    ).reshape(len(groups), n_signals)
    levels = np.arange(1, n_levels + 1, dtype=ev.level.dtype)
    by_level = np.where(ev.level[:, None] == levels[None, :], ev.ts[:, None], _NO_TS)
    per_pair = np.empty((len(groups), n_signals + 3 + n_levels), dtype=np.float64)
    per_pair[:, :n_signals] = counts
    per_pair[:, n_signals] = groups.max(ev.level)
    per_pair[:, n_signals + 1] = groups.sizes()
    per_pair[:, n_signals + 2] = _hours_since(now_ms, groups.min(ev.ts))
    per_pair[:, n_signals + 3 :] = _hours_since(now_ms, groups.max(by_level))
    names, fill = _pair_names(tuple(signal_names), tuple(level_names))
    return names, groups.lookup(cand_key).gather(per_pair, fill), groups


@lru_cache(maxsize=64)
def _pair_names(signals: tuple[str, ...], levels: tuple[str, ...]) -> tuple[list, np.ndarray]:
    """The pair columns in `pair_features`' order and their value without events."""
    names = [f"pair_n_{_safe(s)}" for s in signals]
    names += ["pair_max_level", "pair_n_events", "pair_h_since_first"]
    names += [f"pair_h_since_{_safe(n)}" for n in levels]
    fill = np.zeros(len(names))
    fill[len(signals) + 2 :] = np.nan
    return names, fill


def user_features(
    ev: EventArrays,
    groups: Groups,
    pairs: Groups,
    cand_user: np.ndarray,
    n_items: int,
    n_levels: int,
    now_ms: int,
) -> tuple[list[str], np.ndarray]:
    """The ``user`` group for each candidate's user (NaN for a user without events), as
    (names, float64 matrix); `groups` and `pairs` are `ev`'s user and (user, item) groups."""
    at = groups.lookup(cand_user)
    pair_users = pairs.keys // n_items
    n_items_of = np.searchsorted(pair_users, groups.keys, side="right") - np.searchsorted(
        pair_users, groups.keys, side="left"
    )
    size = groups.sizes()
    stats = (
        np.stack(
            [
                size,
                n_items_of,
                groups.sum((ev.ts >= now_ms - DAY_MS).astype(np.int64)),
                groups.sum((ev.level == n_levels).astype(np.int64)) / np.maximum(size, 1),
                _hours_since(now_ms, groups.max(ev.ts)),
            ],
            axis=1,
        )
        if len(groups)
        else np.empty((0, 5))
    )
    return list(USER_COLUMNS), at.gather(stats, np.nan)


def category_share(
    ev: EventArrays,
    users: Groups,
    cand_user: np.ndarray,
    cand_item: np.ndarray,
    category: np.ndarray,
) -> np.ndarray:
    """The share of each candidate's user's events in the candidate's category (0 if none);
    `users` are `ev`'s user groups."""
    width = int(category.max(initial=0)) + 2  # codes -1 .. max
    groups = Groups.of(ev.user * width + category[ev.item] + 1)
    n = groups.lookup(cand_user * width + category[cand_item] + 1).gather(groups.sizes(), 0.0)
    total = users.lookup(cand_user).gather(users.sizes(), 0.0)
    return np.divide(n, total, out=np.zeros_like(n), where=total > 0)


@dataclass
class CandidateSet:
    """One row per (user, item) proposed by any source, sorted by user then item (the
    ranker's query groups), with every source's score and rank (NaN where a source did not
    propose the pair); columns of `scores` and `ranks` follow `SOURCES`."""

    user: np.ndarray  # int64
    item: np.ndarray  # int64
    scores: np.ndarray  # float32 (n, len(SOURCES))
    ranks: np.ndarray  # float32 (n, len(SOURCES))

    def __len__(self) -> int:
        return len(self.item)

    def take(self, index: np.ndarray) -> CandidateSet:
        return CandidateSet(
            self.user[index], self.item[index], self.scores[index], self.ranks[index]
        )

    def proposed_by(self, source: str) -> np.ndarray:
        """Rows the source proposed."""
        return ~np.isnan(self.ranks[:, SOURCES.index(source)])

    def to_frame(self) -> pl.DataFrame:
        data: dict[str, pl.Series] = {
            "user_idx": pl.Series(self.user, dtype=pl.Int64),
            "item_idx": pl.Series(self.item, dtype=pl.Int64),
        }
        for j, s in enumerate(SOURCES):
            data[f"{s}_score"] = pl.Series(self.scores[:, j], dtype=pl.Float32, nan_to_null=True)
            rank = pl.Series(self.ranks[:, j], dtype=pl.Float32, nan_to_null=True)
            data[f"{s}_rank"] = rank.cast(pl.Int32)
        return pl.DataFrame(data)

    @classmethod
    def from_frame(cls, frame: pl.DataFrame) -> CandidateSet:
        def block(kind: str) -> np.ndarray:
            cols = [
                pl.col(f"{s}_{kind}").cast(pl.Float32)
                if f"{s}_{kind}" in frame.columns
                else pl.lit(None, pl.Float32).alias(f"{s}_{kind}")
                for s in SOURCES
            ]
            out = frame.select(cols).to_numpy().astype(np.float32)
            return out.reshape(frame.height, len(SOURCES))

        return cls(
            frame["user_idx"].cast(pl.Int64).to_numpy(),
            frame["item_idx"].cast(pl.Int64).to_numpy(),
            block("score"),
            block("rank"),
        )


def feature_matrix(
    cands: CandidateSet,
    events: EventArrays,
    items: ItemTable,
    snap: Snapshot,
    now_ms: int,
    columns: list[str],
) -> np.ndarray:
    """Feature matrix (float32, one row per candidate in order, `columns` in order; NaN =
    missing) from the candidate users' events as of `now_ms` and the `items` statistics: the
    one implementation the offline stages and the service share."""
    n_items = max(snap.n_items, len(items.matrix))
    users = sorted_unique(cands.user)
    if len(events) and not (len(users) == 1 and (events.user == users[0]).all()):
        events = events.take(np.isin(events.user, users, kind="sort" if len(users) > 64 else None))
    place = _placement(
        tuple(columns),
        tuple(items.names),
        tuple(snap.signal_names),
        tuple(snap.level_names),
        snap.category is not None,
    )
    # blocks of (names, values with a column per name), each written into place at once
    blocks: list[tuple[list[str], np.ndarray]] = []
    pairs = None
    if place.wants_pair:
        names, values, pairs = pair_features(
            events,
            cands.user * n_items + cands.item,
            n_items,
            snap.signal_names,
            snap.level_names,
            now_ms,
        )
        blocks.append((names, values))
    wants_category = place.wants_category
    user_groups = Groups.of(events.user) if wants_category or pairs is not None else None
    if place.wants_user:
        blocks.append(
            user_features(events, user_groups, pairs, cands.user, n_items, snap.n_levels, now_ms)
        )
    if wants_category:
        share = category_share(events, user_groups, cands.user, cands.item, snap.category)
        blocks.append((["cat_user_share"], share[:, None]))
    blocks.append((list(SOURCE_SCORES), cands.scores))
    blocks.append((list(SOURCE_RANKS), cands.ranks))
    n_sources = (~np.isnan(cands.ranks)).sum(axis=1)
    blocks.append((["n_sources"], n_sources[:, None]))
    # filled as rows of the transpose (contiguous writes), then turned once
    block = np.full((len(columns), len(cands)), np.nan, dtype=np.float32)
    for names, values in blocks:
        rows, cols = place.of(tuple(names))
        if len(rows):
            block[rows] = values[:, cols].T
    if len(place.item_rows):
        block[place.item_rows] = items.matrix[cands.item][:, place.item_cols].T
    return np.ascontiguousarray(block.T)


SOURCE_SCORES = tuple(f"{s}_score" for s in SOURCES)
SOURCE_RANKS = tuple(f"{s}_rank" for s in SOURCES)


@dataclass(frozen=True, eq=False)  # hashed by identity: one per cached column list
class _Placement:
    """Where a column list puts each computed feature and item statistic (built once per
    column list: a request then writes a few blocks instead of looping over names)."""

    position: dict[str, int]
    wants_pair: bool
    wants_user: bool
    wants_category: bool
    item_rows: np.ndarray  # rows of the (columns, n) block taken from the item table
    item_cols: np.ndarray  # ... and the item table's columns for them

    def of(self, names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
        """(block rows, value columns) of the `names` that `columns` holds."""
        return _positions(self, names)


@lru_cache(maxsize=256)
def _positions(place: _Placement, names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    found = [(place.position[n], k) for k, n in enumerate(names) if n in place.position]
    return (
        np.array([j for j, _ in found], dtype=np.int64),
        np.array([k for _, k in found], dtype=np.int64),
    )


@lru_cache(maxsize=64)
def _placement(
    columns: tuple[str, ...],
    item_names: tuple[str, ...],
    signals: tuple[str, ...],
    levels: tuple[str, ...],
    has_category: bool,
) -> _Placement:
    """A column is computed where `feature_matrix` computes it, else taken from the item
    table where that has it, else left missing."""
    wants_pair = any(c.startswith(("pair_", "user_")) for c in columns)
    wants_user = any(c.startswith("user_") for c in columns)
    wants_category = "cat_user_share" in columns and has_category
    computed = {*SOURCE_SCORES, *SOURCE_RANKS, "n_sources"}
    if wants_pair:
        computed |= set(_pair_names(signals, levels)[0])
    if wants_user:
        computed |= set(USER_COLUMNS)
    if wants_category:
        computed.add("cat_user_share")
    item_column = {name: k for k, name in enumerate(item_names)}
    from_items = [
        (j, item_column[c]) for j, c in enumerate(columns) if c not in computed and c in item_column
    ]
    return _Placement(
        position={c: j for j, c in enumerate(columns)},
        wants_pair=wants_pair,
        wants_user=wants_user,
        wants_category=wants_category,
        item_rows=np.array([j for j, _ in from_items], dtype=np.int64),
        item_cols=np.array([k for _, k in from_items], dtype=np.int64),
    )


def build_features(
    candidates: pl.DataFrame | CandidateSet,
    events: pl.DataFrame | EventArrays,
    items: ItemTable,
    snap: Snapshot,
    now_ms: int,
    columns: list[str],
) -> np.ndarray:
    """`feature_matrix` for frames: `candidates` (``user_idx, item_idx`` and each source's
    score and rank) and `events` (`EVENT_COLUMNS`)."""
    if isinstance(candidates, pl.DataFrame):
        candidates = CandidateSet.from_frame(candidates)
    if isinstance(events, pl.DataFrame):
        events = EventArrays.from_frame(events, snap.signal_names)
    return feature_matrix(candidates, events, items, snap, now_ms, columns)

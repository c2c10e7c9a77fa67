"""The Ray ETL's per-shard phases (clean, filters, ranges, fold: the local engine's own
code) and the reductions between them that need every shard (cut points, k-core, ranges)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from recfb.etl.config import EtlConfig, FilterConfig, SplitConfig
from recfb.etl.filters import FilterDecision, engaged_pairs, outlier_rate, user_rates
from recfb.etl.interactions import ZSTD_LEVEL
from recfb.etl.on_ray.workfiles import ORDER, drop_phase, keep_rows, write_parts
from recfb.etl.pipeline import EventCounts, _PairSummary, clean_events, finish_filters, fold_events
from recfb.etl.signals import SignalMap
from recfb.etl.split import Windows, lower_rank, windows_at
from recfb.etl.vocab import attach_index
from recfb.progress import StageTimer


@dataclass
class Firsts:
    """What the vocabularies and cut points need of a shard's final events."""

    users: pl.DataFrame  # user_id, ts, events: each user's first event time, events
    items: pl.DataFrame
    ts_range: tuple[int, int]  # the first and last event time
    hours: pl.DataFrame | None  # temporal split: hour (ts // 1 h), len: events per hour


@dataclass
class CleanShard:
    path: Path | None  # the shard's clean events (None: nothing left)
    duplicates: dict[str, int]
    filtered: pl.DataFrame
    firsts: Firsts | None  # None while filters are still to be applied
    rates: pl.DataFrame | None = None  # user_id, rate (the outlier filter)
    pairs: Path | None = None  # its engaged (user_id, item_id) pairs (the k-core), on disk


@dataclass
class FoldedShard:
    out: Path
    counts: EventCounts
    links: pl.DataFrame
    cancels: int
    summaries: dict[str, _PairSummary]


def shard_firsts(rows: pl.DataFrame, split: SplitConfig) -> Firsts | None:
    if rows.height == 0:
        return None
    users = rows.group_by("user_id").agg(pl.col("ts").min(), pl.len().alias("events"))
    items = rows.group_by("item_id").agg(pl.col("ts").min())
    hours = None
    if split.method == "temporal":
        hours = rows.group_by((pl.col("ts") // _HOUR_MS).alias("hour")).len()
    ts_range = (int(rows["ts"].min()), int(rows["ts"].max()))
    return Firsts(users, items, ts_range, hours)


_HOUR_MS = 3_600_000


def cut_points(
    firsts: list[Firsts], paths: list[Path], split: SplitConfig, ts_in: Any, ray: Any
) -> Windows | int:
    """The temporal windows of every shard's event times, exact, without gathering them: a
    quantile's rank falls in one hour of the added hourly counts, and only that hour's
    times are fetched from the shards (`ts_in`). Other splits: the end of data."""
    start = min(f.ts_range[0] for f in firsts)
    end = max(f.ts_range[1] for f in firsts) + 1
    if split.method != "temporal":
        return end
    hours = (
        pl.concat([f.hours for f in firsts if f.hours is not None])
        .group_by("hour")
        .agg(pl.col("len").sum())
        .sort("hour")
    )
    counts = hours["len"]
    cumulative = counts.cum_sum()

    def quantile(q: float) -> int:
        rank = lower_rank(q, int(counts.sum()))
        at = int((cumulative <= rank).sum())  # the first hour whose count passes the rank
        hour = int(hours["hour"][at])
        before = int(cumulative[at]) - int(counts[at])
        span = (hour * _HOUR_MS, (hour + 1) * _HOUR_MS)
        times = pl.concat(ray.get([ts_in.remote(p, *span) for p in paths])).sort()
        return int(times[rank - before])

    return windows_at(start, end, quantile, split)


def times_in(path: Path, low: int, high: int) -> pl.Series:
    """A shard's event times in [low, high)."""
    ts = pl.scan_parquet(path).select("ts").filter(pl.col("ts").is_between(low, high, "left"))
    return ts.collect()["ts"]


def clean_shard(
    sources: list[Path], losers: list[Path], smap: SignalMap, cfg: EtlConfig, out: Path
) -> CleanShard:
    """One shard's `clean_events`, written to `out`: its parts from every input file (in
    input order), less the rows whose event_id an earlier row took (`losers`); what the
    reductions need of it (with filters: what deciding them needs, the filters themselves
    applied later)."""
    events = pl.concat([pl.read_parquet(p) for p in sources], how="vertical_relaxed")
    if losers:
        lost = pl.concat([pl.read_parquet(p) for p in losers])
        events = events.join(lost, on=ORDER, how="anti", maintain_order="left")
    events = events.drop(ORDER)
    filtering = cfg.filters.active
    cleaned = clean_events(events, smap, cfg.filters, StageTimer(quiet=True), not filtering)
    del events
    rows = cleaned.events
    if not filtering:
        firsts = shard_firsts(rows, cfg.split)
        return CleanShard(keep_rows(rows, out), cleaned.duplicates, cleaned.filtered, firsts)
    rates = user_rates(rows) if cfg.filters.outlier_users else None
    core = cfg.filters.k_core
    pairs = keep_rows(engaged_pairs(rows), core_path(out.parent, 0, out)) if core else None
    path = keep_rows(rows, out)
    return CleanShard(path, cleaned.duplicates, cleaned.filtered, None, rates, pairs)


def outliers(
    cleaned: list[CleanShard], filters: FilterConfig
) -> tuple[float | None, list[pl.Series | None]]:
    """The outlier rate from every user's rate (the local rule), and each shard's users
    above it."""
    if not filters.outlier_users:
        return None, [None] * len(cleaned)
    rate = outlier_rate(pl.concat([c.rates for c in cleaned]), filters.outlier_rate_factor)
    return rate, [c.rates.filter(pl.col("rate") > rate)["user_id"] for c in cleaned]


def core_path(work: Path, round_: int, shard_file: Path) -> Path:
    """A shard's engaged pairs after peeling round `round_` (0: as cleaned)."""
    return work / f"core-{round_}-{shard_file.name.split('-')[-1]}"


def peel_pairs(
    source: Path | None,
    out: Path,
    bots: pl.Series | None,
    dead_items: pl.Series | None,
    min_user_items: int,
) -> tuple[Path | None, pl.DataFrame | None]:
    """One round of the k-core on one shard's engaged pairs: the pairs of outlier users and
    of the items found under their minimum on the whole data go, then the users left with
    too few items (a user's pairs are all in its shard). The pairs left are written to
    `out`; their items' degrees returned for the next reduction."""
    if source is None:
        return None, None
    pairs = pl.read_parquet(source)
    if bots is not None:
        pairs = pairs.filter(~pl.col("user_id").is_in(bots.implode()))
    if dead_items is not None:
        pairs = pairs.filter(~pl.col("item_id").is_in(dead_items.implode()))
    if min_user_items:
        pairs = pairs.filter(pl.len().over("user_id") >= min_user_items)
    return keep_rows(pairs, out), pairs.group_by("item_id").len()


def k_core_on_shards(
    cleaned: list[CleanShard],
    bots: list[pl.Series | None],
    filters: FilterConfig,
    peel: Any,
    ray: Any,
    work: Path,
) -> tuple[list[Path | None], pl.Series | None]:
    """The k-core of every shard's engaged pairs without gathering them: rounds of `peel_pairs`
    on the shards, each followed by a reduction of the items' degrees (added over shards)
    that finds the items under `min_item_users`, until none is. The same core as the local
    `k_core` (the k-core is unique, whatever order the peeling takes). Returns each shard's
    pairs in the core and the core's items."""
    paths = [c.pairs for c in cleaned]
    dead: pl.Series | None = None
    round_ = 0
    while True:
        round_ += 1
        done = ray.get(
            [
                peel.remote(
                    path,
                    core_path(work, round_, c.pairs) if c.pairs else None,
                    bots[i] if round_ == 1 else None,
                    dead,
                    filters.min_user_items,
                )
                for i, (path, c) in enumerate(zip(paths, cleaned, strict=True))
            ]
        )
        drop_phase(work, f"core-{round_ - 1}")
        paths = [path for path, _ in done]
        found = [degrees for _, degrees in done if degrees is not None]
        if not found:
            return paths, None
        degrees = pl.concat(found).group_by("item_id").agg(pl.col("len").sum())
        dead = degrees.filter(pl.col("len") < filters.min_item_users)["item_id"]
        if dead.len() == 0:
            return paths, degrees["item_id"]


def filter_shard(
    source: Path,
    cfg: EtlConfig,
    rate: float | None,
    core: Path | None,
    core_items: pl.Series | None,
) -> tuple[Path | None, pl.DataFrame, Firsts | None]:
    """One shard's filters as decided on the whole data (the outlier rate; with a k-core,
    the shard's pairs in it and the core's items); its kept events rewritten."""
    events = pl.read_parquet(source)
    decided = FilterDecision(outlier_rate=rate)
    if cfg.filters.k_core:
        users = pl.read_parquet(core)["user_id"].unique() if core else events["user_id"].clear()
        items = events["item_id"].clear() if core_items is None else core_items
        decided = FilterDecision(rate, users, items.cast(events.schema["item_id"]))
    events, removed = finish_filters(events, cfg.filters, decided)
    kept = keep_rows(events, source.with_name(source.name.replace("clean-", "filtered-")))
    return kept, removed, shard_firsts(events, cfg.split)


def user_ranges(
    firsts: list[Firsts], users_vocab: pl.DataFrame, n_ranges: int
) -> list[pl.DataFrame]:
    """Per shard, its users' range (`user_id`, `range`): consecutive user indices with about
    equal events each, so the folded ranges, concatenated in order, are the local engine's
    output order (by user index) without a merge."""
    per_user = pl.concat(
        [f.users.select("user_id", "events").with_columns(shard=i) for i, f in enumerate(firsts)]
    )
    indexed = attach_index(per_user, users_vocab, "user").sort("user_idx")
    before = indexed["events"].cum_sum() - indexed["events"]  # events of earlier users
    total = int(indexed["events"].sum())
    ranged = indexed.with_columns(
        (before * n_ranges // max(total, 1)).clip(0, n_ranges - 1).cast(pl.UInt32).alias("range")
    )
    return [
        ranged.filter(pl.col("shard") == i).select("user_id", "range") for i in range(len(firsts))
    ]


def to_ranges(source: Path, ranges: pl.DataFrame, work: Path, shard: int) -> list[int]:
    """One shard's clean events split by their user's range (order kept)."""
    events = pl.read_parquet(source)
    part = events.select("user_id").join(ranges, on="user_id", how="left", maintain_order="left")
    return write_parts(events, part["range"], work, "range", shard)


def fold_shard(
    sources: list[Path],
    smap: SignalMap,
    split: SplitConfig,
    extras: list[str],
    vocabs: tuple[pl.DataFrame, pl.DataFrame],
    cut: Windows | int,
    out: Path,
) -> FoldedShard:
    """One range of users' `fold_events` with the whole data's vocabularies and cut points
    (its parts from every shard: a user's events are one shard's, in input order); its pair
    tables and event log written into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    events = pl.concat([pl.read_parquet(p) for p in sources])
    # `row` (the clean phase's position, which the fold's stages keep in order) numbered
    # again over the parts: each user's events keep their order
    events = events.drop("row").with_row_index("row")
    folded = fold_events(
        events, smap, split, extras, vocabs[0], vocabs[1], StageTimer(quiet=True), out, cut
    )
    del events
    # the output's own part of the event log (the pair tables are written as they fold)
    log = out / "events.parquet"
    folded.log.sink_parquet(log, compression_level=ZSTD_LEVEL, engine="streaming")
    return FoldedShard(
        out,
        folded.counts,
        folded.links,
        folded.cancels,
        {s: t.summary for s, t in folded.pair_tables.items()},
    )


_REASONS = ("noise_dwell", "outlier_user", "kcore")  # the order the local engine lists them


def in_input_order(rows: pl.DataFrame, inputs: list[str]) -> pl.DataFrame:
    """Removed rows in the order the local engine lists them: by reason (noise, outlier
    users, k-core), then input order (file, then row)."""
    if rows.height == 0:
        return rows
    rank = {name: i for i, name in enumerate(inputs)}
    order = pl.col("source_file").replace_strict(rank, default=len(rank), return_dtype=pl.Int64)
    reason = pl.col("reason").replace_strict(
        {r: i for i, r in enumerate(_REASONS)}, default=len(_REASONS), return_dtype=pl.Int64
    )
    return rows.sort(reason, order, "source_row", maintain_order=True)

"""`recfb etl` on a Ray cluster (`engine: ray`): shards of users run the local engine's own
phases (`clean_events`, `fold_events` of recfb/etl/pipeline.py), and the parts that need the
whole data are explicit reductions between them. The output directory holds the same files,
with the same rows in the same order, as the local engine's.

    schemas      [Ray]    per input: its columns; the driver combines them as the local
                          engine's one query over every file does (union, relaxed types)
    read         [Ray]    per input (or slice of a large parquet file): read + validate
                          (the local code: quarantine, provenance, the slow path for a
                          malformed file), in the combined types; its good
                          rows written into user shards (hash(user_id) mod S) with their place
                          in the input, its event_ids into buckets (hash(event_id) mod S)
    same event_id [Ray]   per bucket: every copy of an id is in one bucket, in input order;
                          the first copy wins (the local rule), the others' places go to their
                          user shards
    clean        [Ray]    per shard: its parts in input order, less those places; the
                          (user, item, event, ts) rule, noise by dwell
    filters               reduction (when configured): the outlier rate from every user's
             [Ray]        rate; the k-core in rounds: per shard, peel its engaged pairs
                          (outliers, items found under their minimum, then its users under
                          theirs), then add the items' degrees over shards; per shard, the
                          decision applied
    vocabularies          reduction: each id's first event time, min over shards, then the
                          local `extend_vocab` (indices by first appearance, then id)
    cut points            reduction: the temporal windows' quantiles, exact, from every
                          shard's events counted by hour, then the times of the one hour
                          a quantile falls in (fetched from the shards), or the end of data
    ranges       [Ray]    per shard: its events split by their user's range of consecutive
                          user indices (about equal events each; the driver picks them)
    fold         [Ray]    per range: index, link, order as the log, split, fold; parts
                          written to disk
    concatenate           driver: the ranges' parts one after another (each range sorted
                          as the local output, the ranges in index order: no merge), the
                          statistics from added counts and summaries

With filters, the clean phase returns each user's event rate and writes its engaged pairs;
the driver decides the outlier rate, and the k-core is peeled on the shards with only the
items' degrees coming back (users are whole in their shard: their degrees are local). The
driver holds what the reductions need (quarantined rows, each id's first time, hourly
counts, user rates, item degrees) and streams the concatenation; the events themselves pass
through workers only. A parquet file over `ray.rows_per_read` rows is read by several tasks;
a CSV or JSONL file is one task.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from recfb.distributed.cluster import connect
from recfb.errors import InputError
from recfb.etl.config import EtlConfig, FilterConfig, InputConfig, SplitConfig
from recfb.etl.filters import (
    FilterDecision,
    engaged_pairs,
    outlier_rate,
    user_rates,
)
from recfb.etl.interactions import ZSTD_LEVEL, Interactions
from recfb.etl.pipeline import (
    EtlResult,
    EventCounts,
    _counts,
    _first_occurrence,
    _PairSummary,
    _stats,
    clean_events,
    finish_filters,
    fold_events,
    validate_in_memory,
)
from recfb.etl.readers import (
    MALFORMED_RAW,
    MALFORMED_REASON,
    MALFORMED_REASONS,
    PROVENANCE,
    DatabaseLog,
    file_format,
    read_events,
    resolve_paths,
)
from recfb.etl.signals import SignalMap, load_signal_map
from recfb.etl.split import SPLITS, Windows, lower_rank, windows_at
from recfb.etl.vocab import attach_index, extend_vocab, load_vocab
from recfb.io import atomic_dir
from recfb.progress import StageTimer


@dataclass
class _Firsts:
    """What the vocabularies and cut points need of a shard's final events."""

    users: pl.DataFrame  # user_id, ts, events: each user's first event time, events
    items: pl.DataFrame
    ts_range: tuple[int, int]  # the first and last event time
    hours: pl.DataFrame | None  # temporal split: hour (ts // 1 h), len: events per hour


@dataclass
class _CleanShard:
    path: Path | None  # the shard's clean events (None: nothing left)
    duplicates: dict[str, int]
    filtered: pl.DataFrame
    firsts: _Firsts | None  # None while filters are still to be applied
    rates: pl.DataFrame | None = None  # user_id, rate (the outlier filter)
    pairs: Path | None = None  # its engaged (user_id, item_id) pairs (the k-core), on disk


@dataclass
class _FoldedShard:
    out: Path
    counts: EventCounts
    links: pl.DataFrame
    cancels: int
    summaries: dict[str, _PairSummary]


def _firsts(rows: pl.DataFrame, split: SplitConfig) -> _Firsts | None:
    if rows.height == 0:
        return None
    users = rows.group_by("user_id").agg(pl.col("ts").min(), pl.len().alias("events"))
    items = rows.group_by("item_id").agg(pl.col("ts").min())
    hours = None
    if split.method == "temporal":
        hours = rows.group_by((pl.col("ts") // _HOUR_MS).alias("hour")).len()
    ts_range = (int(rows["ts"].min()), int(rows["ts"].max()))
    return _Firsts(users, items, ts_range, hours)


_HOUR_MS = 3_600_000


def _cut_points(
    firsts: list[_Firsts], paths: list[Path], split: SplitConfig, ts_in: Any, ray: Any
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


def _ts_in(path: Path, low: int, high: int) -> pl.Series:
    """A shard's event times in [low, high)."""
    ts = pl.scan_parquet(path).select("ts").filter(pl.col("ts").is_between(low, high, "left"))
    return ts.collect()["ts"]


def _keep(rows: pl.DataFrame, out: Path) -> Path | None:
    if rows.height == 0:
        return None
    rows.write_parquet(out, compression=_WORK_COMPRESSION)
    return out


def _filtering(cfg: EtlConfig) -> bool:
    f = cfg.filters
    return bool(f.outlier_users or f.min_user_items or f.min_item_users)


# the shards' files between phases: written once, read once, on local or shared disk
_WORK_COMPRESSION = "lz4"
ORDER, SHARD = "_order", "_shard"  # a row's place in the input; its user's shard
_FILE_BITS = 40  # `_order` = file index << 40 | row in the file's validated rows
_NOT_INPUT = {*PROVENANCE, MALFORMED_REASON, MALFORMED_RAW}


@dataclass
class _ReadFile:
    """What the driver keeps of one input file's read: counts and quarantine (small)."""

    rows_in: int
    bad: pl.DataFrame  # its quarantined rows (malformed records last, as read)
    extras: list[str]
    shards: list[int]  # the user shards it wrote a part for
    buckets: list[int]  # the event_id buckets it wrote a part for


def _input_spec(path: Path | DatabaseLog) -> str:
    """What reads one resolved input again: a file's path, a database log's URI."""
    return path.uri if isinstance(path, DatabaseLog) else str(path)


def _one_input(cfg: InputConfig, spec: str) -> InputConfig:
    return cfg.model_copy(update={"paths": [spec]})


def _raw_schema(spec: str, cfg: InputConfig) -> tuple[pl.Schema, int | None]:
    """One input's columns as its reader gives them (no rows read where the format says),
    and a parquet file's row count (its metadata), which may split its read."""
    one = _one_input(cfg, spec)
    schema = read_events(one)[0].collect_schema()
    (path,) = resolve_paths(one.paths)
    if cfg.adapter != "canonical" or file_format(path, cfg.format) != "parquet":
        return schema, None
    return schema, pl.scan_parquet(spec).select(pl.len()).collect().item()


def _pieces(rows: int | None, per_read: int) -> list[tuple[int, int | None]]:
    """(offset, rows) of the reads of one input: one unless a parquet file is larger."""
    if rows is None or rows <= per_read:
        return [(0, None)]
    return [(offset, per_read) for offset in range(0, rows, per_read)]


def _combined_schema(schemas: list[pl.Schema]) -> dict[str, pl.DataType]:
    """The columns the local engine's one query over every file has: the union, in order
    of appearance, each in the type every file's column casts to (`diagonal_relaxed`)."""
    frames = [
        pl.DataFrame(schema={c: t for c, t in s.items() if c not in _NOT_INPUT}) for s in schemas
    ]
    return dict(pl.concat(frames, how="diagonal_relaxed").schema)


def _as_combined(raw: pl.LazyFrame, combined: dict[str, pl.DataType]) -> pl.LazyFrame:
    """One file's rows in the combined columns and types, so validation types them as the
    local engine's one query does (a CSV's text event_id beside a parquet's integers)."""
    have = raw.collect_schema()
    columns = [
        pl.col(c).cast(t) if c in have else pl.lit(None, t).alias(c) for c, t in combined.items()
    ]
    return raw.select(*columns, *[c for c in have.names() if c in _NOT_INPUT])


def _read_file(
    index: int,
    spec: str,
    name: str,
    cfg: InputConfig,
    smap: SignalMap,
    combined: dict[str, pl.DataType],
    n_shards: int,
    work: Path,
    piece: tuple[int, int | None] = (0, None),
) -> _ReadFile:
    """Read and validate one input (the local code, on its own: a malformed record costs
    only its file the slow path), then write its good rows into the user shards, in input
    order with their place `_order`, and its event_ids into buckets by their hash. `piece`:
    the rows (offset, count) of a parquet file read by several tasks (`index` counts
    pieces)."""
    one = _one_input(cfg, spec)

    def read(tolerant: bool) -> pl.LazyFrame:
        raw = read_events(one, tolerant=tolerant)[0]
        if piece[1] is not None:  # record numbers are the file's: counted before the slice
            raw = raw.slice(*piece)
        return _as_combined(raw, combined)

    good, bad, extras = validate_in_memory(read, one, smap, name)
    good = good.with_columns(
        (pl.int_range(pl.len(), dtype=pl.UInt64) + (index << _FILE_BITS)).alias(ORDER),
        (pl.col("user_id").hash(seed=0) % n_shards).cast(pl.UInt32).alias(SHARD),
    )
    shards = _write_parts(good.drop(SHARD), good[SHARD], work, "in", index)
    ids = good.filter(pl.col("event_id").is_not_null()).select("event_id", ORDER, SHARD)
    bucket = (ids["event_id"].hash(seed=1) % n_shards).cast(pl.UInt32)
    buckets = _write_parts(ids, bucket, work, "eid", index)
    return _ReadFile(good.height + bad.height, bad, extras, shards, buckets)


def _write_parts(
    rows: pl.DataFrame, part: pl.Series, work: Path, kind: str, index: int
) -> list[int]:
    """`rows` split by `part` (order kept) into work/{kind}-{part}-{index}.parquet."""
    written = []
    for (p,), chunk in (
        rows.with_columns(part.alias("_part"))
        .partition_by("_part", as_dict=True, include_key=False)
        .items()
    ):
        chunk.write_parquet(_part_path(work, kind, p, index), compression=_WORK_COMPRESSION)
        written.append(p)
    return written


def _drop(work: Path, *kinds: str) -> None:
    """A phase's input files, once every task of it has returned. Tasks never delete what
    they read and write each output under a new name, so a task that Ray runs again (its
    worker died) finds its inputs and gives the same result."""
    for kind in kinds:
        for path in work.glob(f"{kind}-*.parquet"):
            path.unlink()


def _part_path(work: Path, kind: str, part: int, index: int) -> Path:
    return work / f"{kind}-{part:05d}-{index:06d}.parquet"


def _event_id_losers(sources: list[Path], work: Path, bucket: int) -> int:
    """One bucket of event_ids (every copy of an id is in one bucket, parts in input
    order): the rows an earlier copy took, written per user shard; how many."""
    ids = pl.concat([pl.read_parquet(p) for p in sources])
    lost = ids.filter(~_first_occurrence(ids, ["event_id"])).select(ORDER, SHARD)
    _write_parts(lost.drop(SHARD), lost[SHARD], work, "lost", bucket)
    return lost.height


def _quarantine_in_order(reads: list[_ReadFile]) -> pl.DataFrame:
    """The files' quarantined rows in the local engine's order: the rows validation
    rejected in input order, then the malformed records (file by file)."""
    bad = pl.concat([r.bad for r in reads], how="diagonal_relaxed")
    malformed = pl.col("reason").is_in(MALFORMED_REASONS)
    return pl.concat([bad.filter(~malformed), bad.filter(malformed)])


def _clean_shard(
    sources: list[Path], losers: list[Path], smap: SignalMap, cfg: EtlConfig, out: Path
) -> _CleanShard:
    """One shard's `clean_events`, written to `out`: its parts from every input file (in
    input order), less the rows whose event_id an earlier row took (`losers`); what the
    reductions need of it (with filters: what deciding them needs, the filters themselves
    applied later)."""
    events = pl.concat([pl.read_parquet(p) for p in sources], how="vertical_relaxed")
    if losers:
        lost = pl.concat([pl.read_parquet(p) for p in losers])
        events = events.join(lost, on=ORDER, how="anti", maintain_order="left")
    events = events.drop(ORDER)
    filtering = _filtering(cfg)
    cleaned = clean_events(events, smap, cfg.filters, StageTimer(quiet=True), not filtering)
    del events
    rows = cleaned.events
    if not filtering:
        firsts = _firsts(rows, cfg.split)
        return _CleanShard(_keep(rows, out), cleaned.duplicates, cleaned.filtered, firsts)
    rates = user_rates(rows) if cfg.filters.outlier_users else None
    kcore = cfg.filters.min_user_items or cfg.filters.min_item_users
    pairs = _keep(engaged_pairs(rows), _core_path(out.parent, 0, out)) if kcore else None
    path = _keep(rows, out)
    return _CleanShard(path, cleaned.duplicates, cleaned.filtered, None, rates, pairs)


def _outliers(
    cleaned: list[_CleanShard], filters: FilterConfig
) -> tuple[float | None, list[pl.Series | None]]:
    """The outlier rate from every user's rate (the local rule), and each shard's users
    above it."""
    if not filters.outlier_users:
        return None, [None] * len(cleaned)
    rate = outlier_rate(pl.concat([c.rates for c in cleaned]), filters.outlier_rate_factor)
    return rate, [c.rates.filter(pl.col("rate") > rate)["user_id"] for c in cleaned]


def _core_path(work: Path, round_: int, shard_file: Path) -> Path:
    """A shard's engaged pairs after peeling round `round_` (0: as cleaned)."""
    return work / f"core-{round_}-{shard_file.name.split('-')[-1]}"


def _peel(
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
    return _keep(pairs, out), pairs.group_by("item_id").len()


def _k_core_on_shards(
    cleaned: list[_CleanShard],
    bots: list[pl.Series | None],
    filters: FilterConfig,
    peel: Any,
    ray: Any,
    work: Path,
) -> tuple[list[Path | None], pl.Series | None]:
    """The k-core of every shard's engaged pairs without gathering them: rounds of `_peel`
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
                    _core_path(work, round_, c.pairs) if c.pairs else None,
                    bots[i] if round_ == 1 else None,
                    dead,
                    filters.min_user_items,
                )
                for i, (path, c) in enumerate(zip(paths, cleaned, strict=True))
            ]
        )
        _drop(work, f"core-{round_ - 1}")
        paths = [path for path, _ in done]
        found = [degrees for _, degrees in done if degrees is not None]
        if not found:
            return paths, None
        degrees = pl.concat(found).group_by("item_id").agg(pl.col("len").sum())
        dead = degrees.filter(pl.col("len") < filters.min_item_users)["item_id"]
        if dead.len() == 0:
            return paths, degrees["item_id"]


def _filter_shard(
    source: Path,
    cfg: EtlConfig,
    rate: float | None,
    core: Path | None,
    core_items: pl.Series | None,
) -> tuple[Path | None, pl.DataFrame, _Firsts | None]:
    """One shard's filters as decided on the whole data (the outlier rate; with a k-core,
    the shard's pairs in it and the core's items); its kept events rewritten."""
    events = pl.read_parquet(source)
    decided = FilterDecision(outlier_rate=rate)
    if cfg.filters.min_user_items or cfg.filters.min_item_users:
        users = pl.read_parquet(core)["user_id"].unique() if core else events["user_id"].clear()
        items = events["item_id"].clear() if core_items is None else core_items
        decided = FilterDecision(rate, users, items.cast(events.schema["item_id"]))
    events, removed = finish_filters(events, cfg.filters, decided)
    kept = _keep(events, source.with_name(source.name.replace("clean-", "filtered-")))
    return kept, removed, _firsts(events, cfg.split)


def _user_ranges(
    firsts: list[_Firsts], users_vocab: pl.DataFrame, n_ranges: int
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


def _to_ranges(source: Path, ranges: pl.DataFrame, work: Path, shard: int) -> list[int]:
    """One shard's clean events split by their user's range (order kept)."""
    events = pl.read_parquet(source)
    part = events.select("user_id").join(ranges, on="user_id", how="left", maintain_order="left")
    return _write_parts(events, part["range"], work, "range", shard)


def _fold_shard(
    sources: list[Path],
    smap: SignalMap,
    split: SplitConfig,
    extras: list[str],
    vocabs: tuple[pl.DataFrame, pl.DataFrame],
    cut: Windows | int,
    out: Path,
) -> _FoldedShard:
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
    log = out / "events.parquet"
    folded.log.sink_parquet(log, compression=_WORK_COMPRESSION, engine="streaming")
    return _FoldedShard(
        out,
        folded.counts,
        folded.links,
        folded.cancels,
        {s: t.summary for s, t in folded.pair_tables.items()},
    )


def run_etl_ray(cfg: EtlConfig, quiet: bool = False) -> EtlResult:
    """`run_etl` on the cluster of `cfg.ray`: the same output directory."""
    smap = load_signal_map(cfg.signals)
    timer = StageTimer(quiet)
    out = Path(cfg.out)
    vocab_dir = Path(cfg.vocab_from) if cfg.vocab_from else out
    users_vocab, items_vocab = load_vocab(vocab_dir, "user"), load_vocab(vocab_dir, "item")
    ray = connect(cfg.ray)
    n_shards = cfg.ray.shards or 2 * cfg.ray.workers
    options = {"num_cpus": cfg.ray.cpus_per_worker}
    schema_task = ray.remote(num_cpus=0.25)(_raw_schema)
    read_task = ray.remote(**options)(_read_file)
    dedupe_task = ray.remote(**options)(_event_id_losers)
    clean_task = ray.remote(**options)(_clean_shard)
    ts_task = ray.remote(num_cpus=0.25)(_ts_in)
    filter_task = ray.remote(**options)(_filter_shard)
    peel_task = ray.remote(**options)(_peel)
    fold_task = ray.remote(**options)(_fold_shard)
    range_task = ray.remote(**options)(_to_ranges)

    with atomic_dir(out) as tmp:
        work = tmp / "_shards"  # beside the output: workers on other hosts need it shared
        work.mkdir()
        files = resolve_paths(cfg.input.paths)
        inputs = [str(f) for f in files]
        specs = [_input_spec(f) for f in files]
        with timer.stage("read + validate (files)"):
            found = _get(ray, [schema_task.remote(spec, cfg.input) for spec in specs])
            combined = _combined_schema([schema for schema, _ in found])
            pieces = [
                (spec, name, piece)
                for spec, name, (_, rows) in zip(specs, inputs, found, strict=True)
                for piece in _pieces(rows, cfg.ray.rows_per_read)
            ]
            reads: list[_ReadFile] = _get(
                ray,
                [
                    read_task.remote(
                        i, spec, name, cfg.input, smap, combined, n_shards, work, piece
                    )
                    for i, (spec, name, piece) in enumerate(pieces)
                ],
            )
        quarantine = _quarantine_in_order(reads)
        extras = reads[0].extras
        rows_in = sum(r.rows_in for r in reads)

        with timer.stage("deduplicate event ids (buckets)"):
            same_event_id = sum(
                ray.get(
                    [
                        dedupe_task.remote(parts, work, b)
                        for b in range(n_shards)
                        if (parts := _parts(work, "eid", b, reads, "buckets"))
                    ]
                )
            )
            _drop(work, "eid")

        with timer.stage("clean (shards)"):
            cleaned: list[_CleanShard] = ray.get(
                [
                    clean_task.remote(
                        parts,
                        sorted(work.glob(f"lost-{s:05d}-*.parquet")),
                        smap,
                        cfg,
                        work / f"clean-{s:05d}.parquet",
                    )
                    for s in range(n_shards)
                    if (parts := _parts(work, "in", s, reads, "shards"))
                ]
            )
            _drop(work, "in", "lost")
        duplicates = {"same_event_id": same_event_id, "same_user_item_event_ts": 0}
        for c in cleaned:
            duplicates["same_user_item_event_ts"] += c.duplicates["same_user_item_event_ts"]
        removed = [c.filtered for c in cleaned]
        if _filtering(cfg):
            with timer.stage("filters"):
                cleaned = [c for c in cleaned if c.path is not None]
                rate, bots = _outliers(cleaned, cfg.filters)
                cores: list[Path | None] = [None] * len(cleaned)
                core_items = None
                if cfg.filters.min_user_items or cfg.filters.min_item_users:
                    cores, core_items = _k_core_on_shards(
                        cleaned, bots, cfg.filters, peel_task, ray, work
                    )
                core_items = ray.put(core_items)
                done = ray.get(
                    [
                        filter_task.remote(c.path, cfg, rate, core, core_items)
                        for c, core in zip(cleaned, cores, strict=True)
                    ]
                )
                _drop(work, "clean", "core")
            cleaned = [_CleanShard(path, {}, rows, firsts) for path, rows, firsts in done]
            removed += [c.filtered for c in cleaned]
        filtered = _in_input_order(pl.concat(removed, how="diagonal_relaxed"), inputs)
        if not any(c.path for c in cleaned):
            raise InputError(
                "no usable events left after validation and filters; see quarantine reasons "
                f"{_counts(quarantine, 'reason')}",
                file=", ".join(inputs[:5]),
            )

        with timer.stage("vocabularies + cut points"):
            firsts = [c.firsts for c in cleaned if c.firsts is not None]
            users_vocab = extend_vocab(users_vocab, pl.concat([f.users for f in firsts]), "user")
            items_vocab = extend_vocab(items_vocab, pl.concat([f.items for f in firsts]), "item")
            paths = [c.path for c in cleaned if c.path is not None]
            cut = _cut_points(firsts, paths, cfg.split, ts_task, ray)
            vocabs = ray.put((users_vocab, items_vocab))

        with timer.stage("users into index ranges"):
            kept = [c for c in cleaned if c.path is not None]
            ranges = _user_ranges([c.firsts for c in kept], users_vocab, n_shards)
            written = ray.get(
                [
                    range_task.remote(c.path, r, work, i)
                    for i, (c, r) in enumerate(zip(kept, ranges, strict=True))
                ]
            )
            _drop(work, "clean", "filtered")
        del cleaned, kept, ranges

        with timer.stage("fold (ranges)"):
            folded: list[_FoldedShard] = ray.get(
                [
                    fold_task.remote(
                        [_part_path(work, "range", r, i) for i, w in enumerate(written) if r in w],
                        smap,
                        cfg.split,
                        extras,
                        vocabs,
                        cut,
                        work / f"part-{r:05d}",
                    )
                    for r in sorted(set().union(*written))
                ]
            )
            _drop(work, "range")

        parts = [f.out for f in folded]  # in range order: the local engine's order
        with timer.stage("concatenate pair tables"):
            for name in SPLITS:
                _concatenated([p / f"{name}.parquet" for p in parts]).sink_parquet(
                    tmp / f"{name}.parquet", compression_level=ZSTD_LEVEL, engine="streaming"
                )
        with timer.stage("statistics"):
            counts = folded[0].counts
            summaries = dict(folded[0].summaries)
            for f in folded[1:]:
                counts = counts.merge(f.counts)
                summaries = {s: summaries[s].merge(f.summaries[s]) for s in SPLITS}
            links = pl.concat([f.links for f in folded], how="diagonal_relaxed")
            stats = _stats(
                cfg.split,
                smap,
                inputs,
                rows_in,
                _counts(quarantine, "reason"),
                duplicates,
                _counts(filtered, "reason"),
                counts,
                links,
                sum(f.cancels for f in folded),
                summaries,
                cut if isinstance(cut, Windows) else None,
                users_vocab.height,
                items_vocab.height,
            )
            stats["engine"] = {
                "name": "ray",
                "shards": n_shards,
                "workers": cfg.ray.workers,
                "read_tasks": len(pieces),
            }
        stats["timings_s"] = timer.seconds
        log = _concatenated([p / "events.parquet" for p in parts])
        with timer.stage("concatenate log + write"):
            Interactions(
                train=pl.DataFrame(),
                valid=pl.DataFrame(),
                test=pl.DataFrame(),
                users=users_vocab,
                items=items_vocab,
                events=log,
                quarantine=quarantine.lazy(),
                filtered=filtered.lazy(),
                stats=stats,
                signal_map=smap,
            ).write_into(tmp, pairs=False)
        shutil.rmtree(work)
    return EtlResult(out=out, stats=stats)


def _parts(work: Path, kind: str, part: int, reads: list[_ReadFile], field: str) -> list[Path]:
    """The files' parts of one shard or bucket, in input order."""
    wrote = [i for i, r in enumerate(reads) if part in getattr(r, field)]
    return [_part_path(work, kind, part, i) for i in wrote]


def _get(ray: Any, refs: list) -> list:
    """`ray.get`, with a task's input error raised as itself (its message names the file,
    row and field), not wrapped in the task's traceback."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, InputError):
            raise exc.cause from None
        raise


def _concatenated(paths: list[Path]) -> pl.LazyFrame:
    """The ranges' parts, one after another: ranges of consecutive user indices, each
    sorted as the local engine's output, so their concatenation is too (no merge)."""
    return pl.concat([pl.scan_parquet(p) for p in paths])


_REASONS = ("noise_dwell", "outlier_user", "kcore")  # the order the local engine lists them


def _in_input_order(rows: pl.DataFrame, inputs: list[str]) -> pl.DataFrame:
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

"""`recfb etl` on a Ray cluster (`engine: ray`): shards of users run the local engine's own
phases (`clean_events`, `fold_events` of recfb/etl/pipeline.py), and the parts that need the
whole data are explicit reductions between them. The output directory holds the same files,
with the same rows in the same order, as the local engine's.

    read + validate       driver, the local code (quarantine, provenance, input order)
    same event_id         driver: the first copy in input order wins (the local rule)
    shard                 hash(user_id) mod S, in input order: a user's events in one shard
    clean        [Ray]    per shard: the (user, item, event, ts) rule, noise by dwell
    vocabularies          reduction: each id's first event time, min over shards, then the
                          local `extend_vocab` (indices by first appearance, then id)
    cut points            reduction: the temporal windows' quantiles over every shard's
                          event times (exact), or the end of data
    fold         [Ray]    per shard: index, link, order as the log, split, fold; parts
                          written to disk
    merge                 driver: the parts merged in the local order (pairs by (user, item),
                          the log by user: a user's events are one shard's run), the
                          statistics from added counts and summaries

Filters (outlier users, k-core) need iterated global reductions and are refused here for
now. The driver holds the validated columns and the event times, as the local engine does;
what moves to the workers is the work of dedupe, ordering and folding.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from recfb.distributed.cluster import connect
from recfb.errors import ConfigError, InputError
from recfb.etl.config import EtlConfig, SplitConfig
from recfb.etl.interactions import ZSTD_LEVEL, Interactions
from recfb.etl.pipeline import (
    EtlResult,
    EventCounts,
    _counts,
    _first_occurrence,
    _PairSummary,
    _stage_validation,
    _stats,
    clean_events,
    fold_events,
)
from recfb.etl.signals import SignalMap, load_signal_map
from recfb.etl.split import SPLITS, Windows, temporal_windows
from recfb.etl.vocab import extend_vocab, load_vocab
from recfb.io import atomic_dir
from recfb.progress import StageTimer


@dataclass
class _CleanShard:
    path: Path | None  # the shard's clean events (None: nothing left)
    duplicates: dict[str, int]
    filtered: pl.DataFrame
    users: pl.DataFrame  # user_id, ts: each user's first event time in the shard
    items: pl.DataFrame
    ts: pl.Series


@dataclass
class _FoldedShard:
    out: Path
    counts: EventCounts
    links: pl.DataFrame
    cancels: int
    summaries: dict[str, _PairSummary]


def _clean_shard(source: Path, smap: SignalMap, cfg: EtlConfig, out: Path) -> _CleanShard:
    """One shard's `clean_events`, written to `out`; what the reductions need of it."""
    events = pl.read_parquet(source)
    source.unlink()
    cleaned = clean_events(events, smap, cfg.filters, StageTimer(quiet=True))
    del events
    rows = cleaned.events
    first = {kind: rows.group_by(f"{kind}_id").agg(pl.col("ts").min()) for kind in ("user", "item")}
    ts = rows["ts"] if cfg.split.method == "temporal" else rows.select(pl.col("ts").max())["ts"]
    path = None
    if rows.height:
        rows.write_parquet(out)
        path = out
    return _CleanShard(path, cleaned.duplicates, cleaned.filtered, first["user"], first["item"], ts)


def _fold_shard(
    source: Path,
    smap: SignalMap,
    split: SplitConfig,
    extras: list[str],
    vocabs: tuple[pl.DataFrame, pl.DataFrame],
    cut: Windows | int,
    out: Path,
) -> _FoldedShard:
    """One shard's `fold_events` with the whole data's vocabularies and cut points; its pair
    tables and event log written into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    events = pl.read_parquet(source)
    source.unlink()
    folded = fold_events(
        events, smap, split, extras, vocabs[0], vocabs[1], StageTimer(quiet=True), out, cut
    )
    del events
    folded.log.sink_parquet(out / "events.parquet", engine="streaming")
    return _FoldedShard(
        out,
        folded.counts,
        folded.links,
        folded.cancels,
        {s: t.summary for s, t in folded.pair_tables.items()},
    )


def run_etl_ray(cfg: EtlConfig, quiet: bool = False) -> EtlResult:
    """`run_etl` on the cluster of `cfg.ray`: the same output directory."""
    filters = cfg.filters
    if filters.outlier_users or filters.min_user_items or filters.min_item_users:
        raise ConfigError(
            "filters (outlier_users, min_user_items, min_item_users) are not on the ray engine "
            "yet: run this ETL with engine: local"
        )
    smap = load_signal_map(cfg.signals)
    timer = StageTimer(quiet)
    out = Path(cfg.out)
    vocab_dir = Path(cfg.vocab_from) if cfg.vocab_from else out
    users_vocab, items_vocab = load_vocab(vocab_dir, "user"), load_vocab(vocab_dir, "item")
    ray = connect(cfg.ray)
    n_shards = cfg.ray.shards or 2 * cfg.ray.workers
    options = {"num_cpus": cfg.ray.cpus_per_worker}
    clean_task = ray.remote(**options)(_clean_shard)
    fold_task = ray.remote(**options)(_fold_shard)

    with atomic_dir(out) as tmp:
        work = tmp / "_shards"  # beside the output: workers on other hosts need it shared
        work.mkdir()
        with timer.stage("read + validate"):
            events, quarantine, extras, files = _stage_validation(cfg, smap)
        inputs = [str(f) for f in files]
        rows_in = events.height + quarantine.height

        with timer.stage("deduplicate event ids"):
            keep = events.select(
                pl.col("event_id").is_null() | _first_occurrence(events, ["event_id"])
            ).to_series()
            same_event_id = events.height - int(keep.sum())
            events = events.filter(keep)
            del keep

        with timer.stage("shard by user"):
            shard = events.select(
                (pl.col("user_id").hash(seed=0) % n_shards).cast(pl.UInt32)
            ).to_series()
            sources = []
            for s in range(n_shards):
                path = work / f"validated-{s:05d}.parquet"
                events.filter(shard == s).write_parquet(path)
                sources.append(path)
            del events, shard

        with timer.stage("clean (shards)"):
            cleaned: list[_CleanShard] = ray.get(
                [
                    clean_task.remote(src, smap, cfg, work / f"clean-{s:05d}.parquet")
                    for s, src in enumerate(sources)
                ]
            )
        duplicates = {"same_event_id": same_event_id, "same_user_item_event_ts": 0}
        for c in cleaned:
            duplicates["same_user_item_event_ts"] += c.duplicates["same_user_item_event_ts"]
        filtered = _in_input_order(
            pl.concat([c.filtered for c in cleaned], how="diagonal_relaxed"), inputs
        )
        if not any(c.path for c in cleaned):
            raise InputError(
                "no usable events left after validation and filters; see quarantine reasons "
                f"{_counts(quarantine, 'reason')}",
                file=", ".join(inputs[:5]),
            )

        with timer.stage("vocabularies"):
            users_vocab = extend_vocab(users_vocab, pl.concat([c.users for c in cleaned]), "user")
            items_vocab = extend_vocab(items_vocab, pl.concat([c.items for c in cleaned]), "item")
            ts = pl.concat([c.ts for c in cleaned])
            cut: Windows | int = (
                temporal_windows(ts, cfg.split)
                if cfg.split.method == "temporal"
                else int(ts.max()) + 1
            )
            del ts
            vocabs = ray.put((users_vocab, items_vocab))

        with timer.stage("fold (shards)"):
            folded: list[_FoldedShard] = ray.get(
                [
                    fold_task.remote(
                        c.path, smap, cfg.split, extras, vocabs, cut, work / f"part-{s:05d}"
                    )
                    for s, c in enumerate(cleaned)
                    if c.path is not None
                ]
            )
        del cleaned

        parts = [f.out for f in folded]
        with timer.stage("merge pair tables"):
            for name in SPLITS:
                _merge_sorted([p / f"{name}.parquet" for p in parts], tmp / f"{name}.parquet", True)
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
            stats["engine"] = {"name": "ray", "shards": n_shards, "workers": cfg.ray.workers}
        stats["timings_s"] = timer.seconds
        log = _merged([p / "events.parquet" for p in parts], pair=False)
        with timer.stage("merge log + write"):
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


def _merged(paths: list[Path], pair: bool) -> pl.LazyFrame:
    """The parts (each sorted, of disjoint users) as one frame in the local engine's order:
    pair tables by (user, item), the log by user (each user's events are one part's run, in
    the log's order already). A merge of sorted runs, not a sort."""
    key = (
        (pl.col("user_idx").cast(pl.UInt64) * (1 << 32) + pl.col("item_idx"))
        if pair
        else pl.col("user_idx")
    )
    frames = [pl.scan_parquet(p).with_columns(key.alias("_merge_key")) for p in paths]
    merged = frames[0]
    for frame in frames[1:]:
        merged = merged.merge_sorted(frame, "_merge_key")
    return merged.drop("_merge_key")


def _merge_sorted(paths: list[Path], target: Path, pair: bool) -> None:
    _merged(paths, pair).sink_parquet(target, compression_level=ZSTD_LEVEL, engine="streaming")


def _in_input_order(rows: pl.DataFrame, inputs: list[str]) -> pl.DataFrame:
    """Removed rows in the order the local engine lists them: input order (file, then row)."""
    if rows.height == 0:
        return rows
    rank = {name: i for i, name in enumerate(inputs)}
    order = pl.col("source_file").replace_strict(rank, default=len(rank), return_dtype=pl.Int64)
    return rows.sort(order, "source_row", maintain_order=True)


def shard_summary(stats: dict[str, Any]) -> str:
    """One line on how the work was spread, for the CLI's summary."""
    engine = stats.get("engine", {})
    return f"{engine.get('shards', 1)} shards on {engine.get('workers', 1)} Ray workers"

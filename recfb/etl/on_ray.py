"""`recfb etl` on a Ray cluster (`engine: ray`): shards of users run the local engine's own
phases (`clean_events`, `fold_events` of recfb/etl/pipeline.py), and the parts that need the
whole data are explicit reductions between them. The output directory holds the same files,
with the same rows in the same order, as the local engine's.

    read + validate       driver, the local code (quarantine, provenance, input order)
    same event_id         driver: the first copy in input order wins (the local rule)
    shard                 hash(user_id) mod S, in input order: a user's events in one shard
    clean        [Ray]    per shard: the (user, item, event, ts) rule, noise by dwell
    filters               reduction (when configured): the outlier rate, the k-core
             [Ray]        per shard: the decision applied
    vocabularies          reduction: each id's first event time, min over shards, then the
                          local `extend_vocab` (indices by first appearance, then id)
    cut points            reduction: the temporal windows' quantiles over every shard's
                          event times (exact), or the end of data
    fold         [Ray]    per shard: index, link, order as the log, split, fold; parts
                          written to disk
    merge                 driver: the parts merged in the local order (pairs by (user, item),
                          the log by user: a user's events are one shard's run), the
                          statistics from added counts and summaries

With filters, the clean phase returns each user's event rate and the engaged pairs; the
driver decides (the outlier rate from every user's, then the local `k_core` on the pairs
left) and a filter phase applies the decision per shard before the vocabularies. The driver
holds the validated columns and the event times, as the local engine does;
what moves to the workers is the work of dedupe, ordering and folding.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from recfb.distributed.cluster import connect
from recfb.errors import InputError
from recfb.etl.config import EtlConfig, FilterConfig, SplitConfig
from recfb.etl.filters import (
    FilterDecision,
    engaged_pairs,
    k_core,
    outlier_rate,
    user_rates,
)
from recfb.etl.interactions import ZSTD_LEVEL, Interactions
from recfb.etl.pipeline import (
    EtlResult,
    EventCounts,
    _counts,
    _first_occurrence,
    _pair_key,
    _PairSummary,
    _stage_validation,
    _stats,
    clean_events,
    finish_filters,
    fold_events,
)
from recfb.etl.signals import SignalMap, load_signal_map
from recfb.etl.split import SPLITS, Windows, temporal_windows
from recfb.etl.vocab import extend_vocab, load_vocab
from recfb.io import atomic_dir
from recfb.progress import StageTimer


@dataclass
class _Firsts:
    """What the vocabularies and cut points need of a shard's final events."""

    users: pl.DataFrame  # user_id, ts: each user's first event time in the shard
    items: pl.DataFrame
    ts: pl.Series  # every event time (temporal split), else the largest


@dataclass
class _CleanShard:
    path: Path | None  # the shard's clean events (None: nothing left)
    duplicates: dict[str, int]
    filtered: pl.DataFrame
    firsts: _Firsts | None  # None while filters are still to be applied
    rates: pl.DataFrame | None = None  # user_id, rate (the outlier filter)
    pairs: pl.DataFrame | None = None  # engaged (user_id, item_id) (the k-core)


@dataclass
class _FoldedShard:
    out: Path
    counts: EventCounts
    links: pl.DataFrame
    cancels: int
    summaries: dict[str, _PairSummary]


def _firsts(rows: pl.DataFrame, split: SplitConfig) -> _Firsts:
    first = {kind: rows.group_by(f"{kind}_id").agg(pl.col("ts").min()) for kind in ("user", "item")}
    ts = rows["ts"] if split.method == "temporal" else rows.select(pl.col("ts").max())["ts"]
    return _Firsts(first["user"], first["item"], ts)


def _keep(rows: pl.DataFrame, out: Path) -> Path | None:
    if rows.height == 0:
        return None
    rows.write_parquet(out)
    return out


def _filtering(cfg: EtlConfig) -> bool:
    f = cfg.filters
    return bool(f.outlier_users or f.min_user_items or f.min_item_users)


def _clean_shard(source: Path, smap: SignalMap, cfg: EtlConfig, out: Path) -> _CleanShard:
    """One shard's `clean_events`, written to `out`; what the reductions need of it (with
    filters: what deciding them needs, the filters themselves applied later)."""
    events = pl.read_parquet(source)
    source.unlink()
    filtering = _filtering(cfg)
    cleaned = clean_events(events, smap, cfg.filters, StageTimer(quiet=True), not filtering)
    del events
    rows = cleaned.events
    if not filtering:
        firsts = _firsts(rows, cfg.split)
        return _CleanShard(_keep(rows, out), cleaned.duplicates, cleaned.filtered, firsts)
    rates = user_rates(rows) if cfg.filters.outlier_users else None
    kcore = cfg.filters.min_user_items or cfg.filters.min_item_users
    pairs = engaged_pairs(rows) if kcore else None
    path = _keep(rows, out)
    return _CleanShard(path, cleaned.duplicates, cleaned.filtered, None, rates, pairs)


def _decide_filters(cleaned: list[_CleanShard], filters: FilterConfig) -> FilterDecision:
    """The filters' decisions on the whole data, as the local engine makes them: the outlier
    rate from every user's rate, then the k-core of the engaged pairs left."""
    rate, bots = None, None
    if filters.outlier_users:
        rates = pl.concat([c.rates for c in cleaned if c.rates is not None])
        rate = outlier_rate(rates, filters.outlier_rate_factor)
        bots = rates.filter(pl.col("rate") > rate)["user_id"]
    if not (filters.min_user_items or filters.min_item_users):
        return FilterDecision(outlier_rate=rate)
    pairs = pl.concat([c.pairs for c in cleaned if c.pairs is not None])
    if bots is not None:
        pairs = pairs.filter(~pl.col("user_id").is_in(bots.implode()))
    core = k_core(
        pairs.with_columns(pl.lit(1).alias("level")), filters.min_user_items, filters.min_item_users
    )
    return FilterDecision(rate, core["user_id"].unique(), core["item_id"].unique())


def _filter_shard(
    source: Path, cfg: EtlConfig, decided: FilterDecision
) -> tuple[Path | None, pl.DataFrame, _Firsts]:
    """One shard's filters as decided on the whole data; its kept events rewritten."""
    events, removed = finish_filters(pl.read_parquet(source), cfg.filters, decided)
    source.unlink()
    return _keep(events, source), removed, _firsts(events, cfg.split)


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
    smap = load_signal_map(cfg.signals)
    timer = StageTimer(quiet)
    out = Path(cfg.out)
    vocab_dir = Path(cfg.vocab_from) if cfg.vocab_from else out
    users_vocab, items_vocab = load_vocab(vocab_dir, "user"), load_vocab(vocab_dir, "item")
    ray = connect(cfg.ray)
    n_shards = cfg.ray.shards or 2 * cfg.ray.workers
    options = {"num_cpus": cfg.ray.cpus_per_worker}
    clean_task = ray.remote(**options)(_clean_shard)
    filter_task = ray.remote(**options)(_filter_shard)
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
        removed = [c.filtered for c in cleaned]
        if _filtering(cfg):
            with timer.stage("filters"):
                decided = ray.put(_decide_filters(cleaned, cfg.filters))
                done = ray.get(
                    [filter_task.remote(c.path, cfg, decided) for c in cleaned if c.path]
                )
            cleaned = [_CleanShard(path, {}, rows, firsts) for path, rows, firsts in done]
            removed += [c.filtered for c in cleaned]
        filtered = _in_input_order(pl.concat(removed, how="diagonal_relaxed"), inputs)
        if not any(c.path for c in cleaned):
            raise InputError(
                "no usable events left after validation and filters; see quarantine reasons "
                f"{_counts(quarantine, 'reason')}",
                file=", ".join(inputs[:5]),
            )

        with timer.stage("vocabularies"):
            firsts = [c.firsts for c in cleaned if c.firsts is not None]
            users_vocab = extend_vocab(users_vocab, pl.concat([f.users for f in firsts]), "user")
            items_vocab = extend_vocab(items_vocab, pl.concat([f.items for f in firsts]), "item")
            ts = pl.concat([f.ts for f in firsts])
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
    key = _pair_key() if pair else pl.col("user_idx")
    frames = [pl.scan_parquet(p).with_columns(key.alias("_merge_key")) for p in paths]
    merged = frames[0]
    for frame in frames[1:]:
        merged = merged.merge_sorted(frame, "_merge_key")
    return merged.drop("_merge_key")


def _merge_sorted(paths: list[Path], target: Path, pair: bool) -> None:
    _merged(paths, pair).sink_parquet(target, compression_level=ZSTD_LEVEL, engine="streaming")


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

"""`run_etl_ray`: the Ray ETL's phases in order, each a round of tasks, with the reductions
between them on the driver (see the package's docstring)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import polars as pl

from recfb.distributed.cluster import connect
from recfb.errors import InputError
from recfb.etl.config import EtlConfig
from recfb.etl.interactions import PART, Interactions
from recfb.etl.on_ray.read import (
    ReadFile,
    combined_schema,
    event_id_losers,
    input_spec,
    parts_of,
    pieces_of,
    quarantine_in_order,
    raw_schema,
    read_file,
)
from recfb.etl.on_ray.shards import (
    CleanShard,
    FoldedShard,
    clean_shard,
    cut_points,
    filter_shard,
    fold_shard,
    in_input_order,
    k_core_on_shards,
    outliers,
    peel_pairs,
    times_in,
    to_ranges,
    user_ranges,
)
from recfb.etl.on_ray.workfiles import drop_phase, part_path
from recfb.etl.pipeline import EtlResult, _counts, _stats
from recfb.etl.readers import resolve_paths
from recfb.etl.signals import load_signal_map
from recfb.etl.split import SPLITS, Windows
from recfb.etl.vocab import extend_vocab, load_vocab
from recfb.io import atomic_dir
from recfb.progress import StageTimer


def run_etl_ray(cfg: EtlConfig, quiet: bool = False) -> EtlResult:
    """`run_etl_local` on the cluster of `cfg.ray`: the same output directory."""
    smap = load_signal_map(cfg.signals)
    timer = StageTimer(quiet)
    out = Path(cfg.out)
    vocab_dir = Path(cfg.vocab_from) if cfg.vocab_from else out
    users_vocab, items_vocab = load_vocab(vocab_dir, "user"), load_vocab(vocab_dir, "item")
    ray = connect(cfg.ray)
    n_shards = cfg.ray.shards or 2 * cfg.ray.workers
    options = {"num_cpus": cfg.ray.cpus_per_worker}
    schema_task = ray.remote(num_cpus=0.25)(raw_schema)
    read_task = ray.remote(**options)(read_file)
    dedupe_task = ray.remote(**options)(event_id_losers)
    clean_task = ray.remote(**options)(clean_shard)
    ts_task = ray.remote(num_cpus=0.25)(times_in)
    filter_task = ray.remote(**options)(filter_shard)
    peel_task = ray.remote(**options)(peel_pairs)
    fold_task = ray.remote(**options)(fold_shard)
    range_task = ray.remote(**options)(to_ranges)

    with atomic_dir(out) as tmp:
        work = tmp / "_shards"  # beside the output: workers on other hosts need it shared
        work.mkdir()
        files = resolve_paths(cfg.input.paths)
        inputs = [str(f) for f in files]
        specs = [input_spec(f) for f in files]
        with timer.stage("read + validate (files)"):
            found = _get(ray, [schema_task.remote(spec, cfg.input) for spec in specs])
            combined = combined_schema([schema for schema, _ in found])
            pieces = [
                (spec, name, piece)
                for spec, name, (_, rows) in zip(specs, inputs, found, strict=True)
                for piece in pieces_of(rows, cfg.ray.rows_per_read)
            ]
            reads: list[ReadFile] = _get(
                ray,
                [
                    read_task.remote(
                        i, spec, name, cfg.input, smap, combined, n_shards, work, piece
                    )
                    for i, (spec, name, piece) in enumerate(pieces)
                ],
            )
        quarantine = quarantine_in_order(reads)
        extras = reads[0].extras
        rows_in = sum(r.rows_in for r in reads)

        with timer.stage("deduplicate event ids (buckets)"):
            same_event_id = sum(
                ray.get(
                    [
                        dedupe_task.remote(parts, work, b)
                        for b in range(n_shards)
                        if (parts := parts_of(work, "eid", b, reads, "buckets"))
                    ]
                )
            )
            drop_phase(work, "eid")

        with timer.stage("clean (shards)"):
            cleaned: list[CleanShard] = ray.get(
                [
                    clean_task.remote(
                        parts,
                        sorted(work.glob(f"lost-{s:05d}-*.parquet")),
                        smap,
                        cfg,
                        work / f"clean-{s:05d}.parquet",
                    )
                    for s in range(n_shards)
                    if (parts := parts_of(work, "in", s, reads, "shards"))
                ]
            )
            drop_phase(work, "in", "lost")
        duplicates = {"same_event_id": same_event_id, "same_user_item_event_ts": 0}
        for c in cleaned:
            duplicates["same_user_item_event_ts"] += c.duplicates["same_user_item_event_ts"]
        removed = [c.filtered for c in cleaned]
        cleaned = [c for c in cleaned if c.path is not None]  # shards with rows left
        if cfg.filters.active:
            with timer.stage("filters"):
                rate, bots = outliers(cleaned, cfg.filters)
                cores: list[Path | None] = [None] * len(cleaned)
                core_items = None
                if cfg.filters.k_core:
                    cores, core_items = k_core_on_shards(
                        cleaned, bots, cfg.filters, peel_task, ray, work
                    )
                core_items = ray.put(core_items)
                done = ray.get(
                    [
                        filter_task.remote(c.path, cfg, rate, core, core_items)
                        for c, core in zip(cleaned, cores, strict=True)
                    ]
                )
                drop_phase(work, "clean", "core")
            cleaned = [CleanShard(path, {}, rows, firsts) for path, rows, firsts in done]
            removed += [c.filtered for c in cleaned]
            cleaned = [c for c in cleaned if c.path is not None]
        filtered = in_input_order(pl.concat(removed, how="diagonal_relaxed"), inputs)
        if not cleaned:
            raise InputError(
                "no usable events left after validation and filters; see quarantine reasons "
                f"{_counts(quarantine, 'reason')}",
                file=", ".join(inputs[:5]),
            )

        with timer.stage("vocabularies + cut points"):
            firsts = [c.firsts for c in cleaned]
            users_vocab = extend_vocab(users_vocab, pl.concat([f.users for f in firsts]), "user")
            items_vocab = extend_vocab(items_vocab, pl.concat([f.items for f in firsts]), "item")
            cut = cut_points(firsts, [c.path for c in cleaned], cfg.split, ts_task, ray)
            vocabs = ray.put((users_vocab, items_vocab))

        with timer.stage("users into index ranges"):
            ranges = user_ranges(firsts, users_vocab, n_shards)
            written = ray.get(
                [
                    range_task.remote(c.path, r, work, i)
                    for i, (c, r) in enumerate(zip(cleaned, ranges, strict=True))
                ]
            )
            drop_phase(work, "clean", "filtered")
        del cleaned, ranges

        with timer.stage("fold (ranges)"):
            folded: list[FoldedShard] = ray.get(
                [
                    fold_task.remote(
                        [part_path(work, "range", r, i) for i, w in enumerate(written) if r in w],
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
            drop_phase(work, "range")

        with timer.stage("place the parts"):
            # in range order, the local engine's: read as one table, they are its table
            for name in (*SPLITS, "events"):
                table = tmp / f"{name}.parquet"
                table.mkdir()
                for i, f in enumerate(folded):
                    (f.out / f"{name}.parquet").rename(table / PART.format(i))
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
        with timer.stage("write"):
            Interactions(
                train=pl.DataFrame(),
                valid=pl.DataFrame(),
                test=pl.DataFrame(),
                users=users_vocab,
                items=items_vocab,
                events=pl.LazyFrame(),  # in its parts already
                quarantine=quarantine.lazy(),
                filtered=filtered.lazy(),
                stats=stats,
                signal_map=smap,
            ).write_into(tmp, pairs=False, log=False)
        shutil.rmtree(work)
    return EtlResult(out=out, stats=stats)


def _get(ray: Any, refs: list) -> list:
    """`ray.get`, with a task's input error raised as itself (its message names the file,
    row and field), not wrapped in the task's traceback."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, InputError):
            raise exc.cause from None
        raise

"""The Ray ETL's first phases: each input (or slice of a large parquet file) read and
validated by its own task into user shards, and the `event_id` rule per bucket of ids."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from recfb.etl.config import InputConfig
from recfb.etl.on_ray.workfiles import ORDER, SHARD, part_path, write_parts
from recfb.etl.pipeline import _first_occurrence, validate_in_memory
from recfb.etl.readers import (
    MALFORMED_RAW,
    MALFORMED_REASON,
    MALFORMED_REASONS,
    PROVENANCE,
    DatabaseLog,
    file_format,
    read_events,
)
from recfb.etl.signals import SignalMap

_FILE_BITS = 40  # `_order` = file index << 40 | row in the file's validated rows


_NOT_INPUT = {*PROVENANCE, MALFORMED_REASON, MALFORMED_RAW}


@dataclass
class ReadFile:
    """What the driver keeps of one input file's read: counts and quarantine (small)."""

    rows_in: int
    bad: pl.DataFrame  # its quarantined rows (malformed records last, as read)
    extras: list[str]
    shards: list[int]  # the user shards it wrote a part for
    buckets: list[int]  # the event_id buckets it wrote a part for


def input_spec(path: Path | DatabaseLog) -> str:
    """What reads one resolved input again: a file's path, a database log's URI."""
    return path.uri if isinstance(path, DatabaseLog) else str(path)


def one_input(cfg: InputConfig, spec: str) -> InputConfig:
    return cfg.model_copy(update={"paths": [spec]})


def raw_schema(spec: str, cfg: InputConfig) -> tuple[pl.Schema, int | None]:
    """One input's columns as its reader gives them (no rows read where the format says),
    and a parquet file's row count (its metadata), which may split its read."""
    raw, (path,) = read_events(one_input(cfg, spec))
    schema = raw.collect_schema()
    if cfg.adapter != "canonical" or file_format(path, cfg.format) != "parquet":
        return schema, None
    return schema, pl.scan_parquet(spec).select(pl.len()).collect().item()


def pieces_of(rows: int | None, per_read: int) -> list[tuple[int, int | None]]:
    """(offset, rows) of the reads of one input: one unless a parquet file is larger."""
    if rows is None or rows <= per_read:
        return [(0, None)]
    return [(offset, per_read) for offset in range(0, rows, per_read)]


def combined_schema(schemas: list[pl.Schema]) -> dict[str, pl.DataType]:
    """The columns the local engine's one query over every file has: the union, in order
    of appearance, each in the type every file's column casts to (`diagonal_relaxed`)."""
    frames = [
        pl.DataFrame(schema={c: t for c, t in s.items() if c not in _NOT_INPUT}) for s in schemas
    ]
    return dict(pl.concat(frames, how="diagonal_relaxed").schema)


def as_combined(raw: pl.LazyFrame, combined: dict[str, pl.DataType]) -> pl.LazyFrame:
    """One file's rows in the combined columns and types, so validation types them as the
    local engine's one query does (a CSV's text event_id beside a parquet's integers)."""
    have = raw.collect_schema()
    columns = [
        pl.col(c).cast(t) if c in have else pl.lit(None, t).alias(c) for c, t in combined.items()
    ]
    return raw.select(*columns, *[c for c in have.names() if c in _NOT_INPUT])


def read_file(
    index: int,
    spec: str,
    name: str,
    cfg: InputConfig,
    smap: SignalMap,
    combined: dict[str, pl.DataType],
    n_shards: int,
    work: Path,
    piece: tuple[int, int | None] = (0, None),
) -> ReadFile:
    """Read and validate one input (the local code, on its own: a malformed record costs
    only its file the slow path), then write its good rows into the user shards, in input
    order with their place `_order`, and its event_ids into buckets by their hash. `piece`:
    the rows (offset, count) of a parquet file read by several tasks (`index` counts
    pieces)."""
    one = one_input(cfg, spec)

    def read(tolerant: bool) -> pl.LazyFrame:
        raw = read_events(one, tolerant=tolerant)[0]
        if piece[1] is not None:  # record numbers are the file's: counted before the slice
            raw = raw.slice(*piece)
        return as_combined(raw, combined)

    good, bad, extras = validate_in_memory(read, one, smap, name)
    good = good.with_columns(
        (pl.int_range(pl.len(), dtype=pl.UInt64) + (index << _FILE_BITS)).alias(ORDER),
        (pl.col("user_id").hash(seed=0) % n_shards).cast(pl.UInt32).alias(SHARD),
    )
    shards = write_parts(good.drop(SHARD), good[SHARD], work, "in", index)
    ids = good.filter(pl.col("event_id").is_not_null()).select("event_id", ORDER, SHARD)
    bucket = (ids["event_id"].hash(seed=1) % n_shards).cast(pl.UInt32)
    buckets = write_parts(ids, bucket, work, "eid", index)
    return ReadFile(good.height + bad.height, bad, extras, shards, buckets)


def event_id_losers(sources: list[Path], work: Path, bucket: int) -> int:
    """One bucket of event_ids (every copy of an id is in one bucket, parts in input
    order): the rows an earlier copy took, written per user shard; how many."""
    ids = pl.concat([pl.read_parquet(p) for p in sources])
    lost = ids.filter(~_first_occurrence(ids, ["event_id"])).select(ORDER, SHARD)
    write_parts(lost.drop(SHARD), lost[SHARD], work, "lost", bucket)
    return lost.height


def quarantine_in_order(reads: list[ReadFile]) -> pl.DataFrame:
    """The files' quarantined rows in the local engine's order: the rows validation
    rejected in input order, then the malformed records (file by file)."""
    bad = pl.concat([r.bad for r in reads], how="diagonal_relaxed")
    malformed = pl.col("reason").is_in(MALFORMED_REASONS)
    return pl.concat([bad.filter(~malformed), bad.filter(malformed)])


def parts_of(work: Path, kind: str, part: int, reads: list[ReadFile], field: str) -> list[Path]:
    """The files' parts of one shard or bucket, in input order."""
    wrote = [i for i, r in enumerate(reads) if part in getattr(r, field)]
    return [part_path(work, kind, part, i) for i in wrote]

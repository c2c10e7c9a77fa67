"""The files a Ray ETL's phases hand each other, in the output's temporary `_shards`
directory (shared by every worker): `{kind}-{part}-{index}.parquet`, written once by one
task, read by the next phase, removed by the driver once that phase has returned."""

from __future__ import annotations

from pathlib import Path

import polars as pl

# the shards' files between phases: written once, read once, on local or shared disk
WORK_COMPRESSION = "lz4"


ORDER, SHARD = "_order", "_shard"  # a row's place in the input; its user's shard


def keep_rows(rows: pl.DataFrame, out: Path) -> Path | None:
    if rows.height == 0:
        return None
    rows.write_parquet(out, compression=WORK_COMPRESSION)
    return out


def write_parts(
    rows: pl.DataFrame, part: pl.Series, work: Path, kind: str, index: int
) -> list[int]:
    """`rows` split by `part` (order kept) into work/{kind}-{part}-{index}.parquet."""
    written = []
    for (p,), chunk in (
        rows.with_columns(part.alias("_part"))
        .partition_by("_part", as_dict=True, include_key=False)
        .items()
    ):
        chunk.write_parquet(part_path(work, kind, p, index), compression=WORK_COMPRESSION)
        written.append(p)
    return written


def drop_phase(work: Path, *kinds: str) -> None:
    """A phase's input files, once every task of it has returned. Tasks never delete what
    they read and write each output under a new name, so a task that Ray runs again (its
    worker died) finds its inputs and gives the same result."""
    for kind in kinds:
        for path in work.glob(f"{kind}-*.parquet"):
            path.unlink()


def part_path(work: Path, kind: str, part: int, index: int) -> Path:
    return work / f"{kind}-{part:05d}-{index:06d}.parquet"

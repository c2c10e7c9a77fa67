"""Stable id vocabularies: external ids -> dense indices, reused and extended across runs.

`users.parquet` / `items.parquet` hold `<kind>_idx` (UInt32, dense from 0), `<kind>_id`
(String, the external id) and `first_seen` (the first event time of the run that added it).
A later run keeps every existing index and appends new ids after them, ordered by first
appearance then id, so embeddings trained earlier stay addressable.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from recfb.etl.frames import join_columns

VOCAB_FILES = {"user": "users.parquet", "item": "items.parquet"}


def load_vocab(directory: str | Path | None, kind: str) -> pl.DataFrame:
    """The stored vocabulary of `kind` ('user' | 'item'), empty when there is none."""
    empty = pl.DataFrame(
        schema={f"{kind}_idx": pl.UInt32, f"{kind}_id": pl.String, "first_seen": pl.Datetime("ms")}
    )
    if directory is None:
        return empty
    path = Path(directory) / VOCAB_FILES[kind]
    if not path.is_file():
        return empty
    vocab = pl.read_parquet(path)
    expected = set(empty.columns)
    if set(vocab.columns) != expected:
        raise ValueError(f"{path}: expected columns {sorted(expected)}, got {vocab.columns}")
    return vocab.cast(empty.schema)


def extend_vocab(vocab: pl.DataFrame, events: pl.DataFrame, kind: str) -> pl.DataFrame:
    """Append ids of `events[<kind>_id]` missing from `vocab`; existing indices never move."""
    id_col, idx_col = f"{kind}_id", f"{kind}_idx"
    seen = (
        events.group_by(id_col)  # the ids' own dtype; only the distinct ids become text
        .agg(pl.col("ts").min().alias("first_seen"))
        .with_columns(pl.col(id_col).cast(pl.String))
        .join(vocab.select(id_col), on=id_col, how="anti")
        .sort(["first_seen", id_col])
    )
    start = vocab.height
    new = seen.select(
        pl.int_range(start, start + seen.height, dtype=pl.UInt32).alias(idx_col),
        id_col,
        pl.col("first_seen").cast(pl.Datetime("ms")),
    )
    return pl.concat([vocab, new])


def attach_index(events: pl.DataFrame, vocab: pl.DataFrame, kind: str) -> pl.DataFrame:
    """Add `<kind>_idx` to events, joining on the events' own id dtype (no mass cast)."""
    id_col, idx_col = f"{kind}_id", f"{kind}_idx"
    dtype = events.schema[id_col]
    keyed = vocab.select(idx_col, pl.col(id_col).cast(dtype, strict=False)).drop_nulls(id_col)
    return join_columns(events, keyed, id_col)

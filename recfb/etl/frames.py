"""Frame helpers the ETL stages share."""

from __future__ import annotations

import polars as pl

_JOIN_ROWS = 8_000_000  # left rows per join in join_columns: bounds its working memory


def join_columns(frame: pl.DataFrame, right: pl.DataFrame, on: str | list[str]) -> pl.DataFrame:
    """`frame.join(right, on, how="left")` for a `right` with unique keys, in `frame`'s row
    order. Only the keys take part in the join: the new columns are attached to `frame`
    without copying its other columns, which a plain join gathers row by row (a second copy
    of tens of millions of events). `frame` is joined in slices of `_JOIN_ROWS` rows, so the
    join's row indices and order-keeping sort cover one slice at a time."""
    keys = [on] if isinstance(on, str) else list(on)
    slices = []
    for start in range(0, max(frame.height, 1), _JOIN_ROWS):
        left = frame.select(keys).slice(start, _JOIN_ROWS)
        added = left.join(right, on=keys, how="left", maintain_order="left")
        if added.height != left.height:
            raise ValueError(f"join_columns: keys {keys} repeat in the right frame")
        slices.append(added.drop(keys))
    return frame.with_columns(pl.concat(slices, rechunk=True).get_columns())


def filter_consuming(frame: pl.DataFrame, mask: pl.Series) -> pl.DataFrame:
    """`frame.filter(mask)` column by column, emptying `frame` as it goes: each column is
    released once its filtered copy exists, so the filter holds one extra column at a time
    instead of a second copy of the whole frame. `frame` is left without columns."""
    kept = []
    for name in frame.columns:
        kept.append(frame.drop_in_place(name).filter(mask))
    return pl.DataFrame(kept)


def rechunk_consuming(frame: pl.DataFrame) -> pl.DataFrame:
    """`frame.rechunk()` column by column, emptying `frame` as it goes (one extra column at a
    time). A frame the streaming engine collected comes in many chunks, and an eager
    `select`/`with_columns` on it first rechunks the whole frame, each time: a second copy
    of every column, and seconds at tens of millions of rows."""
    return pl.DataFrame([frame.drop_in_place(name).rechunk() for name in frame.columns])

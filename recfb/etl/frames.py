"""Frame helpers the ETL stages share."""

from __future__ import annotations

import polars as pl


def join_columns(frame: pl.DataFrame, right: pl.DataFrame, on: str | list[str]) -> pl.DataFrame:
    """`frame.join(right, on, how="left")` for a `right` with unique keys, in `frame`'s row
    order. Only the keys take part in the join: the new columns are attached to `frame`
    without copying its other columns, which a plain join gathers row by row (a second copy
    of tens of millions of events)."""
    keys = [on] if isinstance(on, str) else list(on)
    added = frame.select(keys).join(right, on=keys, how="left", maintain_order="left")
    if added.height != frame.height:
        raise ValueError(f"join_columns: keys {keys} repeat in the right frame")
    return frame.with_columns(added.drop(keys).get_columns())


def filter_consuming(frame: pl.DataFrame, mask: pl.Series) -> pl.DataFrame:
    """`frame.filter(mask)` column by column, emptying `frame` as it goes: each column is
    released once its filtered copy exists, so the filter holds one extra column at a time
    instead of a second copy of the whole frame. `frame` is left without columns."""
    kept = []
    for name in frame.columns:
        kept.append(frame.drop_in_place(name).filter(mask))
    return pl.DataFrame(kept)

"""Training data read from an ETL output directory (the stage contract, not its internals).

`Interactions` lives in `recfb.etl.interactions` (no torch there) and is re-exported here;
the torch helpers training needs stay in this module."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl
import torch

from recfb.errors import InputError
from recfb.etl.interactions import PAIR_COLUMNS, SPLITS, Interactions

__all__ = [
    "PAIR_COLUMNS",
    "SPLITS",
    "Interactions",
    "csr_by_user",
    "item_attribute",
    "recency_weighted",
]


def recency_weighted(
    train: pl.DataFrame, half_life_days: float | None, newest: datetime | None = None
) -> pl.DataFrame:
    """`weight` x 0.5^(age / half-life), age = `newest` (by default the newest `last_ts` of
    the table; a rank's shard is given the whole table's) minus the pair's (unchanged when
    half_life_days is None). Fast-moving catalogues (short video) are ranked by what is
    liked now, not by what was liked a week ago."""
    if half_life_days is None or train.height == 0:
        return train
    now = pl.col("last_ts").max() if newest is None else pl.lit(newest).cast(train["last_ts"].dtype)
    age_days = (now - pl.col("last_ts")).dt.total_seconds() / 86_400
    decay = pl.lit(0.5).pow(age_days / half_life_days)
    return train.with_columns((pl.col("weight") * decay).cast(pl.Float32).alias("weight"))


def item_attribute(directory: str | Path, column: str) -> pl.DataFrame:
    """`item_idx, <column>` for every item the ETL's pairs give a non-null value (the first
    one seen). An item's attribute describes the item, not an outcome, so every split counts.
    Raises InputError when the ETL output does not carry the column."""
    directory = Path(directory)
    frames = []
    for split in SPLITS:
        path = directory / f"{split}.parquet"
        if column not in pl.read_parquet_schema(path):
            raise InputError(
                f"the ETL output does not carry '{column}'", file=str(path), field=column
            )
        frames.append(pl.scan_parquet(path).select("item_idx", column))
    return (
        pl.concat(frames)
        .drop_nulls(column)
        .group_by("item_idx")
        .agg(pl.col(column).first())
        .collect()
    )


def csr_by_user(
    users: np.ndarray, items: np.ndarray, n_users: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(indptr, items sorted by user): each user's items, for per-user sampling."""
    order = np.argsort(users, kind="stable")
    counts = np.bincount(users, minlength=n_users)
    indptr = np.concatenate([[0], np.cumsum(counts)])
    return torch.as_tensor(indptr, dtype=torch.long), torch.as_tensor(
        items[order], dtype=torch.long
    )

"""Training data read from an ETL output directory (the stage contract, not its internals)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import polars as pl
import torch

from recfb.errors import InputError
from recfb.evaluate import item_popularity

PAIR_COLUMNS = ["user_idx", "item_idx", "label", "weight", "matured", "last_ts"]


@dataclass
class Interactions:
    """Pair tables of one ETL run with the catalogue sizes and level names."""

    directory: Path
    n_users: int
    n_items: int
    level_names: dict[int, str]
    train: pl.DataFrame
    valid: pl.DataFrame
    test: pl.DataFrame
    stats: dict

    @classmethod
    def load(cls, directory: str | Path) -> Interactions:
        directory = Path(directory)
        needed = [
            "train.parquet",
            "valid.parquet",
            "test.parquet",
            "users.parquet",
            "items.parquet",
            "stats.json",
        ]
        missing = [n for n in needed if not (directory / n).is_file()]
        if missing:
            raise InputError(
                f"not an ETL output directory (missing {missing}); run `recfb etl` first",
                file=str(directory),
            )
        stats = json.loads((directory / "stats.json").read_text())
        levels = {int(k): v for k, v in stats["levels"].items() if int(k) > 0}

        def pairs(name: str) -> pl.DataFrame:
            return pl.read_parquet(directory / f"{name}.parquet", columns=PAIR_COLUMNS)

        return cls(
            directory=directory,
            n_users=pl.scan_parquet(directory / "users.parquet").select(pl.len()).collect().item(),
            n_items=pl.scan_parquet(directory / "items.parquet").select(pl.len()).collect().item(),
            level_names=levels,
            train=pairs("train"),
            valid=pairs("valid"),
            test=pairs("test"),
            stats=stats,
        )

    @property
    def n_levels(self) -> int:
        return len(self.level_names)

    @property
    def hidden_labels(self) -> tuple[int, ...]:
        """Pair labels the signal map hides from their user (`exclusion_labels`); an older
        ETL output without the resolved map hides negatives and the deepest level."""
        from recfb.etl.signals import exclusion_labels

        spec = self.stats.get("signal_map_spec")
        if spec is None:
            return (-1, self.n_levels)
        return exclusion_labels(spec)

    def fingerprint(self) -> str:
        """A short content hash of the data (stats + pair tables' sizes) for run tags."""
        h = hashlib.sha256((self.directory / "stats.json").read_bytes())
        for name in ("train", "valid", "test", "users", "items"):
            h.update(str((self.directory / f"{name}.parquet").stat().st_size).encode())
        return h.hexdigest()[:16]

    def with_valid_in_train(self) -> Interactions:
        """Train = train and valid pairs folded together, valid empty (for a refit before the
        test). A pair in both windows keeps its deepest label, unless its newer (valid) label
        is an explicit negative: the newest explicit signal wins."""
        both = pl.concat(
            [
                self.train.with_columns(window=pl.lit(0, pl.Int8)),
                self.valid.with_columns(window=pl.lit(1, pl.Int8)),
            ]
        )
        newest = pl.col("label").sort_by("window").last()
        merged = (
            both.group_by("user_idx", "item_idx", maintain_order=True)
            .agg(
                pl.when(newest < 0).then(newest).otherwise(pl.col("label").max()).alias("label"),
                pl.col("weight").max(),
                pl.col("matured").sort_by("window").last(),
                pl.col("last_ts").max(),
            )
            .select(self.train.columns)
        )
        return replace(self, train=merged, valid=self.valid.clear())

    def item_popularity(self, min_label: int = 1) -> np.ndarray:
        """Train pairs with label >= min_label per item."""
        return item_popularity(self.train, self.n_items, min_label).astype(np.float64)


SPLITS = ("train", "valid", "test")


def recency_weighted(train: pl.DataFrame, half_life_days: float | None) -> pl.DataFrame:
    """`weight` x 0.5^(age / half-life), age = the newest `last_ts` of the table minus the
    pair's (unchanged when half_life_days is None). Fast-moving catalogues (short video) are
    ranked by what is liked now, not by what was liked a week ago."""
    if half_life_days is None or train.height == 0:
        return train
    age_days = (pl.col("last_ts").max() - pl.col("last_ts")).dt.total_seconds() / 86_400
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

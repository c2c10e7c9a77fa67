"""One ETL run's tables, in memory or read from its output directory (the stage contract).

`recfb.etl.run` returns an `Interactions` without touching disk; `Interactions.load` reads a
directory `recfb etl` wrote; `save` writes the same layout. A table is one parquet file or
(the Ray engine's pair tables and event log) a directory of that name holding its parts in
order, `part-00000.parquet`, ...; Polars, pyarrow, DuckDB and Spark read either as one
table. The event log, the quarantine and the filtered rows are lazy (a scan for a loaded
directory) so loading stays cheap; the pair tables and the vocabularies are frames. No torch
here: the server and notebooks import it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl

from recfb.errors import InputError
from recfb.etl.signals import SignalMap, exclusion_labels
from recfb.etl.vocab import VOCAB_FILES
from recfb.io import atomic_dir, write_json

if TYPE_CHECKING:
    import numpy as np

SPLITS = ("train", "valid", "test")
# zstd level of the large tables: level 1 writes them a fifth faster than Polars' default
# and, on the ETL's pair tables and event log, no larger
ZSTD_LEVEL = 1
# the columns training reads; `with_valid_in_train` folds exactly these
PAIR_COLUMNS = ["user_idx", "item_idx", "label", "weight", "matured", "last_ts"]
# columns every ETL pair table has (the per-signal counts and features vary with the data)
_ETL_PAIR_COLUMNS = [*PAIR_COLUMNS, "level", "negative", "first_ts", "seen_before"]
_NEEDED = [
    "train.parquet",
    "valid.parquet",
    "test.parquet",
    "users.parquet",
    "items.parquet",
    "events.parquet",
    "stats.json",
]


@dataclass(kw_only=True, eq=False)
class Interactions:
    """Pair tables per split (every column the ETL folds), the user and item vocabularies
    (`<kind>_idx, <kind>_id, first_seen`), the event log, the quarantined and filtered rows,
    the statistics and the resolved signal map. `directory` is None for a run held in memory."""

    train: pl.DataFrame
    valid: pl.DataFrame
    test: pl.DataFrame
    users: pl.DataFrame
    items: pl.DataFrame
    events: pl.LazyFrame
    quarantine: pl.LazyFrame
    filtered: pl.LazyFrame | None
    stats: dict
    signal_map: SignalMap | None
    directory: Path | None = None

    @classmethod
    def load(
        cls,
        directory: str | Path,
        columns: list[str] | None = None,
        users: tuple[int, int] | None = None,
    ) -> Interactions:
        """Read an ETL output directory; `columns` restricts the pair tables (e.g. to
        `PAIR_COLUMNS`, what training needs) where memory matters, `users` to the pairs of
        users `[start, stop)` (a training rank's shard: the tables are sorted by user, so
        the reader skips the row groups of the others)."""
        directory = Path(directory)
        missing = [n for n in _NEEDED if not (directory / n).exists()]
        if missing:
            raise InputError(
                f"not an ETL output directory (missing {missing}); run `recfb etl` first",
                file=str(directory),
            )
        stats = json.loads((directory / "stats.json").read_text())
        spec = stats.get("signal_map_spec")

        def pairs(name: str) -> pl.DataFrame:
            if users is None:
                return pl.read_parquet(directory / f"{name}.parquet", columns=columns)
            table = pl.scan_parquet(directory / f"{name}.parquet")
            table = table.select(columns) if columns is not None else table
            return table.filter(pl.col("user_idx").is_between(*users, closed="left")).collect()

        def scan(name: str) -> pl.LazyFrame | None:
            path = directory / f"{name}.parquet"
            return pl.scan_parquet(path) if path.exists() else None

        quarantine = scan("quarantine")
        return cls(
            train=pairs("train"),
            valid=pairs("valid"),
            test=pairs("test"),
            users=pl.read_parquet(directory / "users.parquet"),
            items=pl.read_parquet(directory / "items.parquet"),
            events=pl.scan_parquet(directory / "events.parquet"),
            quarantine=quarantine if quarantine is not None else pl.LazyFrame(),
            filtered=scan("filtered"),
            stats=stats,
            signal_map=SignalMap.model_validate(spec) if spec is not None else None,
            directory=directory,
        )

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={getattr(self, s).height:,} pairs" for s in SPLITS)
        where = f", directory={str(self.directory)!r}" if self.directory else " (in memory)"
        return f"Interactions({sizes}, users={self.n_users:,}, items={self.n_items:,}{where})"

    def save(self, path: str | Path) -> Path:
        """Write the layout `recfb etl` writes, atomically (the old directory is replaced
        only once everything is written); returns the directory."""
        for name in SPLITS:
            lacking = [c for c in _ETL_PAIR_COLUMNS if c not in getattr(self, name).columns]
            if lacking:
                raise InputError(
                    f"the {name} pairs lack ETL columns {lacking} (loaded with `columns=`?): "
                    "saving them would not be an ETL output",
                    field=name,
                )
        path = Path(path)
        with atomic_dir(path) as tmp:
            self.write_into(tmp)
        return path

    def write_into(
        self, directory: Path, release: bool = False, pairs: bool = True, log: bool = True
    ) -> None:
        """Every table and `stats.json` into an existing (temporary) directory. `release`
        (for an object thrown away after): each pair table is emptied once written, so it no
        longer holds memory while the event log is sorted and written. `pairs=False`: the
        pair tables are in `directory` already (`recfb etl` writes them as it folds);
        `log=False`: the event log is too (the Ray engine's parts)."""
        for name in SPLITS if pairs else ():
            getattr(self, name).write_parquet(directory / f"{name}.parquet")
            if release:
                setattr(self, name, getattr(self, name).clear())
        if log:
            self.events.sink_parquet(
                directory / "events.parquet", compression_level=ZSTD_LEVEL, engine="streaming"
            )
        self.users.write_parquet(directory / VOCAB_FILES["user"])
        self.items.write_parquet(directory / VOCAB_FILES["item"])
        self.quarantine.collect().write_parquet(directory / "quarantine.parquet")
        if self.filtered is not None:
            self.filtered.collect().write_parquet(directory / "filtered.parquet")
        write_json(directory / "stats.json", self.stats)

    @property
    def n_users(self) -> int:
        return self.users.height

    @property
    def n_items(self) -> int:
        return self.items.height

    @property
    def level_names(self) -> dict[int, str]:
        """Positive levels 1..T by name (from the stats, as written)."""
        return {int(k): v for k, v in self.stats["levels"].items() if int(k) > 0}

    @property
    def n_levels(self) -> int:
        return len(self.level_names)

    @property
    def hidden_labels(self) -> tuple[int, ...]:
        """Pair labels the signal map hides from their user (`exclusion_labels`); an older
        ETL output without the resolved map hides negatives and the deepest level."""
        spec = self.stats.get("signal_map_spec")
        if spec is None:
            return (-1, self.n_levels)
        return exclusion_labels(spec)

    def fingerprint(self) -> str:
        """A short content hash for run tags. A directory: stats.json plus the tables' file
        sizes (as always). In memory: the stats (less timings) plus row hashes of the pair
        tables and vocabularies, so equal data gives an equal fingerprint within a session."""
        if self.directory is not None:
            h = hashlib.sha256((self.directory / "stats.json").read_bytes())
            for name in ("train", "valid", "test", "users", "items"):
                h.update(str(table_bytes(self.directory / f"{name}.parquet")).encode())
            return h.hexdigest()[:16]
        stats = {k: v for k, v in self.stats.items() if k != "timings_s"}
        h = hashlib.sha256(json.dumps(stats, sort_keys=True, default=str).encode())
        for name in ("train", "valid", "test", "users", "items"):
            frame = getattr(self, name)
            digest = int(frame.hash_rows(seed=0).sum()) if frame.height else 0
            h.update(f"{name}:{frame.height}:{digest}".encode())
        return h.hexdigest()[:16]

    def with_valid_in_train(self) -> Interactions:
        """Train = train and valid pairs folded together, valid empty (for a refit before the
        test). A pair in both windows keeps its deepest label, unless its newer (valid) label
        is an explicit negative: the newest explicit signal wins. The other columns fold as
        one window over both would: counts add up, first/last times widen, weight is the
        larger, maturity and pass-through features come from the newer window, delays and
        `seen_before` from the older one."""
        both = pl.concat(
            [
                self.train.with_columns(_window=pl.lit(0, pl.Int8)),
                self.valid.with_columns(_window=pl.lit(1, pl.Int8)),
            ]
        )
        newest = pl.col("label").sort_by("_window").last()
        label = pl.when(newest < 0).then(newest).otherwise(pl.col("label").max())
        folds = {
            "label": label,
            "negative": label < 0,
            "level": pl.col("level").max(),
            "weight": pl.col("weight").max(),
            "first_ts": pl.col("first_ts").min(),
            "last_ts": pl.col("last_ts").max(),
            "click_to_purchase_s": pl.col("click_to_purchase_s").drop_nulls().first(),
            "purchase_to_refund_s": pl.col("purchase_to_refund_s").drop_nulls().first(),
            "seen_before": pl.col("seen_before").first(),
        }
        keys = ["user_idx", "item_idx"]

        def fold(name: str) -> pl.Expr:
            if name in folds:
                return folds[name].alias(name)
            if name.startswith("n_"):  # per-signal counts
                return pl.col(name).sum()
            return pl.col(name).sort_by("_window").last()  # maturity, features

        merged = (
            both.group_by(keys, maintain_order=True)
            .agg(fold(c) for c in self.train.columns if c not in keys)
            .select(self.train.columns)
            .cast(dict(self.train.schema))
        )
        return replace(self, train=merged, valid=self.valid.clear())

    def item_exposure(self) -> np.ndarray:
        """Logged recommender impressions per item over the train pairs (float64): the
        exposure IPS propensities can come from (`recfb.etl.exposure`). Raises InputError
        when the data has no logged exposure."""
        from recfb.etl.exposure import item_exposure

        smap = self.signal_map
        signals = [n for n, s in smap.signals.items() if s.exposure] if smap is not None else []
        return item_exposure(self.train, self.n_items, signals, source_label(self))

    def item_popularity(self, min_label: int = 1) -> np.ndarray:
        """Train pairs with label >= min_label per item."""
        import numpy as np

        from recfb.evaluate import item_popularity  # imports torch: only when asked

        return item_popularity(self.train, self.n_items, min_label).astype(np.float64)


def as_interactions(
    data: str | Path | Interactions, columns: list[str] | None = PAIR_COLUMNS
) -> Interactions:
    """An ETL output as `Interactions`: an `Interactions` is returned as it is, a directory is
    loaded (its pair tables with `columns`: by default the training ones, which is all the
    consumers that take either form read)."""
    if isinstance(data, Interactions):
        return data
    return Interactions.load(data, columns=columns)


def source_label(data: Interactions) -> str:
    """Where the data came from, for error messages."""
    return str(data.directory) if data.directory is not None else "<in-memory ETL output>"


PART = "part-{:05d}.parquet"  # the name of a table's n-th part, where it is written in parts


def table_bytes(path: Path) -> int | list[int]:
    """A table's size on disk: its file's, or its parts' in order."""
    if path.is_dir():
        return [part.stat().st_size for part in sorted(path.glob("*.parquet"))]
    return path.stat().st_size

"""Readers: files, globs or directories of parquet / CSV / JSONL, the serving event log
(SQLite `*.db`), and dataset adapters.

Every reader returns a LazyFrame in the canonical schema (`user_id, item_id, event, ts`, plus
optional `value, event_id, order_id` and pass-through feature columns) with two provenance
columns, `source_file` and `source_row` (1-based record number in that file), so that a bad
row can be traced back to where it came from.
"""

from __future__ import annotations

import glob
from pathlib import Path

import polars as pl

from recfb.errors import InputError
from recfb.etl.config import InputConfig

REQUIRED = ("user_id", "item_id", "event", "ts")
OPTIONAL = ("value", "event_id", "order_id")
CANONICAL = REQUIRED + OPTIONAL
PROVENANCE = ("source_file", "source_row")
MEMORY_SOURCE = "<memory>"  # `source_file` of events handed over as a frame

_SUFFIX_FORMAT = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".tsv": "csv",
    ".data": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".db": "sqlite",
    ".sqlite": "sqlite",
}


def resolve_paths(paths: list[str]) -> list[Path]:
    """Expand files, globs and directories (recursively) into a sorted list of files."""
    files: list[Path] = []
    for spec in paths:
        p = Path(spec)
        if p.is_dir():
            found = sorted(
                f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in _SUFFIX_FORMAT
            )
            if not found:
                raise InputError("directory holds no parquet/csv/jsonl files", file=spec)
            files += found
        elif p.is_file():
            files.append(p)
        else:
            matched = sorted(Path(m) for m in glob.glob(spec, recursive=True) if Path(m).is_file())
            if not matched:
                raise InputError("no such file, directory or glob match", file=spec)
            files += matched
    return list(dict.fromkeys(files))


def file_format(path: Path, configured: str) -> str:
    if configured != "auto":
        return configured
    fmt = _SUFFIX_FORMAT.get(path.suffix.lower())
    if fmt is None:
        raise InputError(
            f"cannot tell the format from the suffix '{path.suffix}'; set input.format "
            "to parquet, csv, jsonl or sqlite",
            file=str(path),
        )
    return fmt


def _scan_one(path: Path, cfg: InputConfig, string_cols: tuple[str, ...]) -> pl.LazyFrame:
    """Scan one file, keep ids/ts/event as read (strings for text formats)."""
    fmt = file_format(path, cfg.format)
    sep = "\t" if path.suffix.lower() == ".tsv" and cfg.csv_separator == "," else cfg.csv_separator
    try:
        if fmt == "sqlite":
            lf = _read_event_log(path)
        elif fmt == "parquet":
            lf = pl.scan_parquet(path)
        elif fmt == "csv":
            lf = pl.scan_csv(
                path,
                separator=sep,
                has_header=cfg.csv_has_header,
                infer_schema_length=10_000,
                schema_overrides={c: pl.String for c in string_cols},
                truncate_ragged_lines=False,
            )
        else:
            lf = pl.scan_ndjson(path, infer_schema_length=None)
        schema = lf.collect_schema()
    except Exception as exc:  # polars raises several types; the message is what matters
        raise InputError(f"cannot read as {fmt}: {exc}", file=str(path)) from exc
    if fmt == "csv" and not cfg.csv_has_header and cfg.columns:
        # headerless CSV: polars names columns column_1..column_n; map them by position
        names = list(cfg.columns)
        if len(names) != len(schema):
            raise InputError(
                f"headerless CSV has {len(schema)} columns but input.columns names {len(names)}",
                file=str(path),
            )
        lf = lf.rename(dict(zip(schema.names(), names, strict=True)))
    return lf.with_row_index("source_row", offset=1).with_columns(
        pl.lit(str(path)).cast(pl.Categorical).alias("source_file"),
        pl.col("source_row").cast(pl.Int64),
    )


def _read_event_log(path: Path) -> pl.LazyFrame:
    """The serving event log (SQLite, table `events`, ts in epoch ms), in arrival order."""
    import sqlite3

    uri = f"file:{path.resolve()}?mode=ro"
    with sqlite3.connect(uri, uri=True) as conn:
        frame = pl.read_database(
            f"SELECT {', '.join(CANONICAL)} FROM events ORDER BY received_at, rowid",
            connection=conn,
            schema_overrides={
                "event_id": pl.String,
                "user_id": pl.String,
                "item_id": pl.String,
                "event": pl.String,
                "ts": pl.Int64,
                "value": pl.Float64,
                "order_id": pl.String,
            },
        )
    return frame.lazy()


def _rename_canonical(lf: pl.LazyFrame, mapping: dict[str, str], path: Path | str) -> pl.LazyFrame:
    schema = lf.collect_schema()
    rename = {src: dst for src, dst in mapping.items() if src in schema and src != dst}
    lf = lf.rename(rename)
    missing = [c for c in REQUIRED if c not in lf.collect_schema()]
    if missing:
        raise InputError(
            f"required column(s) {missing} missing; found {schema.names()}. The canonical "
            f"schema needs {list(REQUIRED)} (map other names with input.columns)",
            file=str(path),
            field=missing[0],
        )
    return lf


def read_canonical(path: Path, cfg: InputConfig) -> pl.LazyFrame:
    """A file already in the canonical schema (optionally with renamed columns)."""
    text_ids = tuple(c for c in CANONICAL if c not in ("value",))
    lf = _scan_one(path, cfg, string_cols=text_ids if cfg.csv_has_header else ())
    return _rename_canonical(lf, cfg.columns, path)


def read_taobao(path: Path, cfg: InputConfig) -> pl.LazyFrame:
    """Taobao UserBehavior: headerless `user_id,item_id,category_id,behavior,timestamp`."""
    cfg = cfg.model_copy(
        update={
            "format": "csv",
            "csv_has_header": False,
            "columns": {
                "user_id": "user_id",
                "item_id": "item_id",
                "category": "category",
                "event": "event",
                "ts": "ts",
            },
        }
    )
    lf = _scan_one(path, cfg, string_cols=())
    return lf.with_columns(
        pl.col("user_id").cast(pl.String),
        pl.col("item_id").cast(pl.String),
        pl.col("event").cast(pl.String),
        pl.col("ts").cast(pl.String),
    )


def read_movielens(path: Path, cfg: InputConfig) -> pl.LazyFrame:
    """MovieLens ratings (`user|item|rating|timestamp` with header, or u.data's tab form).

    Each rating becomes an event named `rating_<r>` (value = r); the signal map turns ratings
    into levels (e.g. 5 > 4 > 3) and explicit negatives (1-2).
    """
    sep = "|" if "|" in path.open().readline() else "\t"
    has_header = not path.open().readline().split(sep)[0].strip().isdigit()
    cfg = cfg.model_copy(
        update={
            "format": "csv",
            "csv_separator": sep,
            "csv_has_header": has_header,
            "columns": {}
            if has_header
            else {"user": "", "item": "", "rating": "", "timestamp": ""},
        }
    )
    lf = _scan_one(path, cfg, string_cols=())
    rating = pl.col("rating").cast(pl.String)
    return lf.select(
        pl.col("user").cast(pl.String).alias("user_id"),
        pl.col("item").cast(pl.String).alias("item_id"),
        pl.concat_str(pl.lit("rating_"), rating.str.strip_chars()).alias("event"),
        pl.col("timestamp").cast(pl.String).alias("ts"),
        rating.cast(pl.Float64, strict=False).alias("value"),
        *PROVENANCE,
    )


# KuaiRand: one log row carries several signals; each flag becomes its own event.
_KUAIRAND_FLAGS = {
    "is_click": "click",
    "long_view": "long_view",
    "is_follow": "follow",
    "is_comment": "comment",
    "is_forward": "forward",
    "is_profile_enter": "profile_enter",
}


def read_kuairand(path: Path, cfg: InputConfig) -> pl.LazyFrame:
    """KuaiRand like/hate extract: one event per set flag, plus `like` or `hate` from label.

    Clicks carry play time in seconds as `value` (for the dwell rule); `event_id` is
    `user:video:time_ms:event`, so re-ingesting the same file is idempotent.
    """
    cfg = cfg.model_copy(update={"format": "csv", "csv_separator": "\t", "csv_has_header": True})
    base = _scan_one(path, cfg, string_cols=())
    schema = base.collect_schema()
    missing = [c for c in ("user_id", "video_id", "time_ms", "label") if c not in schema]
    if missing:
        raise InputError(f"KuaiRand columns {missing} missing", file=str(path), field=missing[0])
    common = [
        pl.col("user_id").cast(pl.String),
        pl.col("video_id").cast(pl.String).alias("item_id"),
        pl.col("time_ms").cast(pl.String).alias("ts"),
        pl.col("duration_ms").cast(pl.Float64, strict=False).truediv(1000).alias("duration_s"),
        *PROVENANCE,
    ]
    parts = []
    for flag, name in _KUAIRAND_FLAGS.items():
        if flag not in schema:
            continue
        value = (
            pl.col("play_time_ms").cast(pl.Float64, strict=False) / 1000
            if name == "click"
            else pl.lit(None, pl.Float64)
        )
        parts.append(
            base.filter(pl.col(flag).cast(pl.Int64, strict=False) == 1).select(
                *common, pl.lit(name).alias("event"), value.alias("value")
            )
        )
    label = pl.col("label").cast(pl.Int64, strict=False)
    parts.append(
        base.filter(label.is_not_null()).select(
            *common,
            pl.when(label == 1).then(pl.lit("like")).otherwise(pl.lit("hate")).alias("event"),
            pl.lit(None, pl.Float64).alias("value"),
        )
    )
    lf = pl.concat(parts, how="vertical")
    return lf.with_columns(
        pl.concat_str(["user_id", "item_id", "ts", "event"], separator=":").alias("event_id")
    )


def read_frame(frame: pl.DataFrame | pl.LazyFrame, cfg: InputConfig) -> pl.LazyFrame:
    """Events already in memory, in the canonical schema (after `input.columns` renames);
    provenance is `MEMORY_SOURCE` and the 1-based row number."""
    lf = frame.lazy().with_row_index("source_row", offset=1)
    lf = lf.with_columns(
        pl.lit(MEMORY_SOURCE).cast(pl.Categorical).alias("source_file"),
        pl.col("source_row").cast(pl.Int64),
    )
    return _rename_canonical(lf, cfg.columns, MEMORY_SOURCE)


ADAPTERS = {
    "canonical": read_canonical,
    "taobao": read_taobao,
    "movielens": read_movielens,
    "kuairand": read_kuairand,
}


def read_events(cfg: InputConfig) -> tuple[pl.LazyFrame, list[Path]]:
    """All input files as one LazyFrame in the canonical schema (not yet validated)."""
    files = resolve_paths(cfg.paths)
    reader = ADAPTERS[cfg.adapter]
    frames = [reader(f, cfg) for f in files]
    return pl.concat(frames, how="diagonal_relaxed"), files

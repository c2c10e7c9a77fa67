"""Readers: files, globs or directories of parquet / CSV / JSONL (local, or objects in a
store: `s3://bucket/events/*.parquet`), the serving event log (SQLite `*.db`, or a
`postgresql://` URI), and dataset adapters.

Every reader returns a LazyFrame in the canonical schema (`user_id, item_id, event, ts`, plus
optional `value, event_id, order_id` and pass-through feature columns) with two provenance
columns, `source_file` and `source_row` (1-based record number in that file), so that a bad
row can be traced back to where it came from.

Polars reads each file first. Only when it fails on a CSV or JSONL file is that file read again
line by line: malformed records (bytes that are not UTF-8, JSON that does not parse or is not an
object, CSV rows with more fields than the header) are split off as quarantine rows carrying
their record number, a reason and a printable excerpt, and Polars parses the remaining lines.
Well-formed files never take that path.
"""

from __future__ import annotations

import csv
import glob
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from recfb import pglog
from recfb.errors import InputError
from recfb.etl.config import InputConfig
from recfb.etl.objectstore import ObjectFile, is_object_uri, list_objects

REQUIRED = ("user_id", "item_id", "event", "ts")
OPTIONAL = ("value", "event_id", "order_id")
CANONICAL = REQUIRED + OPTIONAL
PROVENANCE = ("source_file", "source_row")
MEMORY_SOURCE = "<memory>"  # `source_file` of events handed over as a frame
# Quarantine reasons of records that cannot be parsed at all (checked before any field rule).
MALFORMED_REASONS = ("bad_utf8", "bad_json", "not_json_object", "ragged_row", "unclosed_quote")
# Internal columns of malformed records: their reason and a printable excerpt of the record.
MALFORMED_REASON, MALFORMED_RAW = "_malformed_reason", "_malformed_raw"
EXCERPT_CHARS = 200

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


def excerpt(data: bytes | str, limit: int = EXCERPT_CHARS) -> str:
    """At most `limit` printable characters of `data`, for error messages and the quarantine:
    bytes that are not UTF-8 and non-printable characters (controls, terminal escapes,
    direction overrides) become \\xNN / \\uNNNN escapes; a cut ends in '...'."""
    if isinstance(data, bytes):
        data = data[: limit * 4].decode("utf-8", errors="backslashreplace")
    out: list[str] = []
    size = 0
    for ch in data[: limit * 4]:
        if ch.isprintable():
            piece = ch
        else:
            code = ord(ch)
            piece = f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
            if code > 0xFFFF:
                piece = f"\\U{code:08x}"
        if size + len(piece) > limit:
            return "".join(out) + "..."
        out.append(piece)
        size += len(piece)
    return "".join(out) + ("..." if len(data) > limit * 4 else "")


@dataclass
class _Reading:
    """State of one read: whether every text file is checked (after Polars failed on the
    combined query) and the malformed records split off so far."""

    tolerant: bool = False
    malformed: list[pl.DataFrame] = field(default_factory=list)


@dataclass(frozen=True)
class DatabaseLog:
    """The service's event log on a PostgreSQL server, as an input beside files: `uri` to
    read it; its name (provenance, messages) is the URI without its password."""

    uri: str
    suffix: str = ""

    def __str__(self) -> str:
        return pglog.redact(self.uri)


def resolve_paths(paths: list[str]) -> list[Path]:
    """Expand files, globs and directories (recursively) into a sorted list of files;
    a `postgresql://` URI stays one input (`DatabaseLog`); an object store's URI (a glob or
    a prefix) lists its objects (`ObjectFile`)."""
    files: list[Path] = []
    for spec in paths:
        if pglog.is_pg_uri(spec):  # the service's log on a PostgreSQL server
            files.append(DatabaseLog(str(spec)))  # type: ignore[arg-type]
            continue
        if is_object_uri(spec):  # s3://bucket/prefix/*.parquet
            files += list_objects(spec, tuple(_SUFFIX_FORMAT))  # type: ignore[arg-type]
            continue
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
    if isinstance(path, DatabaseLog):
        return "postgresql"
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


def _scan(
    path: Path, fmt: str, sep: str, cfg: InputConfig, string_cols: tuple[str, ...]
) -> pl.LazyFrame:
    if fmt == "sqlite":
        if isinstance(path, ObjectFile):
            raise InputError("a SQLite event log is read from a local file", file=str(path))
        return _read_event_log(path)
    if fmt == "postgresql":
        return _read_pg_event_log(path.uri)  # type: ignore[attr-defined]
    source = str(path) if isinstance(path, ObjectFile) else path  # Polars reads the store
    if fmt == "parquet":
        return pl.scan_parquet(source)
    if fmt == "csv":
        return pl.scan_csv(
            source,
            separator=sep,
            has_header=cfg.csv_has_header,
            infer_schema_length=10_000,
            schema_overrides={c: pl.String for c in string_cols},
            truncate_ragged_lines=False,
        )
    return pl.scan_ndjson(source, infer_schema_length=None)


def _scan_one(
    path: Path, cfg: InputConfig, string_cols: tuple[str, ...], reading: _Reading
) -> pl.LazyFrame:
    """Scan one file, keep ids/ts/event as read (strings for text formats). A CSV or JSONL
    file that Polars cannot read is read again with its malformed records split off."""
    fmt = file_format(path, cfg.format)
    sep = "\t" if path.suffix.lower() == ".tsv" and cfg.csv_separator == "," else cfg.csv_separator
    if fmt == "csv" and cfg.csv_has_header:
        _refuse_duplicate_header(path, sep)
    split = False
    try:
        lf = _scan(path, fmt, sep, cfg, string_cols)
        schema = lf.collect_schema()
        if reading.tolerant:  # Polars failed on the whole query: find the file it fails on
            lf.select(pl.all().null_count()).collect(engine="streaming")
    except Exception as exc:  # polars raises several types; the message is what matters
        if fmt == "parquet" and isinstance(exc, pl.exceptions.DuplicateError):
            _refuse_duplicate_parquet(path)
        if fmt not in ("csv", "jsonl"):
            raise InputError(f"cannot read as {fmt}: {excerpt(str(exc))}", file=str(path)) from exc
        lf = _read_splitting(path, fmt, sep, cfg, string_cols, reading).lazy()
        schema = lf.collect_schema()
        split = True
    if fmt == "csv" and not cfg.csv_has_header and cfg.columns:
        # headerless CSV: polars names columns column_1..column_n; map them by position
        names = list(cfg.columns)
        read = [c for c in schema.names() if not (split and c == "source_row")]
        if len(names) != len(read):
            raise InputError(
                f"headerless CSV has {len(read)} columns but input.columns names {len(names)}",
                file=str(path),
            )
        lf = lf.rename(dict(zip(read, names, strict=True)))
    if not split:
        lf = lf.with_row_index("source_row", offset=1)
    return lf.with_columns(
        pl.lit(str(path)).cast(pl.Categorical).alias("source_file"),
        pl.col("source_row").cast(pl.Int64),
    )


def _duplicates(names: list[str]) -> list[str]:
    return sorted({n for n in names if names.count(n) > 1})


def _refuse_duplicate_header(path: Path, sep: str) -> None:
    """Polars would rename a repeated column to `<name>_duplicated_0`: refuse it by name."""
    with path.open("rb") as fh:
        first = next(_csv_records(fh), (b"", False))[0]
    header = _csv_fields(first.decode("utf-8", errors="replace"), sep)
    _refuse_duplicates(header, "the CSV header", path)


def _refuse_duplicate_parquet(path: Path) -> None:
    import pyarrow.parquet as pq

    with path.open("rb") as fh:
        _refuse_duplicates(pq.read_schema(fh).names, "the parquet schema", path)


def _refuse_duplicates(names: list[str], where: str, path: Path) -> None:
    """A column named twice is refused by name (Polars would rename the copy silently)."""
    dups = _duplicates(names)
    if dups:
        shown = ", ".join(repr(excerpt(d, 60)) for d in dups[:10])
        raise InputError(
            f"duplicate column name(s) in {where}: {shown}; each column must be named once "
            "(rename or drop the copies)",
            file=str(path),
        )


def _csv_records(fh: io.BufferedReader) -> Iterator[tuple[bytes, bool]]:
    """The file's CSV records as raw bytes (a quoted field may span lines), each with whether
    its quote is still open at the end of the file. Quotes are counted as Polars does."""
    parts: list[bytes] = []
    quotes = 0
    for line in fh:
        parts.append(line)
        quotes += line.count(b'"')
        if quotes % 2 == 0:
            yield b"".join(parts), False
            parts, quotes = [], 0
    if parts:
        yield b"".join(parts), True


def _csv_fields(text: str, sep: str) -> list[str]:
    return next(csv.reader(io.StringIO(text.rstrip("\r\n"), newline=""), delimiter=sep), [])


def _split_csv(
    path: Path, sep: str, has_header: bool, width: int | None
) -> tuple[bytes, list[int], list[tuple[int, str, str]]]:
    """(header + well-formed records, their record numbers, (record, reason, excerpt) of the
    malformed ones). A record with more fields than the header (or than `width`, or the first
    record of a headerless file) is ragged; one with fewer is padded with nulls by Polars, as
    on the fast path, and validation judges its missing fields."""
    good = bytearray()
    rows: list[int] = []
    bad: list[tuple[int, str, str]] = []
    with path.open("rb") as fh:
        records = _csv_records(fh)
        if has_header:
            header = next(records, (b"", False))[0]
            good += header if header.endswith(b"\n") else header + b"\n"
            width = len(_csv_fields(header.decode("utf-8", errors="replace"), sep))
        for number, (record, unclosed) in enumerate(records, start=1):
            try:
                text = record.decode("utf-8")
            except UnicodeDecodeError:
                bad.append((number, "bad_utf8", excerpt(record.rstrip(b"\r\n"))))
                continue
            if unclosed:
                bad.append((number, "unclosed_quote", excerpt(text.rstrip("\r\n"))))
                continue
            fields = len(_csv_fields(text, sep))
            if width is None:
                width = fields
            if fields > width:
                bad.append((number, "ragged_row", excerpt(text.rstrip("\r\n"))))
                continue
            good += record if record.endswith(b"\n") else record + b"\n"
            rows.append(number)
    return bytes(good), rows, bad


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _split_jsonl(path: Path) -> tuple[bytes, list[int], list[tuple[int, str, str]]]:
    """(well-formed lines, their record numbers, (record, reason, excerpt) of the malformed
    ones). Blank lines are not records (Polars skips them too)."""
    good = bytearray()
    rows: list[int] = []
    bad: list[tuple[int, str, str]] = []
    number = 0
    with path.open("rb") as fh:
        for line in fh:
            if not line.strip():
                continue
            number += 1
            raw = line.rstrip(b"\r\n")
            try:
                value = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
            except UnicodeDecodeError:
                bad.append((number, "bad_utf8", excerpt(raw)))
                continue
            except (ValueError, RecursionError):
                bad.append((number, "bad_json", excerpt(raw)))
                continue
            if not isinstance(value, dict):
                bad.append((number, "not_json_object", excerpt(raw)))
                continue
            good += raw + b"\n"
            rows.append(number)
    return bytes(good), rows, bad


def _read_splitting(
    path: Path,
    fmt: str,
    sep: str,
    cfg: InputConfig,
    string_cols: tuple[str, ...],
    reading: _Reading,
) -> pl.DataFrame:
    """The file's well-formed records parsed by Polars, with `source_row` (their record
    number); the malformed ones go to `reading.malformed`. Holds the file in memory: this is
    the slow path, taken only for a file Polars could not read."""
    if fmt == "csv":
        width = len(cfg.columns) if not cfg.csv_has_header and cfg.columns else None
        good, rows, bad = _split_csv(path, sep, cfg.csv_has_header, width)
    else:
        good, rows, bad = _split_jsonl(path)
    try:
        if not rows:
            frame = _empty_frame(good, fmt, sep, cfg, string_cols)
        elif fmt == "csv":
            frame = pl.read_csv(
                io.BytesIO(good),
                separator=sep,
                has_header=cfg.csv_has_header,
                infer_schema_length=None,
                schema_overrides={c: pl.String for c in string_cols},
                truncate_ragged_lines=False,
            )
        else:
            frame = pl.read_ndjson(io.BytesIO(good), infer_schema_length=None)
    except Exception as exc:  # polars raises several types
        raise InputError(
            f"cannot read as {fmt}, even without its {len(bad)} malformed record(s): "
            f"{excerpt(str(exc))}",
            file=str(path),
        ) from exc
    if frame.height != len(rows):  # the split and Polars disagree on what a record is
        raise InputError(
            f"cannot read as {fmt}: {len(rows)} well-formed records gave {frame.height} rows",
            file=str(path),
        )
    if bad:
        numbers, reasons, texts = zip(*bad, strict=True)
        reading.malformed.append(
            pl.DataFrame(
                {
                    "source_file": [str(path)] * len(bad),
                    "source_row": list(numbers),
                    MALFORMED_REASON: list(reasons),
                    MALFORMED_RAW: list(texts),
                },
                schema={
                    "source_file": pl.String,
                    "source_row": pl.Int64,
                    MALFORMED_REASON: pl.String,
                    MALFORMED_RAW: pl.String,
                },
            ).with_columns(pl.col("source_file").cast(pl.Categorical))
        )
    return frame.with_columns(pl.Series("source_row", rows, dtype=pl.Int64))


def _empty_frame(
    good: bytes, fmt: str, sep: str, cfg: InputConfig, string_cols: tuple[str, ...]
) -> pl.DataFrame:
    """No well-formed record: the columns the header names (CSV), else the required ones
    under their source names, all text."""
    if fmt == "csv" and cfg.csv_has_header:
        names = _csv_fields(good.decode("utf-8", errors="replace"), sep)
    elif fmt == "csv" and cfg.columns:
        names = [f"column_{i + 1}" for i in range(len(cfg.columns))]
    else:
        source = {dst: src for src, dst in cfg.columns.items()}
        names = [source.get(c, c) for c in REQUIRED]
    return pl.DataFrame(schema={n: pl.String for n in names})


def _read_event_log(path: Path) -> pl.LazyFrame:
    """The serving event log (SQLite, table `events`, ts in epoch ms), in arrival order."""
    import sqlite3

    uri = f"file:{path.resolve()}?mode=ro"
    with sqlite3.connect(uri, uri=True) as conn:
        columns = list(CANONICAL)
        # the logged exposure flag, where the service was told it (an older log lacks the
        # column; a log where no event carried it reads as one without the flag)
        has_flag = any(row[1] == "is_organic" for row in conn.execute("PRAGMA table_info(events)"))
        if (
            has_flag
            and conn.execute("SELECT 1 FROM events WHERE is_organic IS NOT NULL LIMIT 1").fetchone()
        ):
            columns.append("is_organic")
        frame = pl.read_database(
            f"SELECT {', '.join(columns)} FROM events ORDER BY received_at, rowid",
            connection=conn,
            schema_overrides=_LOG_SCHEMA,
        )
    return frame.lazy()


_LOG_SCHEMA = {
    "event_id": pl.String,
    "user_id": pl.String,
    "item_id": pl.String,
    "event": pl.String,
    "ts": pl.Int64,
    "value": pl.Float64,
    "order_id": pl.String,
    "is_organic": pl.Int64,
}


def _read_pg_event_log(uri: str) -> pl.LazyFrame:
    """The service's event log on PostgreSQL (table `events`), in arrival order, as one
    COPY to CSV (text fields quoted, so an empty text stays text and only NULL is null)."""
    name = pglog.redact(uri)
    try:
        conn = pglog.connect(uri, connect_timeout=10)
    except Exception as exc:  # psycopg.Error: the server's words name the cause
        raise InputError(f"cannot connect to the event log ({exc})", file=name) from exc
    with conn:
        columns = pglog.table_columns(conn)
        if not columns:
            raise InputError("has no table 'events': not a recfb event log", file=name)
        names = list(CANONICAL)
        if conn.execute("SELECT 1 FROM events WHERE is_organic IS NOT NULL LIMIT 1").fetchone():
            names.append("is_organic")  # as the SQLite log: only where the flag was told
        text = [c for c in names if _LOG_SCHEMA[c] == pl.String]
        buffer = io.BytesIO()
        query = (
            f"COPY (SELECT {', '.join(names)} FROM events ORDER BY received_at, seq) "
            f"TO STDOUT WITH (FORMAT csv, HEADER true, FORCE_QUOTE ({', '.join(text)}))"
        )
        with conn.cursor() as cur, cur.copy(query) as copy:
            for block in copy:
                buffer.write(block)
    buffer.seek(0)
    return pl.read_csv(buffer, schema={c: _LOG_SCHEMA[c] for c in names}).lazy()


def _rename_canonical(lf: pl.LazyFrame, mapping: dict[str, str], path: Path | str) -> pl.LazyFrame:
    schema = lf.collect_schema()
    rename = {src: dst for src, dst in mapping.items() if src in schema and src != dst}
    lf = lf.rename(rename)
    missing = [c for c in REQUIRED if c not in lf.collect_schema()]
    if missing:
        raise InputError(
            f"required column(s) {missing} missing; found {excerpt(str(schema.names()))}. "
            f"The canonical schema needs {list(REQUIRED)} (map other names with input.columns)",
            file=str(path),
            field=missing[0],
        )
    return lf


def read_canonical(path: Path, cfg: InputConfig, reading: _Reading) -> pl.LazyFrame:
    """A file already in the canonical schema (optionally with renamed columns)."""
    text_ids = tuple(c for c in CANONICAL if c not in ("value",))
    lf = _scan_one(path, cfg, text_ids if cfg.csv_has_header else (), reading)
    return _rename_canonical(lf, cfg.columns, path)


def read_taobao(path: Path, cfg: InputConfig, reading: _Reading) -> pl.LazyFrame:
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
    lf = _scan_one(path, cfg, (), reading)
    return lf.with_columns(
        pl.col("user_id").cast(pl.String),
        pl.col("item_id").cast(pl.String),
        pl.col("event").cast(pl.String),
        pl.col("ts").cast(pl.String),
    )


def read_movielens(path: Path, cfg: InputConfig, reading: _Reading) -> pl.LazyFrame:
    """MovieLens ratings (`user|item|rating|timestamp` with header, or u.data's tab form).

    Each rating becomes an event named `rating_<r>` (value = r); the signal map turns ratings
    into levels (e.g. 5 > 4 > 3) and explicit negatives (1-2).
    """
    with path.open("rb") as fh:  # bytes: a stray non-UTF-8 byte is the reader's to report
        first = fh.readline().decode("utf-8", errors="replace")
    sep = "|" if "|" in first else "\t"
    has_header = not first.split(sep)[0].strip().isdigit()
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
    lf = _scan_one(path, cfg, (), reading)
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


def read_kuairand(path: Path, cfg: InputConfig, reading: _Reading) -> pl.LazyFrame:
    """KuaiRand like/hate extract: one event per set flag, plus `like` or `hate` from label.

    Clicks carry play time in seconds as `value` (for the dwell rule); `event_id` is
    `user:video:time_ms:event`, so re-ingesting the same file is idempotent.
    """
    cfg = cfg.model_copy(update={"format": "csv", "csv_separator": "\t", "csv_has_header": True})
    base = _scan_one(path, cfg, (), reading)
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


def read_events(cfg: InputConfig, tolerant: bool = False) -> tuple[pl.LazyFrame, list[Path]]:
    """All input files as one LazyFrame in the canonical schema (not yet validated).

    Records no reader could parse ride along as rows with only `source_file`, `source_row`
    and the internal `MALFORMED_REASON` / `MALFORMED_RAW` columns; validation quarantines them.
    `tolerant`: Polars failed on the combined query, so every file is parsed in full here and
    a CSV/JSONL file that fails is split into its well-formed and malformed records.
    """
    files = resolve_paths(cfg.paths)
    reader = ADAPTERS[cfg.adapter]
    reading = _Reading(tolerant=tolerant)
    frames = [reader(f, cfg, reading) for f in files]
    frames += [m.lazy() for m in reading.malformed]
    return pl.concat(frames, how="diagonal_relaxed"), files

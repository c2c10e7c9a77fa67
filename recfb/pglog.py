"""The event log in PostgreSQL: what the service (which writes it) and the ETL (which reads
it) share. Apart from both stages so that neither imports the other.

A log location is a PostgreSQL URI (`postgresql://user@host:5432/db`, or `postgres://`);
anything else is a SQLite file. The table is `events` in the connection's schema (choose
another schema with `?options=-csearch_path%3Dshop`), the SQLite log's columns plus `seq`,
an identity that orders equal `received_at` by insertion. psycopg (the `postgres` extra) is
imported only when a URI is used.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

SCHEMES = ("postgresql://", "postgres://")

# the SQLite log's columns (recfb.serving.eventlog.TABLE_COLUMNS) in the same order, plus seq
SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq         BIGINT GENERATED ALWAYS AS IDENTITY,
    event_id    TEXT PRIMARY KEY,
    user_id     TEXT NOT NULL,
    item_id     TEXT NOT NULL,
    event       TEXT NOT NULL,
    ts          BIGINT NOT NULL,
    value       DOUBLE PRECISION,
    order_id    TEXT,
    received_at BIGINT NOT NULL,
    is_organic  SMALLINT
);
CREATE INDEX IF NOT EXISTS events_user_ts ON events (user_id, ts);
CREATE INDEX IF NOT EXISTS events_item ON events (item_id);
CREATE INDEX IF NOT EXISTS events_ts ON events (ts);
"""
TABLE_COLUMNS = (
    "seq",
    "event_id",
    "user_id",
    "item_id",
    "event",
    "ts",
    "value",
    "order_id",
    "received_at",
    "is_organic",
)
# an advisory lock key: replicas that start together create the table once
SCHEMA_LOCK = 0x72656366  # "recf"


def is_pg_uri(location: Any) -> bool:
    """True for a PostgreSQL URI (the log is a server), False for a SQLite path."""
    return isinstance(location, str) and location.startswith(SCHEMES)


def redact(uri: str) -> str:
    """`uri` without its password: what logs, errors and the ETL's provenance show."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit((parts.scheme, user + host, parts.path, parts.query, parts.fragment))


def connect(uri: str, **kwargs: Any) -> Any:
    """A psycopg connection, with a clear error when the `postgres` extra is missing."""
    psycopg = import_psycopg()
    return psycopg.connect(uri, **kwargs)


def import_psycopg() -> Any:
    try:
        import psycopg
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            "a postgresql:// event log needs psycopg: pip install 'recfb[postgres]'",
            name="psycopg",
        ) from exc
    return psycopg


def table_columns(conn: Any) -> tuple[str, ...]:
    """The columns of `events` in the connection's search path, in order; () when absent."""
    rows = conn.execute(
        "SELECT a.attname FROM pg_attribute a WHERE a.attrelid = to_regclass('events') "
        "AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum"
    ).fetchall()
    return tuple(r[0] for r in rows)


def log_fingerprint(uri: str) -> tuple[str, int, int]:
    """(redacted URI, events, last seq): changes whenever an event is added, so a pipeline
    whose input is the log re-runs its ETL after new events."""
    with connect(uri) as conn:
        if not table_columns(conn):
            return (redact(uri), 0, 0)
        count, last = conn.execute("SELECT count(*), coalesce(max(seq), 0) FROM events").fetchone()
    return (redact(uri), int(count), int(last))

"""The durable online event log on a PostgreSQL server: what several service replicas share.

Same interface and guarantees as the SQLite `EventLog` (recfb/serving/eventlog.py): one batch
is one INSERT (atomic), idempotent on `event_id`, and `append` returns only after the commit
with `synchronous_commit = on` set on every connection, so an acknowledged event is in the
server's WAL on disk whatever the server's default. Replicas on other hosts point at the same
URI (`event_log: postgresql://...`); the table is created once (under an advisory lock) by
whichever starts first.

The log checks itself when it opens, and refuses to start (`EventLogError`, naming the URI
without its password) rather than write somewhere unexpected: the server must answer, and
an existing `events` table must have the log's columns. Counting back what a log held is
the server's job here (its WAL and backups), not a marker file's.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from recfb import pglog
from recfb.serving.eventlog import EventLogError, LoggedEvent, now_ms

_INSERT = """
INSERT INTO events (event_id, user_id, item_id, event, ts, value, order_id, received_at,
                    is_organic)
SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::bigint[],
                     %s::float8[], %s::text[], %s::bigint[], %s::smallint[])
ON CONFLICT (event_id) DO NOTHING
"""


class PgEventLog:
    """Append-only, idempotent event store on PostgreSQL; safe to share between threads
    (a small connection pool; each call takes one connection)."""

    def __init__(self, uri: str, pool_size: int = 4) -> None:
        psycopg = pglog.import_psycopg()
        from psycopg_pool import ConnectionPool

        self.uri = uri
        self.path = pglog.redact(uri)  # what messages name (the SQLite log's file)

        def configure(conn: Any) -> None:
            conn.execute("SET synchronous_commit = on")

        try:  # one connection first: its error says why (the pool's only says it timed out)
            psycopg.connect(uri, connect_timeout=10).close()
            self._pool = ConnectionPool(
                uri,
                min_size=1,
                max_size=pool_size,
                kwargs={"autocommit": True},
                configure=configure,
                open=False,
            )
            self._pool.open(wait=True, timeout=15)
        except Exception as exc:  # psycopg.Error, the pool's timeout, a malformed URI
            raise self._error(f"cannot connect ({_first_line(exc)})") from exc
        try:
            self._create_or_check()
        except BaseException:
            self._pool.close()
            raise

    def _error(self, problem: str) -> EventLogError:
        return EventLogError(f"event log {self.path}: {problem}; not started")

    def _create_or_check(self) -> None:
        with self._pool.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (pglog.SCHEMA_LOCK,))
            columns = pglog.table_columns(conn)
            if not columns:
                conn.execute(pglog.SCHEMA)
            elif columns != pglog.TABLE_COLUMNS:
                raise self._error(
                    f"table 'events' has columns {list(columns)}, expected "
                    f"{list(pglog.TABLE_COLUMNS)}: not a recfb event log (point the URI at "
                    "another database or schema)"
                )

    def append(self, rows: Sequence[tuple]) -> int:
        """Store rows (in COLUMNS order, optionally followed by `is_organic`) in one
        statement; returns how many were new. Returns only after the commit."""
        if not rows:
            return 0
        received = now_ms()
        columns: list[list[Any]] = [[] for _ in range(9)]
        for row in rows:
            for i in range(7):
                columns[i].append(row[i])
            columns[7].append(received)
            flag = row[7] if len(row) > 7 else None
            columns[8].append(None if flag is None else int(flag))
        with self._pool.connection() as conn:
            return conn.execute(_INSERT, columns).rowcount

    def user_events(self, user_id: str, limit: int) -> list[LoggedEvent]:
        """A user's most recent events, oldest first (equal times: in arrival order)."""
        with self._pool.connection() as conn:
            rows = conn.execute(
                "SELECT item_id, event, ts, value, order_id FROM events "
                "WHERE user_id = %s ORDER BY ts DESC, seq DESC LIMIT %s",
                (user_id, limit),
            ).fetchall()
        return [LoggedEvent(*r) for r in reversed(rows)]

    def events_since(self, names: Sequence[str], since_ms: int) -> list[tuple]:
        """``(user_id, item_id, event, ts, order_id)`` of the named events at or after since_ms."""
        with self._pool.connection() as conn:
            return [
                tuple(r)
                for r in conn.execute(
                    "SELECT user_id, item_id, event, ts, order_id FROM events "
                    "WHERE ts >= %s AND event = ANY(%s) ORDER BY ts",
                    (since_ms, list(names)),
                ).fetchall()
            ]

    def newest_ts(self) -> int | None:
        """The largest event time in the log (epoch ms), None when empty."""
        with self._pool.connection() as conn:
            return conn.execute("SELECT max(ts) FROM events").fetchone()[0]

    def count(self) -> int:
        with self._pool.connection() as conn:
            return conn.execute("SELECT count(*) FROM events").fetchone()[0]

    def event_ids(self) -> Iterable[str]:
        with self._pool.connection() as conn:
            return [r[0] for r in conn.execute("SELECT event_id FROM events").fetchall()]

    def close(self) -> None:
        self._pool.close()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__

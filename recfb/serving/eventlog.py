"""The durable online event log: SQLite in WAL mode, written before the API acknowledges.

One table, `events`, in the ETL's canonical schema (`event_id, user_id, item_id, event, ts,
value, order_id`) plus `received_at`; `ts` and `received_at` are epoch milliseconds (UTC).
`event_id` is the primary key, so a retried batch is stored once. With `synchronous=FULL`
(default) a commit is on disk before the 2xx: nothing acknowledged is lost to a crash or a
power cut; `NORMAL` survives a process crash (kill -9) but not a power cut.

The log is an input of the next ETL run: `recfb etl --set input.paths=['events.db']` reads
its `events` table like any other canonical file.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    event_id    TEXT PRIMARY KEY,
    user_id     TEXT NOT NULL,
    item_id     TEXT NOT NULL,
    event       TEXT NOT NULL,
    ts          INTEGER NOT NULL,
    value       REAL,
    order_id    TEXT,
    received_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS events_user_ts ON events (user_id, ts);
CREATE INDEX IF NOT EXISTS events_item ON events (item_id);
"""
COLUMNS = ("event_id", "user_id", "item_id", "event", "ts", "value", "order_id")


@dataclass(frozen=True)
class LoggedEvent:
    item_id: str
    event: str
    ts: int  # epoch ms
    value: float | None = None  # dwell seconds, price...: the fold drops dwell noise by it
    order_id: str | None = None  # links a refund to its purchase, as in the ETL


class EventLog:
    """Append-only, idempotent event store; safe to share between the server's threads."""

    def __init__(self, path: str | Path, synchronous: str = "FULL") -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._synchronous = synchronous
        self._write_lock = threading.Lock()
        self._local = threading.local()
        self._writer = self._connect()
        self._writer.executescript(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self._synchronous}")
        conn.execute("PRAGMA busy_timeout=5000")
        return conn

    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
        return conn

    def append(self, rows: Sequence[tuple]) -> int:
        """Store rows (in COLUMNS order) in one transaction; returns how many were new.

        Returns only after the commit, so the caller may acknowledge."""
        now = int(time.time() * 1000)
        with self._write_lock:
            before = self._writer.total_changes
            self._writer.execute("BEGIN IMMEDIATE")
            try:
                self._writer.executemany(
                    "INSERT OR IGNORE INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    [(*row, now) for row in rows],
                )
                self._writer.execute("COMMIT")
            except BaseException:
                self._writer.execute("ROLLBACK")
                raise
            return self._writer.total_changes - before

    def user_events(self, user_id: str, limit: int) -> list[LoggedEvent]:
        """A user's most recent events, oldest first (equal times: in arrival order)."""
        rows = (
            self._reader()
            .execute(
                "SELECT item_id, event, ts, value, order_id FROM events "
                "WHERE user_id = ? ORDER BY ts DESC, rowid DESC LIMIT ?",
                (user_id, limit),
            )
            .fetchall()
        )
        return [LoggedEvent(*r) for r in reversed(rows)]

    def events_since(self, names: Sequence[str], since_ms: int) -> list[tuple]:
        """``(user_id, item_id, event, ts, order_id)`` of the named events at or after since_ms."""
        marks = ",".join("?" * len(names))
        return (
            self._reader()
            .execute(
                "SELECT user_id, item_id, event, ts, order_id FROM events "
                f"WHERE ts >= ? AND event IN ({marks}) ORDER BY ts",
                (since_ms, *names),
            )
            .fetchall()
        )

    def newest_ts(self) -> int | None:
        """The largest event time in the log (epoch ms), None when empty."""
        return self._reader().execute("SELECT max(ts) FROM events").fetchone()[0]

    def count(self) -> int:
        return self._reader().execute("SELECT count(*) FROM events").fetchone()[0]

    def event_ids(self) -> Iterable[str]:
        return (r[0] for r in self._reader().execute("SELECT event_id FROM events"))

    def close(self) -> None:
        self._writer.close()

"""The durable online event log: SQLite in WAL mode, written before the API acknowledges.

One table, `events`, in the ETL's canonical schema (`event_id, user_id, item_id, event, ts,
value, order_id`) plus `received_at` and `is_organic` (the logged exposure flag: 1 organic,
0 shown by a recommender, NULL unknown; a log written before it gets the column on open);
`ts` and `received_at` are epoch milliseconds (UTC).
`event_id` is the primary key, so a retried batch is stored once. With `synchronous=FULL`
(default) a commit is on disk before the 2xx: nothing acknowledged is lost to a crash or a
power cut; `NORMAL` survives a process crash (kill -9) but not a power cut.

The log is an input of the next ETL run: `recfb etl --set input.paths=['events.db']` reads
its `events` table like any other canonical file.

The log checks itself when it opens, and refuses to start (`EventLogError`, naming the file)
rather than silently begin a fresh log: the file must be a SQLite database (header), pass
`PRAGMA quick_check`, and hold the `events` table with the expected columns; and the marker
`<log>.state` beside it (JSON: the number of events and the largest rowid this log held,
rewritten atomically every `MARKER_EVERY` commits or `MARKER_SECONDS`, and on close) must not
say it held more than it does now: a log that held events is never suddenly empty, shorter,
or missing. After deliberately replacing or truncating a log, delete its `.state` marker too.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from recfb.errors import RecfbError

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    event_id    TEXT PRIMARY KEY,
    user_id     TEXT NOT NULL,
    item_id     TEXT NOT NULL,
    event       TEXT NOT NULL,
    ts          INTEGER NOT NULL,
    value       REAL,
    order_id    TEXT,
    received_at INTEGER NOT NULL,
    is_organic  INTEGER
);
CREATE INDEX IF NOT EXISTS events_user_ts ON events (user_id, ts);
CREATE INDEX IF NOT EXISTS events_item ON events (item_id);
"""
COLUMNS = ("event_id", "user_id", "item_id", "event", "ts", "value", "order_id")
TABLE_COLUMNS = (*COLUMNS, "received_at", "is_organic")
OLD_COLUMNS = (*COLUMNS, "received_at")  # logs written before is_organic: migrated on open
SQLITE_HEADER = b"SQLite format 3\x00"
MARKER_EVERY, MARKER_SECONDS = 64, 5.0  # marker rewritten this often (and on close)


class EventLogError(RecfbError):
    """The event log cannot be opened as it is: corrupt, foreign, or shorter than it was."""


def now_ms() -> int:
    """The current time in epoch milliseconds: the logs' `received_at`."""
    return int(time.time() * 1000)


def marker_path(path: Path) -> Path:
    return path.with_name(path.name + ".state")


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
        self.marker = marker_path(self.path)
        held = self._read_marker()
        existed = self._check_file(held)
        try:
            if existed:  # read-only first: a foreign or broken file is left exactly as it was
                uri = f"{self.path.resolve().as_uri()}?mode=ro"
                check = sqlite3.connect(uri, uri=True, check_same_thread=False)
                try:
                    self._check_contents(check, held)
                finally:
                    check.close()
            self._writer = self._connect()
            columns = [r[1] for r in self._writer.execute("PRAGMA table_info(events)")]
            if columns and "is_organic" not in columns:  # an older log: add the column
                self._writer.execute("ALTER TABLE events ADD COLUMN is_organic INTEGER")
            self._writer.executescript(SCHEMA)  # the indexes, where an older log lacks one
            self._count = self._writer.execute("SELECT count(*) FROM events").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            raise self._error(f"cannot be read as a SQLite database ({exc})") from exc
        self._write_marker()

    def _error(self, problem: str) -> EventLogError:
        return EventLogError(
            f"event log {self.path}: {problem}; not started (the file was not modified). "
            f"Restore it from a backup, or move it and {self.marker.name} aside for a new log"
        )

    def _read_marker(self) -> dict:
        if not self.marker.exists():
            return {"count": 0, "max_rowid": 0}
        try:
            data = json.loads(self.marker.read_text())
            return {"count": int(data["count"]), "max_rowid": int(data["max_rowid"])}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise EventLogError(
                f"event log {self.path}: its marker {self.marker} is unreadable ({exc}); "
                "not started. Delete the marker if the log is known to be complete"
            ) from exc

    def _check_file(self, held: dict) -> bool:
        """Checks before SQLite touches the file; True when a log file exists."""
        if not self.path.exists():
            if held["count"]:
                raise self._error(
                    f"is missing, but {self.marker.name} says it held {held['count']:,} events"
                )
            return False
        if not self.path.is_file():
            raise self._error("is not a regular file")
        size = self.path.stat().st_size
        if size == 0:
            held_text = f" ({self.marker.name} says it held {held['count']:,} events)"
            raise self._error(
                f"is empty (0 bytes){held_text if held['count'] else ''}: "
                "not a log recfb wrote (truncated or zeroed?)"
            )
        with self.path.open("rb") as f:
            header = f.read(len(SQLITE_HEADER))
        if header != SQLITE_HEADER:
            raise self._error(f"is not a SQLite database ({size:,} bytes, no SQLite header)")
        return True

    def _check_contents(self, db: sqlite3.Connection, held: dict) -> None:
        """quick_check, the schema, and the marker's counts against the file."""
        problems = [r[0] for r in db.execute("PRAGMA quick_check").fetchall()]
        if problems != ["ok"]:
            raise self._error(f"fails SQLite's quick_check: {'; '.join(problems[:3])}")
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        if "events" not in tables:
            raise self._error(
                f"has no table 'events' (tables: {tables or 'none'}): not a recfb event log"
            )
        columns = tuple(r[1] for r in db.execute("PRAGMA table_info(events)"))
        if columns not in (TABLE_COLUMNS, OLD_COLUMNS):
            raise self._error(
                f"table 'events' has columns {list(columns)}, expected "
                f"{list(TABLE_COLUMNS)}: not a recfb event log"
            )
        count, max_rowid = db.execute(
            "SELECT count(*), coalesce(max(rowid), 0) FROM events"
        ).fetchone()
        if count < held["count"] or max_rowid < held["max_rowid"]:
            raise self._error(
                f"holds {count:,} events (last rowid {max_rowid:,}), but {self.marker.name} "
                f"says it held {held['count']:,} (last rowid {held['max_rowid']:,}): events "
                "were lost"
            )

    def _write_marker(self) -> None:
        """Record what the log holds now (atomically, fsynced): a lagging marker is safe, it
        only ever says less than the file holds."""
        max_rowid = self._writer.execute("SELECT coalesce(max(rowid), 0) FROM events").fetchone()
        data = {"count": self._count, "max_rowid": max_rowid[0], "updated_at": int(time.time())}
        tmp = self.marker.with_name(f".{self.marker.name}.{os.getpid()}.tmp")
        with tmp.open("w") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.marker)
        self._commits, self._marked_at = 0, time.monotonic()

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
        """Store rows (in COLUMNS order, optionally followed by `is_organic`: True for a
        view the user found alone, False for one a recommender showed, None unknown) in one
        transaction; returns how many were new.

        Returns only after the commit, so the caller may acknowledge."""
        now = now_ms()
        with self._write_lock:
            before = self._writer.total_changes
            self._writer.execute("BEGIN IMMEDIATE")
            try:
                self._writer.executemany(
                    f"INSERT OR IGNORE INTO events ({', '.join(TABLE_COLUMNS)}) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [(*row[:7], now, row[7] if len(row) > 7 else None) for row in rows],
                )
                self._writer.execute("COMMIT")
            except BaseException:
                self._writer.execute("ROLLBACK")
                raise
            new = self._writer.total_changes - before
            self._count += new
            self._commits += 1
            due = time.monotonic() - self._marked_at > MARKER_SECONDS
            if new and (self._commits >= MARKER_EVERY or due):
                self._write_marker()
            return new

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
        with self._write_lock:
            self._write_marker()
            self._writer.close()

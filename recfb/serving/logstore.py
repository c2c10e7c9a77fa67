"""Which store the service's event log lives in, from its location: the embedded SQLite
file (`recfb.serving.eventlog`) or a PostgreSQL server shared by replicas
(`recfb.serving.eventlog_pg`, the `postgres` extra). Apart from both, which share one
interface and its errors."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from recfb import pglog
from recfb.serving.eventlog import EventLog

if TYPE_CHECKING:
    from recfb.serving.eventlog_pg import PgEventLog


def open_event_log(location: str | Path, synchronous: str = "FULL") -> EventLog | PgEventLog:
    """The event log at `location`: a PostgreSQL URI (`postgresql://...`, shared by replicas;
    the `postgres` extra) or a SQLite file (the embedded default). `synchronous` is SQLite's
    setting; PostgreSQL always commits synchronously."""
    if pglog.is_pg_uri(location):
        from recfb.serving.eventlog_pg import PgEventLog

        return PgEventLog(str(location))
    return EventLog(location, synchronous)

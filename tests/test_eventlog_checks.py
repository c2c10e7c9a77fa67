"""The event log checks itself at start: a zeroed, truncated, foreign or non-SQLite
events.db stops `recfb serve` with exit 2 and one line naming the file, never a fresh log;
and kill -9 during ingestion, three times over, loses nothing and trips no check."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from recfb.serving.eventlog import EventLog, EventLogError

from test_serving import KEY, ROOT, Server, event, free_port, ingest_until

N_EVENTS = 5_000


def filled_log(path: Path) -> bytes:
    """A closed log of N_EVENTS events (with its marker); returns the file's bytes."""
    log = EventLog(path)
    for b in range(N_EVENTS // 100):
        log.append(
            [
                (f"e{b}-{i}", f"u{i}", "item", "view", 1_700_000_000_000, None, None)
                for i in range(100)
            ]
        )
    log.close()
    return path.read_bytes()


def break_log(path: Path, kind: str) -> None:
    data = filled_log(path)
    if kind == "zeroed":  # 0 bytes: what a failed copy or `> events.db` leaves
        path.write_bytes(b"")
    elif kind == "zero-filled":
        path.write_bytes(b"\0" * len(data))
    elif kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "foreign":
        path.unlink()
        with sqlite3.connect(path) as db:
            db.execute("CREATE TABLE visits (id INTEGER PRIMARY KEY, url TEXT)")
            db.executemany("INSERT INTO visits (url) VALUES (?)", [("a",), ("b",)])
        db.close()
    elif kind == "not-sqlite":
        path.write_text("user_id,item_id\nu1,i1\n")
    elif kind == "shorter":  # a valid log that lost its newest rows
        with sqlite3.connect(path) as db:
            db.execute("DELETE FROM events WHERE rowid > ?", (N_EVENTS // 2,))
        db.close()


KINDS = ["zeroed", "zero-filled", "truncated", "foreign", "not-sqlite", "shorter"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_broken_log_is_refused_naming_the_file(tmp_path, kind):
    path = tmp_path / "events.db"
    break_log(path, kind)
    before = path.read_bytes()
    with pytest.raises(EventLogError, match=str(path)):
        EventLog(path)
    assert path.read_bytes() == before  # nothing was repaired or recreated over it


def test_a_missing_log_that_held_events_is_refused(tmp_path):
    path = tmp_path / "events.db"
    filled_log(path)
    path.unlink()
    with pytest.raises(EventLogError, match=f"{N_EVENTS:,} events"):
        EventLog(path)


@pytest.mark.parametrize("kind", ["zeroed", "truncated", "foreign", "not-sqlite"])
def test_recfb_serve_exits_2_with_one_line_naming_the_log(tmp_path, kind):
    path = tmp_path / "events.db"
    break_log(path, kind)
    env = os.environ | {
        "RECFB_API_KEY": KEY,
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'no-registry.db'}",
    }
    cmd = [sys.executable, "-m", "recfb.cli", "serve", "--set", f"event_log={path}"]
    cmd += ["--set", f"models_dir={tmp_path / 'models'}", "--set", f"port={free_port()}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: event log") and str(path) in lines[0]


def test_kill_9_during_ingestion_three_times_loses_nothing(served_shop, tmp_path):
    """Each round: ingest, kill -9 mid-stream, restart on the same log (its checks pass),
    and every acknowledged event of every round is stored."""
    log_path = tmp_path / "events.db"
    acknowledged: list[str] = []
    for round_ in range(3):
        srv = Server(served_shop["bundle"], log_path)  # raises if the log's checks fail
        stop = threading.Event()

        def batch_of(n: int, tag: int = round_) -> list[dict]:
            return [event(f"r{tag}-{n}", "x", "view") for _ in range(50)]

        writer = threading.Thread(target=ingest_until, args=(srv.url, stop, acknowledged, batch_of))
        writer.start()
        time.sleep(2.0)
        srv.proc.send_signal(signal.SIGKILL)
        srv.proc.wait()
        stop.set()
        writer.join()
        with sqlite3.connect(log_path) as db:
            stored = {r[0] for r in db.execute("SELECT event_id FROM events")}
        db.close()
        missing = set(acknowledged) - stored
        assert not missing, f"round {round_}: {len(missing)} acknowledged events lost"
        marker = json.loads(log_path.with_name("events.db.state").read_text())
        assert 0 < marker["count"] <= len(stored)  # the marker lags, never leads
    assert len(acknowledged) >= 300
    final = Server(served_shop["bundle"], log_path)
    final.stop()

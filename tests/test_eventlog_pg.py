"""The event log on a real PostgreSQL server (tests/pgserver.py): the same contract as the
SQLite log, replicas that share it, and the ETL and the pipeline reading it."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import polars as pl
import pytest

from recfb.serving.eventlog import EventLog, EventLogError
from recfb.serving.logstore import open_event_log

from conftest import CONF, ROOT, run
from test_serving import Server, event, ingest_until

T0 = 1_767_225_600_000  # 2026-01-01, epoch ms


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "sqlite":
        log = EventLog(tmp_path / "events.db")
    else:
        log = open_event_log(request.getfixturevalue("pg_server").new_database())
    yield log
    log.close()


def test_both_stores_keep_the_same_contract(store):
    assert store.count() == 0 and store.newest_ts() is None
    rows = [
        ("e1", "u1", "i1", "view", T0 + 3_000, None, None),
        ("e2", "u1", "i2", "click", T0 + 1_000, 4.5, None),
        ("e3", "u1", "i3", "view", T0 + 3_000, None, None),  # same time as e1: arrives later
        ("e4", "u2", "i1", "purchase", T0 + 2_000, 9.5, "o1", False),
        ("e2", "u1", "i2", "click", T0 + 1_000, 4.5, None),  # repeated in the batch
    ]
    assert store.append(rows) == 4
    assert store.append(rows[:2]) == 0  # a retried batch is stored once
    assert store.append([("e5", "u1", "i4", "view", T0 + 500, None, None)]) == 1
    assert store.count() == 5 and store.newest_ts() == T0 + 3_000
    assert set(store.event_ids()) == {"e1", "e2", "e3", "e4", "e5"}
    # oldest first; equal times in arrival order; the limit keeps the most recent
    assert [e.item_id for e in store.user_events("u1", 10)] == ["i4", "i2", "i1", "i3"]
    assert [e.item_id for e in store.user_events("u1", 2)] == ["i1", "i3"]
    click = store.user_events("u1", 10)[1]
    assert (click.event, click.ts, click.value, click.order_id) == ("click", T0 + 1_000, 4.5, None)
    assert store.user_events("nobody", 5) == []
    since = store.events_since(["purchase", "click"], T0 + 1_000)
    assert [tuple(r) for r in since] == [
        ("u1", "i2", "click", T0 + 1_000, None),
        ("u2", "i1", "purchase", T0 + 2_000, "o1"),
    ]
    assert store.events_since(["purchase"], T0 + 2_001) == []


def test_a_pg_log_refuses_a_foreign_events_table(pg_server):
    import psycopg

    uri = pg_server.new_database()
    with psycopg.connect(uri, autocommit=True) as conn:
        conn.execute("CREATE TABLE events (id integer, payload text)")
    with pytest.raises(EventLogError, match="not a recfb event log") as err:
        open_event_log(uri)
    assert uri.rsplit("/", 1)[1] in str(err.value)
    with psycopg.connect(uri) as conn:  # left exactly as it was
        columns = conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'events' "
            "ORDER BY ordinal_position"
        ).fetchall()
    assert [c[0] for c in columns] == ["id", "payload"]


def test_an_unreachable_pg_log_is_named_without_its_password(pg_server):
    uri = f"postgresql://postgres:hunter2@127.0.0.1:{pg_server.port}/no_such_db"
    with pytest.raises(EventLogError, match="cannot connect") as err:
        open_event_log(uri)
    assert "no_such_db" in str(err.value) and "hunter2" not in str(err.value)


def _log_rows(n: int, where: Path) -> list[tuple]:
    """Simulated-shop events as log rows, with a few the ETL must quarantine or drop."""
    from recfb.simulate import SimConfig, simulate

    simulate(SimConfig(seed=3, n_users=300, n_items=120, n_events=n), where)
    frame = pl.read_parquet(where / "events")
    rows = [
        (r["event_id"], r["user_id"], r["item_id"], r["event"], r["ts"], r["value"], r["order_id"])
        for r in frame.with_columns(
            pl.col("event_id", "user_id", "item_id").cast(pl.String), pl.col("ts").dt.epoch("ms")
        ).iter_rows(named=True)
    ]
    rows[5] = (*rows[5][:3], "teleport", *rows[5][4:])  # an unknown signal: quarantined
    rows[9] = (*rows[9][:5], rows[9][5], "")  # an empty order id stays a text, not null
    # the exposure flag, told for some events: organic, shown by a recommender
    return [(*r, i % 3 == 0) if i % 7 == 0 else r for i, r in enumerate(rows)]


def test_the_etl_reads_a_pg_log_exactly_as_the_sqlite_log(pg_server, tmp_path):
    rows = _log_rows(6_000, tmp_path / "sim")
    uri = pg_server.new_database().replace("postgres@", "postgres:s3cret@")
    sqlite_log, pg_log = EventLog(tmp_path / "events.db"), open_event_log(uri)
    for start in range(0, len(rows), 500):  # the same batches: the same arrival order
        assert sqlite_log.append(rows[start : start + 500]) == pg_log.append(
            rows[start : start + 500]
        )
    sqlite_log.close()
    pg_log.close()

    signals = CONF / "signals" / "simulator.yaml"
    from_sqlite = run(tmp_path / "a", [tmp_path / "events.db"], signals)
    from_pg = run(tmp_path / "b", [uri], signals)
    assert from_pg["reconciliation"]["rows_in"] == len(rows)
    assert from_pg["reconciliation"] | {"balanced": 0} == from_sqlite["reconciliation"] | {
        "balanced": 0
    }
    assert from_pg["reconciliation"]["balanced"]
    for name in ("train", "valid", "test", "events", "users", "items", "quarantine", "filtered"):
        a = pl.read_parquet(tmp_path / "a" / "out" / f"{name}.parquet")
        b = pl.read_parquet(tmp_path / "b" / "out" / f"{name}.parquet")
        if "source_file" in a.columns:  # provenance: the file, or the URI
            assert set(b["source_file"].cast(pl.String)) <= {uri.replace(":s3cret", ":***")}
            a, b = a.drop("source_file"), b.drop("source_file")
        assert a.equals(b), name
    quarantined = pl.read_parquet(tmp_path / "b" / "out" / "quarantine.parquet")
    assert quarantined["event_id"].to_list() == [rows[5][0]]
    events = pl.read_parquet(tmp_path / "b" / "out" / "events.parquet")
    assert events.filter(pl.col("event_id") == rows[9][0])["order_id"].to_list() == [""]
    # the password is in no output
    for path in (tmp_path / "b" / "out").rglob("*"):
        if path.is_file():
            assert b"s3cret" not in path.read_bytes(), path


def _replica_spec(work: Path, inputs: list[str]):
    """The hourly pipeline's ingestion (its ETL stage, as pipelines/hourly.yaml sets it up)
    with the inputs replaced."""
    from recfb.pipeline.definition import load_pipeline

    spec = load_pipeline(ROOT / "pipelines" / "hourly.yaml")
    etl = spec.stages["etl"].model_copy(
        update={
            "config": str(ROOT / spec.stages["etl"].config),
            "set": [f"input.paths={inputs!r}", f"signals={CONF / 'signals' / 'simulator.yaml'}"],
        }
    )
    return spec.model_copy(update={"stages": {"etl": etl}, "work_dir": str(work)})


def test_two_replicas_share_one_pg_log_and_lose_no_acknowledged_event(
    pg_server, served_shop, tmp_path, monkeypatch
):
    uri = pg_server.new_database()
    replicas = [Server(served_shop["bundle"], uri, output=tmp_path) for _ in range(2)]
    acknowledged: list[str] = []
    stop = threading.Event()

    def batches(tag: str) -> Callable[[int], list[dict]]:
        return lambda n: [event(f"{tag}{n % 40}", f"i{n % 25}", "view") for _ in range(20)]

    writers = [
        threading.Thread(target=ingest_until, args=(srv.url, stop, acknowledged, batches(tag)))
        for srv, tag in zip(replicas, ("a", "b"), strict=True)
    ]
    try:
        for w in writers:
            w.start()
        time.sleep(2.0)
        replicas[0].proc.send_signal(signal.SIGKILL)  # one replica dies during ingestion
        replicas[0].proc.wait()
        time.sleep(1.0)  # the other goes on
        stop.set()
        for w in writers:
            w.join()
        # one replica reads what the other wrote: a user's events fold into its list
        with httpx.Client(base_url=replicas[1].url, timeout=10) as c:
            r = c.get("/v1/users/a0/recommendations", params={"k": 5})
            assert r.status_code == 200
    finally:
        stop.set()
        for srv in replicas:
            srv.stop()

    import psycopg

    with psycopg.connect(uri) as conn:
        stored = {r[0] for r in conn.execute("SELECT event_id FROM events").fetchall()}
        tags = {r[0] for r in conn.execute("SELECT DISTINCT left(user_id, 1) FROM events")}
    assert len(acknowledged) >= 200 and tags == {"a", "b"}
    assert set(acknowledged) <= stored, len(set(acknowledged) - stored)

    # the hourly pipeline's ETL ingests the log beside the bulk events
    from recfb.pipeline import run_pipeline

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns.db'}")
    monkeypatch.chdir(tmp_path)
    bulk = served_shop["etl"].parent / "sim" / "events"
    bulk_rows = pl.scan_parquet(bulk).select(pl.len()).collect().item()
    spec = _replica_spec(tmp_path / "pipelines", [str(bulk), uri])
    first = run_pipeline(spec)
    assert first.stages["etl"].status == "ran"
    assert first.stages["etl"].outputs["rows_in"] == bulk_rows + len(stored)
    # unchanged log: skipped; one more event: the ETL runs again and counts it
    assert run_pipeline(spec).stages["etl"].status == "skipped"
    log = open_event_log(uri)
    assert log.append([("late-1", "a1", "i1", "view", T0, None, None)]) == 1
    log.close()
    again = run_pipeline(spec)
    assert again.stages["etl"].status == "ran"
    assert again.stages["etl"].outputs["rows_in"] == bulk_rows + len(stored) + 1

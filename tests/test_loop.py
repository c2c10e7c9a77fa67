"""The closed loop (recfb.loop): deterministic by seed, every simulated event reaches the
service's event log as it happened, and the harness tells a good policy from a bad one."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recfb.loop import LoopConfig, run_loop
from recfb.serving.eventlog import EventLog

ROOT = Path(__file__).resolve().parents[1]


def tiny(**keys) -> LoopConfig:
    """A world small enough for seconds per loop; paths from the repository root."""
    data = {
        "world": {"n_users": 300, "n_items": 200},
        "days": 2,
        "warmup_days": 2,
        "train_config": str(ROOT / "conf/models/mf.yaml"),
        "rank_config": str(ROOT / "conf/rank.yaml"),
        "signals": str(ROOT / "conf/signals/simulator.yaml"),
        "train_overrides": ["trainer.max_epochs=1"],
        "policies": {
            "random": {"kind": "random"},
            "oracle": {"kind": "oracle"},
            "popularity": {"kind": "library", "family": "popularity"},
            "mf": {"family": "mf"},
            "broken": {"family": "mf", "train": ["debias.no_such_key=1"]},
        },
    }
    return LoopConfig.model_validate(data | keys)


def posted_as_simulated(result) -> None:
    """The log holds exactly the events the simulated users did (same ids, fields, flag)."""
    log = result.posted.select(
        "event_id",
        "user_id",
        "item_id",
        "event",
        pl.col("ts").alias("ts_ms"),
        "value",
        "order_id",
        pl.col("is_organic").cast(pl.Boolean),
    ).sort("event_id")
    did = result.events.sort("event_id")
    assert did.height > 1000
    assert log.height == did.height
    assert log.equals(did)
    assert did["is_organic"].any() and not did["is_organic"].all()
    assert {"view", "click", "purchase"} <= set(did["event"].to_list())


def test_deterministic_by_seed(tmp_path):
    cfg = tiny()
    a = run_loop(cfg, "popularity", 3, tmp_path / "a")
    b = run_loop(cfg, "popularity", 3, tmp_path / "b")
    c = run_loop(cfg, "popularity", 4, tmp_path / "c")
    assert a.daily.equals(b.daily)
    assert a.events.equals(b.events)
    assert not a.events.equals(c.events)
    r1 = run_loop(cfg, "random", 3, tmp_path / "r1")
    r2 = run_loop(cfg, "random", 3, tmp_path / "r2")
    assert r1.daily.equals(r2.daily) and r1.events.equals(r2.events)


def test_posted_events_equal_what_users_did(tmp_path):
    result = run_loop(tiny(), "popularity", 1, tmp_path / "p")
    posted_as_simulated(result)
    # every impression of the policy is a non-organic view in the log
    views = result.events.filter((pl.col("event") == "view") & ~pl.col("is_organic"))
    assert views.height == pytest.approx(result.daily["impressions"].sum())


def test_oracle_beats_random_by_a_wide_margin(tmp_path):
    cfg = tiny()
    oracle = run_loop(cfg, "oracle", 1, tmp_path / "o").summary
    random = run_loop(cfg, "random", 1, tmp_path / "r").summary
    assert oracle["mean_net_purchases_per_1k"] > 5 * max(random["mean_net_purchases_per_1k"], 1)
    assert oracle["mean_true_ndcg"] > random["mean_true_ndcg"] + 0.3
    # and random spreads exposure, the oracle concentrates it on what each user likes best
    assert random["mean_coverage"] > oracle["mean_coverage"]


def test_invalid_policy_is_skipped_with_its_reason(tmp_path):
    result = run_loop(tiny(), "broken", 1, tmp_path / "b")
    assert result.skipped and "no_such_key" in result.skipped
    assert result.daily.is_empty()


def test_short_loop_through_the_real_http_server(tmp_path):
    """MF served by uvicorn: lists from GET recommendations, events by POST /v1/events, the
    nightly bundle swapped in by POST /v1/admin/bundle."""
    cfg = tiny(days=1, warmup_days=1, world={"n_users": 200, "n_items": 150})
    result = run_loop(cfg, "mf", 2, tmp_path / "h", http=True)
    assert result.skipped is None
    assert result.daily["impressions"].sum() > 0
    posted_as_simulated(result)


def test_event_log_of_an_older_version_gains_is_organic(tmp_path):
    """A log written before the exposure flag opens, keeps its rows and stores the flag."""
    path = tmp_path / "events.db"
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE events (event_id TEXT PRIMARY KEY, user_id TEXT NOT NULL, item_id TEXT "
            "NOT NULL, event TEXT NOT NULL, ts INTEGER NOT NULL, value REAL, order_id TEXT, "
            "received_at INTEGER NOT NULL)"
        )
        db.execute("INSERT INTO events VALUES ('e0', 'u', 'i', 'view', 1, NULL, NULL, 1)")
    log = EventLog(path)
    log.append([("e1", "u", "i", "view", 2, None, None, True)])
    log.append([("e2", "u", "i", "click", 3, 5.0, None)])
    log.close()
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT event_id, is_organic FROM events ORDER BY rowid").fetchall()
    assert rows == [("e0", None), ("e1", 1), ("e2", None)]


def test_policy_table_is_the_mean_over_seeds_of_each_seeds_mean_over_days():
    from recfb.loop.report import table_lines

    rows = []
    for seed, values in ((1, [1.0, 3.0]), (2, [5.0, 7.0])):  # seed means 2 and 6
        for day, v in enumerate(values):
            rows.append({"policy": "p", "seed": seed, "day": day, "net_purchases_per_1k": v})
    rows.append({"policy": "q", "seed": 1, "day": 0, "net_purchases_per_1k": 9.0})
    lines = table_lines(pl.DataFrame(rows), {"p": 12.0})
    p_row = next(line for line in lines if line.startswith("| p |"))
    q_row = next(line for line in lines if line.startswith("| q |"))
    sd = float(np.std([2.0, 6.0], ddof=1))
    assert p_row.split(" | ")[1:3] == ["2", f"4.00 ± {sd:.2f}"] and p_row.endswith("| 12 |")
    assert q_row.split(" | ")[1:3] == ["1", "9.00"] and q_row.endswith("| – |")


def test_paired_table_is_the_per_seed_difference_against_the_reference():
    from recfb.loop.report import paired_lines

    rows = []
    # seed 1: ref 1, p 4 (+3); seed 2: ref 10, p 9 (-1): the paired mean is +1, higher on 1/2
    for seed, ref, p in ((1, [1.0, 1.0], [3.0, 5.0]), (2, [10.0, 10.0], [9.0, 9.0])):
        for day in range(2):
            rows.append(
                {"policy": "ref", "seed": seed, "day": day, "net_purchases_per_1k": ref[day]}
            )
            rows.append({"policy": "p", "seed": seed, "day": day, "net_purchases_per_1k": p[day]})
    lines = paired_lines(pl.DataFrame(rows), "ref")
    p_row = next(line for line in lines if line.startswith("| p |"))
    sd = float(np.std([3.0, -1.0], ddof=1))
    assert p_row == f"| p | 2 | 1.00 ± {sd:.2f} (1/2) |"
    assert not any(line.startswith("| ref |") for line in lines)
    assert paired_lines(pl.DataFrame(rows), "absent") == []

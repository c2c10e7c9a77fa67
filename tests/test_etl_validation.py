"""Every kind of bad input gets its quarantine reason or a clear error; counts reconcile."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from recfb.errors import ConfigError, InputError
from recfb.etl import load_signal_map

from conftest import CONF, read_out, run

SIGNALS = CONF / "signals" / "simulator.yaml"

# (row content, expected outcome) in a CSV with a header; rows are numbered from 1.
ROWS = [
    ("e1,u1,i1,view,2026-01-02T10:00:00,,", None),
    ("e2,u1,i1,click,1767348000,5.0,", None),  # Unix seconds
    ("e3,u1,i1,purchase,1767348060000,19.9,o1", None),  # Unix milliseconds
    ("e4,,i1,view,1767348000,,", "null_user_id"),
    ("e5,u2,,view,1767348000,,", "null_item_id"),
    ("e6,u2,i2,,1767348000,,", "null_event"),
    ("e7,u2,i2,view,,,", "null_ts"),
    ("e8,u2,i2,view,yesterday,,", "bad_ts"),
    ("e9,u2,i2,view,1990-01-01T00:00:00,,", "ts_out_of_range"),
    ("e10,u2,i2,view,2999-01-01T00:00:00,,", "ts_out_of_range"),
    ("e11,u2,i2,teleport,1767348000,,", "unknown_event"),
    ("e12,u2,i2,click,1767348000,abc,", "bad_value"),
    ("e13,u2,i2,click,1767348000,-4,", "bad_value"),
    ("e14,u2,i2,click,1767348000,inf,", "bad_value"),
    ("e1,u1,i1,view,2026-01-02T10:00:00,,", "same_event_id"),  # re-sent event
    (",u1,i1,click,1767348000,5.0,", "same_user_item_event_ts"),  # same as e2, no id
    ("e15,u3,i3,click,1767348000,0.4,", "noise_dwell"),  # dwell under 3 s
    ("e16,u3,i3,refund,2026-01-02T12:00:00+02:00,,o9", None),  # an orphan refund, kept
]


@pytest.fixture
def bad_csv(tmp_path: Path) -> Path:
    path = tmp_path / "events.csv"
    lines = ["event_id,user_id,item_id,event,ts,value,order_id"] + [r for r, _ in ROWS]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_every_bad_row_gets_its_reason_and_counts_reconcile(tmp_path: Path, bad_csv: Path):
    stats = run(tmp_path, [bad_csv], SIGNALS, split={"method": "none"})
    quarantine = read_out(tmp_path, "quarantine")
    got = {row: reason for row, reason in quarantine.select("source_row", "reason").iter_rows()}
    expected = {
        i + 1: outcome
        for i, (_, outcome) in enumerate(ROWS)
        if outcome and outcome not in ("same_event_id", "same_user_item_event_ts", "noise_dwell")
    }
    assert got == expected
    assert set(quarantine["source_file"]) == {str(bad_csv)}
    # the quarantine keeps the text that arrived
    assert quarantine.filter(pl.col("reason") == "bad_ts")["ts"].to_list() == ["yesterday"]
    assert quarantine.filter(pl.col("reason") == "unknown_event")["field"].to_list() == ["event"]

    rec = stats["reconciliation"]
    assert rec["rows_in"] == len(ROWS)
    assert rec["duplicates_removed"] == {"same_event_id": 1, "same_user_item_event_ts": 1}
    assert rec["filtered"] == {"noise_dwell": 1}
    assert rec["rows_used"] == sum(1 for _, o in ROWS if o is None)
    assert rec["balanced"]
    filtered = read_out(tmp_path, "filtered")
    assert filtered["source_row"].to_list() == [17]
    # stats.json on disk is the same as what run() returned
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["reconciliation"] == rec


def test_timestamps_in_seconds_milliseconds_and_iso_agree(tmp_path: Path, bad_csv: Path):
    run(tmp_path, [bad_csv], SIGNALS, split={"method": "none"})
    events = read_out(tmp_path, "events").sort("event_id")
    ts = dict(zip(events["event_id"], events["ts"].dt.epoch("ms"), strict=True))
    assert ts["e1"] == 1767348000000  # 2026-01-02T10:00:00Z
    assert ts["e2"] == 1767348000000
    assert ts["e3"] == 1767348060000
    assert ts["e16"] == 1767348000000  # 12:00 at +02:00 is 10:00 UTC


def test_unknown_events_as_error_name_file_row_and_field(tmp_path: Path, bad_csv: Path):
    strict = tmp_path / "strict.yaml"
    strict.write_text(
        SIGNALS.read_text().replace("unknown_events: quarantine", "unknown_events: error")
    )
    with pytest.raises(InputError) as err:
        run(tmp_path, [bad_csv], strict, split={"method": "none"})
    message = str(err.value)
    assert str(bad_csv) in message and "row 11" in message and "'event'" in message
    assert "teleport" in message
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_missing_required_column_is_a_clear_error(tmp_path: Path):
    path = tmp_path / "no_ts.csv"
    path.write_text("user_id,item_id,event\nu1,i1,view\n")
    with pytest.raises(InputError) as err:
        run(tmp_path, [path], SIGNALS)
    assert str(path) in str(err.value) and "'ts'" in str(err.value)


def test_missing_input_is_a_clear_error(tmp_path: Path):
    with pytest.raises(InputError, match="no such file"):
        run(tmp_path, [tmp_path / "nope" / "*.parquet"], SIGNALS)


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"signals": {"click": {"level": "nope"}}}, "signals.click.level"),
        ({"signals": {"refund": {"cancels": "ghost"}}}, "signals.refund.cancels"),
        ({"signals": {"x": {"level": "view", "negative": True}}}, "exactly one of"),
        ({"unknown_events": "ignore"}, "unknown_events"),
    ],
)
def test_bad_signal_map_names_file_and_field(tmp_path: Path, patch: dict, field: str):
    import yaml

    data = yaml.safe_load(SIGNALS.read_text())
    for key, value in patch.items():
        if isinstance(value, dict):
            data[key] = data[key] | value
        else:
            data[key] = value
    path = tmp_path / "bad_map.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as err:
        load_signal_map(path)
    assert str(path) in str(err.value) and field in str(err.value)


def test_readers_accept_parquet_csv_jsonl_globs_and_directories(tmp_path: Path):
    frame = pl.DataFrame(
        {
            "user_id": [1, 2, 3],
            "item_id": [10, 20, 30],
            "event": ["view", "click", "purchase"],
            "ts": [1767348000, 1767348001, 1767348002],
            "value": [None, 5.0, 9.0],
            "category": ["a", "b", "c"],
        }
    )
    data = tmp_path / "in"
    (data / "nested").mkdir(parents=True)
    frame.slice(0, 1).write_parquet(data / "part1.parquet")
    frame.slice(1, 1).write_csv(data / "nested" / "part2.csv")
    frame.slice(2, 1).write_ndjson(data / "part3.jsonl")
    for spec in ([data], [data / "**" / "*.*"]):
        stats = run(tmp_path, spec, SIGNALS, split={"method": "none"})
        assert stats["reconciliation"]["rows_used"] == 3, spec
        events = read_out(tmp_path, "events")
        assert sorted(events["category"].to_list()) == ["a", "b", "c"]  # features pass through
        users = read_out(tmp_path, "users")
        assert sorted(users["user_id"].to_list()) == ["1", "2", "3"]


def test_column_renames_map_other_schemas(tmp_path: Path):
    path = tmp_path / "other.csv"
    path.write_text("uid,sku,action,when\nu1,i1,view,1767348000\nu1,i1,click,1767348100\n")
    stats = run(
        tmp_path,
        [path],
        SIGNALS,
        input={"columns": {"uid": "user_id", "sku": "item_id", "action": "event", "when": "ts"}},
        split={"method": "none"},
    )
    assert stats["reconciliation"]["rows_used"] == 2


def test_failed_run_leaves_previous_output_untouched(tmp_path: Path, bad_csv: Path):
    run(tmp_path, [bad_csv], SIGNALS, split={"method": "none"})
    before = (tmp_path / "out" / "stats.json").read_text()
    empty = tmp_path / "empty.csv"
    empty.write_text("user_id,item_id,event,ts\n,,,\n")
    with pytest.raises(InputError, match="no usable events"):
        run(tmp_path, [empty], SIGNALS)
    assert (tmp_path / "out" / "stats.json").read_text() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_outlier_users_and_k_core_filters(tmp_path: Path):
    rows = []
    # 30 ordinary users: 4 items each over 10 days; one bot: 2,000 views in one day
    for u in range(30):
        for k in range(4):
            rows.append((f"u{u}", f"i{(u + k) % 12}", "view", 1767225600 + u * 3600 + k * 86400))
    for k in range(2000):
        rows.append(("bot", f"i{k % 12}", "view", 1767225600 + k * 30))
    # a user with a single item, and an item only that user touched: both leave a 2-core
    rows.append(("loner", "rare", "view", 1767225600))
    path = tmp_path / "events.csv"
    path.write_text(
        "user_id,item_id,event,ts\n" + "\n".join(",".join(map(str, r)) for r in rows) + "\n"
    )
    stats = run(
        tmp_path,
        [path],
        SIGNALS,
        split={"method": "none"},
        filters={"outlier_users": True, "min_user_items": 2, "min_item_users": 2},
    )
    filtered = read_out(tmp_path, "filtered")
    assert set(filtered.filter(pl.col("reason") == "outlier_user")["user_id"]) == {"bot"}
    assert filtered.filter(pl.col("reason") == "outlier_user").height == 2000
    assert set(filtered.filter(pl.col("reason") == "kcore")["user_id"]) == {"loner"}
    assert stats["reconciliation"]["filtered"] == {"outlier_user": 2000, "kcore": 1}
    train = read_out(tmp_path, "train")
    assert train.group_by("user_idx").len()["len"].min() >= 2
    assert train.group_by("item_idx").len()["len"].min() >= 2

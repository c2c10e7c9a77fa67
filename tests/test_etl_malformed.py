"""Malformed records are quarantined one by one, with their record number, a reason and a
printable excerpt; the rest of the file goes on, and the reconciliation stays balanced."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import recfb.etl
from recfb.errors import InputError
from recfb.etl import readers

from conftest import CONF, read_out, run

SIGNALS = CONF / "signals" / "simulator.yaml"
HEADER = "event_id,user_id,item_id,event,ts,value"


def _good_json(n: int) -> bytes:
    event = {"event_id": f"e{n}", "user_id": f"u{n}", "item_id": "i1", "event": "view"}
    return json.dumps(event | {"ts": 1767348000 + n}).encode()


def _good_csv(n: int) -> bytes:
    return f"e{n},u{n},i1,view,{1767348000 + n},".encode()


def _write(path: Path, lines: list[bytes], header: bytes | None = None) -> Path:
    path.write_bytes(b"".join(line + b"\n" for line in ([header] if header else []) + lines))
    return path


def _check_one_bad_record(tmp_path: Path, path: Path, row: int, reason: str, raw: str) -> None:
    """Five good events (e1, e2, e4, e5, e6) and one bad record numbered `row`."""
    stats = run(tmp_path, [path], SIGNALS, split={"method": "none"})
    quarantine = read_out(tmp_path, "quarantine")
    assert quarantine.select("source_file", "source_row", "reason", "field", "raw_line").rows() == [
        (str(path), row, reason, None, raw)
    ]
    events = read_out(tmp_path, "events")
    assert sorted(events["event_id"].to_list()) == ["e1", "e2", "e4", "e5", "e6"]
    rec = stats["reconciliation"]
    assert rec["rows_in"] == 6 and rec["rows_used"] == 5
    assert rec["quarantined"] == {reason: 1}
    assert rec["balanced"]
    assert reason in stats["quarantine_expected"]


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (b'{"event_id": "e3", "user_id": "u3", "item_id": ', "bad_json"),
        (b'["e3", "u3", "i1", "view", 1767348003]', "not_json_object"),
        (b"42", "not_json_object"),
    ],
)
def test_one_bad_jsonl_line_is_quarantined_by_number(tmp_path: Path, bad: bytes, reason: str):
    lines = [_good_json(1), _good_json(2), bad, _good_json(4), _good_json(5), _good_json(6)]
    path = _write(tmp_path / "events.jsonl", lines)
    _check_one_bad_record(tmp_path, path, 3, reason, bad.decode())


def test_a_ragged_csv_row_is_quarantined_by_number(tmp_path: Path):
    bad = b"e3,u3,i1,view,1767348003,,surplus"
    lines = [_good_csv(1), _good_csv(2), bad, _good_csv(4), _good_csv(5), _good_csv(6)]
    path = _write(tmp_path / "events.csv", lines, HEADER.encode())
    _check_one_bad_record(tmp_path, path, 3, "ragged_row", bad.decode())


def test_a_latin1_byte_in_a_csv_is_quarantined_by_number(tmp_path: Path):
    bad = "e3,u3,caf\xe9,view,1767348003,".encode("latin-1")
    lines = [_good_csv(1), _good_csv(2), bad, _good_csv(4), _good_csv(5), _good_csv(6)]
    path = _write(tmp_path / "events.csv", lines, HEADER.encode())
    _check_one_bad_record(tmp_path, path, 3, "bad_utf8", "e3,u3,caf\\xe9,view,1767348003,")


def test_record_numbers_count_records_not_lines(tmp_path: Path):
    """A quoted field spanning two lines is one record: the ragged row after it is record 3
    (file line 5), as the good rows around it are numbered."""
    path = tmp_path / "events.csv"
    path.write_bytes(
        b"event_id,user_id,item_id,event,ts,value,note\n"
        b"e1,u1,i1,view,1767348001,,plain\n"
        b'e2,u2,i1,view,1767348002,,"two\nlines"\n'
        b"e3,u3,i1,view,1767348003,,x,surplus\n"
        b"e4,u4,i1,view,1767348004,,plain\n"
    )
    stats = run(tmp_path, [path], SIGNALS, split={"method": "none"})
    quarantine = read_out(tmp_path, "quarantine")
    assert quarantine.select("source_row", "reason").rows() == [(3, "ragged_row")]
    notes = dict(read_out(tmp_path, "events").select("event_id", "note").iter_rows())
    assert notes == {"e1": "plain", "e2": "two\nlines", "e4": "plain"}
    assert stats["reconciliation"]["rows_in"] == 4 and stats["reconciliation"]["balanced"]


def test_in_memory_run_on_paths_quarantines_the_same_way(tmp_path: Path):
    lines = [_good_json(1), _good_json(2), b"{oops", _good_json(4), _good_json(5), _good_json(6)]
    path = _write(tmp_path / "events.jsonl", lines)
    data = recfb.etl.run([path], SIGNALS, split={"method": "none"})
    quarantine = data.quarantine.collect()
    assert quarantine.select("source_row", "reason", "raw_line").rows() == [
        (3, "bad_json", "{oops")
    ]
    assert data.stats["reconciliation"]["rows_in"] == 6
    assert data.stats["reconciliation"]["rows_used"] == 5
    assert data.stats["reconciliation"]["balanced"]


def test_binary_garbage_shows_as_a_bounded_escaped_excerpt_in_the_quarantine(tmp_path: Path):
    garbage = b"\x00\x1b[2J\xff\xfe\x07" + bytes(b for b in range(256) if b != 10) * 8
    lines = [_good_json(1), _good_json(2), garbage, _good_json(4), _good_json(5), _good_json(6)]
    path = _write(tmp_path / "events.jsonl", lines)
    run(tmp_path, [path], SIGNALS, split={"method": "none"})
    quarantine = read_out(tmp_path, "quarantine")
    assert quarantine.select("source_row", "reason").rows() == [(3, "bad_utf8")]
    raw = quarantine["raw_line"][0]
    assert raw.startswith("\\x00\\x1b[2J\\xff\\xfe\\x07")
    assert len(raw) <= 203 and raw.endswith("...")
    assert raw.isprintable()


def test_binary_garbage_in_an_error_is_a_bounded_escaped_excerpt(tmp_path: Path):
    strict = tmp_path / "strict.yaml"
    strict.write_text(
        SIGNALS.read_text().replace("unknown_events: quarantine", "unknown_events: error")
    )
    event = "\x1b[31m\u202e" + "A" * 5000
    path = tmp_path / "events.csv"
    path.write_text(f"{HEADER}\ne1,u1,i1,{event},1767348000,\n")
    with pytest.raises(InputError) as err:
        run(tmp_path, [path], strict, split={"method": "none"})
    message = str(err.value)
    assert "\\x1b[31m\\u202e" in message and "row 1" in message
    assert "\x1b" not in message and "\u202e" not in message
    assert len(message) < 1000


def test_duplicate_csv_columns_are_refused_by_name(tmp_path: Path):
    path = tmp_path / "events.csv"
    path.write_text("user_id,item_id,event,ts,value,value\nu1,i1,view,1767348000,1,2\n")
    with pytest.raises(InputError) as err:
        run(tmp_path, [path], SIGNALS, split={"method": "none"})
    message = str(err.value)
    assert str(path) in message and "duplicate" in message and "'value'" in message


def test_duplicate_parquet_columns_are_refused_by_name(tmp_path: Path):
    path = tmp_path / "events.parquet"
    columns = [["u1"], ["i1"], ["view"], [1767348000], ["a"], ["b"], [1.0], [2.0]]
    names = ["user_id", "item_id", "event", "ts", "note", "note", "value", "value"]
    pq.write_table(pa.table([pa.array(c) for c in columns], names=names), path)
    with pytest.raises(InputError) as err:
        run(tmp_path, [path], SIGNALS, split={"method": "none"})
    message = str(err.value)
    assert str(path) in message and "'note'" in message and "'value'" in message


def test_well_formed_files_never_take_the_line_by_line_path(tmp_path: Path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a well-formed file was split line by line")

    monkeypatch.setattr(readers, "_split_csv", refuse)
    monkeypatch.setattr(readers, "_split_jsonl", refuse)
    csv_path = _write(tmp_path / "a.csv", [_good_csv(1), _good_csv(2)], HEADER.encode())
    jsonl_path = _write(tmp_path / "b.jsonl", [_good_json(3), _good_json(4)])
    stats = run(tmp_path, [csv_path, jsonl_path], SIGNALS, split={"method": "none"})
    assert stats["reconciliation"]["rows_used"] == 4
    assert pl.read_parquet(tmp_path / "out" / "quarantine.parquet").height == 0

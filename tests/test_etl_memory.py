"""`recfb.etl.run`: the ETL on events held in memory gives what `recfb etl` writes, writes
nothing unless asked, and its `Interactions` round-trips through `save` / `load`."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import yaml
from polars.testing import assert_frame_equal

import recfb.etl.interactions
import recfb.etl.pipeline
from recfb.errors import ConfigError, InputError
from recfb.etl import Interactions, load_signal_map
from recfb.etl import run as etl_run
from recfb.etl.interactions import PAIR_COLUMNS
from recfb.simulate import SimConfig, simulate

from conftest import CONF, run

SIGNALS = CONF / "signals" / "simulator.yaml"
TABLES = ("train", "valid", "test", "users", "items")


def _sorted(frame: pl.DataFrame | pl.LazyFrame, drop: tuple[str, ...] = ()) -> pl.DataFrame:
    frame = frame.lazy().collect() if isinstance(frame, pl.LazyFrame) else frame
    frame = frame.drop(*[c for c in drop if c in frame.columns])
    return frame.sort(frame.columns, nulls_last=True)


def _assert_same(memory: Interactions, files: Interactions) -> None:
    """Table for table equal; the quarantine's and filtered rows' `source_file` names where
    the rows came from, which differs by design (a file path vs `<memory>`)."""
    for name in TABLES:
        assert_frame_equal(_sorted(getattr(memory, name)), _sorted(getattr(files, name)))
    assert_frame_equal(_sorted(memory.events), _sorted(files.events))
    for name in ("quarantine", "filtered"):
        got = _sorted(getattr(memory, name), drop=("source_file",))
        assert_frame_equal(got, _sorted(getattr(files, name), drop=("source_file",)))
    same = {k: v for k, v in files.stats.items() if k not in ("inputs", "timings_s")}
    assert {k: memory.stats[k] for k in same} == same


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("memsim") / "world"
    simulate(SimConfig(seed=7, n_users=500, n_items=150, n_events=30_000, duplicate_rate=0.01), out)
    return out


@pytest.fixture(scope="module")
def sim_events(world: Path) -> pl.DataFrame:
    """The simulator's event parts as one frame, in the order the file reader reads them."""
    return pl.concat([pl.read_parquet(p) for p in sorted((world / "events").glob("*.parquet"))])


@pytest.fixture(scope="module")
def on_disk(world: Path, tmp_path_factory: pytest.TempPathFactory) -> Interactions:
    base = tmp_path_factory.mktemp("memfiles")
    run(base, [world / "events"], SIGNALS)
    return Interactions.load(base / "out")


@pytest.fixture(scope="module")
def in_memory(sim_events: pl.DataFrame) -> Interactions:
    return etl_run(sim_events, SIGNALS, split={"method": "temporal"})


def test_in_memory_run_equals_the_file_run(in_memory: Interactions, on_disk: Interactions):
    assert in_memory.directory is None
    assert in_memory.filtered is not None and in_memory.filtered.collect().height > 0
    _assert_same(in_memory, on_disk)
    assert in_memory.stats["inputs"] == ["<memory>"]
    assert in_memory.signal_map == on_disk.signal_map == load_signal_map(SIGNALS)
    assert (in_memory.n_users, in_memory.n_items) == (on_disk.n_users, on_disk.n_items)
    assert in_memory.level_names == on_disk.level_names
    assert in_memory.hidden_labels == on_disk.hidden_labels
    assert (in_memory.item_popularity() == on_disk.item_popularity()).all()
    folded_mem, folded_disk = in_memory.with_valid_in_train(), on_disk.with_valid_in_train()
    assert_frame_equal(folded_mem.train, folded_disk.train)
    assert folded_mem.valid.height == 0


def test_valid_folds_into_train_with_every_pair_column(in_memory: Interactions):
    """A pair in both windows: its counts add up and its time span covers both."""
    train, valid = in_memory.train, in_memory.valid
    folded = in_memory.with_valid_in_train().train
    assert folded.schema == train.schema
    keys = ["user_idx", "item_idx"]
    both = train.join(valid, on=keys, suffix="_v")
    assert both.height > 10
    got = both.select(keys).join(folded, on=keys)
    want = both.select(
        *keys,
        (pl.col("n_view") + pl.col("n_view_v")).alias("n_view"),
        pl.min_horizontal("first_ts", "first_ts_v").alias("first_ts"),
        pl.max_horizontal("last_ts", "last_ts_v").alias("last_ts"),
    )
    assert_frame_equal(got.select(want.columns).sort(keys), want.sort(keys), check_dtypes=False)
    assert folded.height == pl.concat([train.select(keys), valid.select(keys)]).unique().height


def test_paths_and_globs_read_with_the_file_readers(world: Path, on_disk: Interactions):
    data = etl_run(str(world / "events" / "*.parquet"), SIGNALS)
    _assert_same(data, on_disk)
    assert data.stats["inputs"] == on_disk.stats["inputs"]


def test_pandas_input_gives_the_same_tables(sim_events: pl.DataFrame, in_memory: Interactions):
    data = etl_run(sim_events.to_pandas(), SIGNALS, split={"method": "temporal"})
    _assert_same(data, in_memory)


def test_signal_map_as_dict_equals_the_file(sim_events: pl.DataFrame, in_memory: Interactions):
    spec = yaml.safe_load(SIGNALS.read_text())
    data = etl_run(sim_events, spec)
    assert data.signal_map == in_memory.signal_map
    _assert_same(data, in_memory)
    # and a SignalMap object, and the split given as its model
    from recfb.etl import SplitConfig

    again = etl_run(sim_events, load_signal_map(SIGNALS), split=SplitConfig())
    _assert_same(again, in_memory)


def test_nothing_is_written_without_out(
    sim_events: pl.DataFrame, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    def refuse(*args, **kwargs):
        raise AssertionError("the in-memory run used the output-directory machinery")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(recfb.etl.pipeline, "atomic_dir", refuse)
    monkeypatch.setattr(recfb.etl.interactions, "atomic_dir", refuse)
    monkeypatch.setattr(recfb.etl.pipeline, "_stage_validation", refuse)
    monkeypatch.setattr(pl.LazyFrame, "sink_parquet", refuse)
    monkeypatch.setattr(pl.DataFrame, "write_parquet", refuse)
    data = etl_run(sim_events.head(5_000), SIGNALS, split={"method": "leave_last_out"})
    assert data.train.height > 0 and data.directory is None
    assert list(tmp_path.iterdir()) == []
    assert len(data.fingerprint()) == 16


def test_save_then_load_round_trips(in_memory: Interactions, tmp_path: Path, on_disk):
    path = in_memory.save(tmp_path / "etl")
    assert sorted(p.name for p in path.iterdir()) == sorted(
        p.name for p in on_disk.directory.iterdir()
    )
    loaded = Interactions.load(path)
    assert loaded.directory == path
    for name in TABLES:
        assert_frame_equal(getattr(loaded, name), getattr(in_memory, name))
    for name in ("events", "quarantine", "filtered"):
        assert_frame_equal(getattr(loaded, name).collect(), getattr(in_memory, name).collect())
    assert loaded.stats == json.loads(json.dumps(in_memory.stats, default=str))
    assert loaded.signal_map == in_memory.signal_map
    # a save from memory is a directory the ETL's consumers take as they take `recfb etl`'s
    assert Interactions.load(loaded.save(tmp_path / "again")).stats == loaded.stats
    # training's columns only: cheaper to load, and not an ETL output any more
    slim = Interactions.load(path, columns=PAIR_COLUMNS)
    assert slim.train.columns == PAIR_COLUMNS
    assert_frame_equal(slim.train, in_memory.train.select(PAIR_COLUMNS))
    with pytest.raises(InputError, match="lack ETL columns"):
        slim.save(tmp_path / "slim")
    assert not (tmp_path / "slim").exists()


def test_run_with_out_writes_the_directory(sim_events: pl.DataFrame, tmp_path: Path):
    data = etl_run(sim_events.head(5_000), SIGNALS, out=tmp_path / "etl")
    assert data.directory == tmp_path / "etl"
    assert_frame_equal(Interactions.load(tmp_path / "etl").train, data.train)
    assert data.fingerprint() == Interactions.load(tmp_path / "etl").fingerprint()


def test_fingerprint_in_memory_follows_the_data(sim_events: pl.DataFrame, in_memory):
    again = etl_run(sim_events, SIGNALS)
    assert again.fingerprint() == in_memory.fingerprint()
    fewer = etl_run(sim_events.head(20_000), SIGNALS)
    assert fewer.fingerprint() != in_memory.fingerprint()


# rows of a small log with bad rows: (event_id, user_id, item_id, event, ts, value)
BAD = [
    ("e1", "u1", "i1", "view", "2026-01-02T10:00:00", None),
    ("e2", "u1", "i1", "click", "1767348000", "5.0"),
    ("e3", "", "i1", "view", "1767348000", None),  # blank user id
    ("e4", "u2", "i2", "view", "yesterday", None),  # bad timestamp
    ("e5", "u2", "i2", "teleport", "1767348000", None),
    ("e6", "u2", "i2", "click", "1767348000", "-4"),
    ("e7", "u2", " ", "view", "1767348000", None),  # blank item id
    ("e8", "u3", "i3", "purchase", "1767348060000", "19.9"),
]
BAD_COLUMNS = ["event_id", "user_id", "item_id", "event", "ts", "value"]


def test_bad_rows_are_quarantined_in_memory_as_from_a_file(tmp_path: Path):
    frame = pl.DataFrame(BAD, schema=BAD_COLUMNS, orient="row")
    csv = tmp_path / "bad.csv"
    frame.write_csv(csv)
    stats = run(tmp_path, [csv], SIGNALS, split={"method": "none"})
    from_file = pl.read_parquet(tmp_path / "out" / "quarantine.parquet")

    data = etl_run(frame, SIGNALS, split={"method": "none"})
    quarantine = data.quarantine.collect()
    reasons = dict(zip(quarantine["source_row"], quarantine["reason"], strict=True))
    assert reasons == {
        3: "null_user_id",
        4: "bad_ts",
        5: "unknown_event",
        6: "bad_value",
        7: "null_item_id",
    }
    assert quarantine.filter(pl.col("source_row") == 4)["field"].to_list() == ["ts"]
    assert quarantine.filter(pl.col("source_row") == 4)["ts"].to_list() == ["yesterday"]
    assert set(quarantine["source_file"]) == {"<memory>"}
    # the quarantine keeps the text that arrived: the frame's "-4" (the CSV reader made -4.0)
    assert quarantine.filter(pl.col("source_row") == 6)["value"].to_list() == ["-4"]
    keep = ["source_row", "reason", "field", "user_id", "item_id", "event", "ts"]
    assert_frame_equal(
        quarantine.select(keep).sort("source_row"), from_file.select(keep).sort("source_row")
    )
    assert data.stats["reconciliation"] == stats["reconciliation"]


def test_a_missing_required_column_names_the_field():
    frame = pl.DataFrame(BAD, schema=BAD_COLUMNS, orient="row").drop("ts")
    with pytest.raises(InputError) as err:
        etl_run(frame, SIGNALS)
    assert err.value.field == "ts" and "'ts'" in str(err.value)
    # renamed columns are found through input.columns
    renamed = pl.DataFrame(BAD, schema=BAD_COLUMNS, orient="row").rename({"ts": "when"})
    data = etl_run(renamed, SIGNALS, split={"method": "none"}, input={"columns": {"when": "ts"}})
    assert data.stats["reconciliation"]["rows_used"] == 3


def test_wrong_arguments_are_config_errors():
    frame = pl.DataFrame(BAD, schema=BAD_COLUMNS, orient="row")
    with pytest.raises(ConfigError, match="split"):
        etl_run(frame, SIGNALS, split={"method": "random"})
    with pytest.raises(ConfigError, match="events"):
        etl_run(42, SIGNALS)
    with pytest.raises(ConfigError, match="adapter"):
        etl_run(frame, SIGNALS, input={"adapter": "taobao"})


def test_consumers_take_an_interactions_as_a_directory(
    in_memory: Interactions, on_disk: Interactions
):
    from recfb.delayed.fit import fit_delays, recent_cascade_events
    from recfb.rank.state import cut_points, snapshot_at, snapshot_from_etl

    for upto in ("train", "valid"):
        mem, disk = snapshot_from_etl(in_memory, upto), snapshot_from_etl(on_disk.directory, upto)
        assert_frame_equal(mem.pairs, disk.pairs)
        assert_frame_equal(mem.events, disk.events)
        assert mem.spec == disk.spec and mem.now_ms == disk.now_ms
        assert (mem.category == disk.category).all()
    valid_ms, _, end_ms = cut_points(on_disk.stats)
    mem, disk = snapshot_at(in_memory, valid_ms), snapshot_at(on_disk.directory, valid_ms)
    assert_frame_equal(mem.pairs.sort(mem.pairs.columns), disk.pairs.sort(disk.pairs.columns))
    fits_mem, fits_disk = (
        fit_delays(in_memory, segment=None),
        fit_delays(on_disk.directory, segment=None),
    )
    assert fits_mem.to_dict() == fits_disk.to_dict()
    recent = recent_cascade_events(in_memory, end_ms, 30)
    assert_frame_equal(recent, recent_cascade_events(on_disk.directory, end_ms, 30))


def test_the_etl_and_interactions_import_no_torch():
    """Notebooks and the server use them without the training stack."""
    import subprocess
    import sys

    from conftest import ROOT

    code = "import sys, recfb.etl; assert 'torch' not in sys.modules, 'torch imported'"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr

"""The `recfb` console script as a user runs it: help, errors, simulate -> etl."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

RECFB = shutil.which("recfb") or str(Path(sys.executable).parent / "recfb")


def recfb(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [RECFB, *args], cwd=cwd, capture_output=True, text=True, timeout=300, check=False
    )


@pytest.mark.parametrize("command", ["etl", "simulate", "demo"])
def test_every_command_has_help_with_an_example(command: str):
    result = recfb(command, "--help")
    assert result.returncode == 0, result.stderr
    assert "Example" in result.stdout and f"recfb {command}" in result.stdout


def test_bad_input_exits_2_and_names_the_file(tmp_path: Path):
    bad = tmp_path / "events.csv"
    bad.write_text("user_id,item_id,event\nu1,i1,view\n")
    result = recfb("etl", "--input", str(bad), "--out", str(tmp_path / "out"), "-q")
    assert result.returncode == 2
    assert str(bad) in result.stderr and "'ts'" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_override_names_the_key(tmp_path: Path):
    result = recfb("etl", "--set", "split.method=shuffle", "-q")
    assert result.returncode == 2
    assert "split.method" in result.stderr


def test_simulate_then_etl_from_the_command_line(tmp_path: Path):
    sim = tmp_path / "sim"
    result = recfb(
        "simulate",
        "-o",
        str(sim),
        "--set",
        "n_events=50000",
        "--set",
        "n_users=500",
        "--set",
        "n_items=200",
        "-q",
    )
    assert result.returncode == 0, result.stderr
    out = tmp_path / "etl"
    result = recfb("etl", "-i", str(sim / "events"), "-o", str(out), "-q")
    assert result.returncode == 0, result.stderr
    assert "balanced" in result.stdout
    stats = json.loads((out / "stats.json").read_text())
    assert stats["reconciliation"]["balanced"]
    assert {p.name for p in out.iterdir()} >= {
        "train.parquet",
        "valid.parquet",
        "test.parquet",
        "events.parquet",
        "users.parquet",
        "items.parquet",
        "quarantine.parquet",
        "filtered.parquet",
        "stats.json",
    }


def test_train_evaluate_recommend_from_the_command_line(tmp_path: Path):
    sim, etl = tmp_path / "sim", tmp_path / "etl"
    env_args = ("--set", "n_events=40000", "--set", "n_users=400", "--set", "n_items=150")
    assert recfb("simulate", "-o", str(sim), *env_args, "-q").returncode == 0
    assert recfb("etl", "-i", str(sim / "events"), "-o", str(etl), "-q").returncode == 0
    store = f"sqlite:///{tmp_path / 'mlruns.db'}"
    env = {"MLFLOW_TRACKING_URI": store}

    def run_env(*args: str) -> subprocess.CompletedProcess:
        import os

        return subprocess.run(
            [RECFB, *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
            env=os.environ | env,
        )

    trained = run_env(
        "train",
        "-c",
        str(ROOT / "conf/models/mf.yaml"),
        "--set",
        f"data={etl}",
        "--set",
        "trainer.max_epochs=2",
        "--set",
        "model.dim=8",
        "-q",
    )
    assert trained.returncode == 0, trained.stderr
    run_id = trained.stdout.strip().splitlines()[-1].split()[-1]
    assert len(run_id) == 32

    evaluated = run_env("evaluate", "--run-id", run_id, "--split", "valid")
    assert evaluated.returncode == 0, evaluated.stderr
    assert "valid/ndcg@10" in evaluated.stdout

    users = tmp_path / "users.txt"
    users.write_text("no-such-user\n")
    recs = tmp_path / "recs.parquet"
    done = run_env(
        "recommend", "--run-id", run_id, "--users", str(users), "-k", "5", "-o", str(recs)
    )
    assert done.returncode == 0, done.stderr
    import polars as pl

    frame = pl.read_parquet(recs)
    assert frame["source"].to_list() == ["popularity"] * 5
    assert frame["rank"].to_list() == [1, 2, 3, 4, 5]

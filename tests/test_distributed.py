"""The scale-out engine on a real local Ray cluster (tests/raycluster.py): the same commands
with `--engine ray --address ADDR`, and the same results as the local engine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import polars as pl


def recfb(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "recfb.cli", *args],
        cwd=cwd,
        env=os.environ | env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_batch_recommendations_on_ray_match_the_local_engine(ray_cluster, served_shop, tmp_path):
    users = pl.read_parquet(served_shop["etl"] / "users.parquet")["user_id"].to_list()
    # every known user, one twice, and one the model never saw (popularity)
    asked = [*users, users[3], "no-such-user"]
    (tmp_path / "users.txt").write_text("\n".join(asked) + "\n")
    env = {"MLFLOW_TRACKING_URI": served_shop["store"]}
    common = ["recommend", "--run-id", served_shop["run_id"], "--users", "users.txt", "-k", "7"]
    local = recfb(*common, "-o", "local.parquet", env=env, cwd=tmp_path)
    assert local.returncode == 0, local.stderr
    on_ray = recfb(
        *common,
        "-o",
        "ray.parquet",
        "--engine",
        "ray",
        "--address",
        ray_cluster.address,
        "--workers",
        "2",
        env=env,
        cwd=tmp_path,
    )
    assert on_ray.returncode == 0, on_ray.stderr
    a = pl.read_parquet(tmp_path / "local.parquet")
    b = pl.read_parquet(tmp_path / "ray.parquet")
    assert a.height == 7 * len(asked) and b.columns == a.columns
    exact = ["user_id", "rank", "item_id", "source"]
    assert b.select(exact).equals(a.select(exact))
    assert (b["score"] - a["score"]).abs().max() < 1e-5
    assert b.filter(pl.col("user_id") == "no-such-user")["source"].unique().to_list() == [
        "popularity"
    ]


def test_an_unknown_engine_is_refused_by_name(served_shop, tmp_path):
    done = recfb(
        "recommend",
        "--run-id",
        served_shop["run_id"],
        "--engine",
        "spark",
        env={"MLFLOW_TRACKING_URI": served_shop["store"]},
        cwd=tmp_path,
    )
    assert done.returncode == 2 and "--engine must be local or ray" in done.stderr

"""The scale-out engine on a real local Ray cluster (recfb.distributed.local): the same commands
with `--engine ray --address ADDR`, and the same results as the local engine."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from conftest import CONF


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
    # the same lists: an actor scores on one thread, this process on several, so float32
    # sums may differ in their last bits and swap two items whose scores tie to 1e-5
    assert b.select("user_id", "rank", "source").equals(a.select("user_id", "rank", "source"))
    assert (b["score"] - a["score"]).abs().max() < 1e-5
    by_user = ["user_id", "item_id"]
    assert b.select(by_user).sort(by_user).equals(a.select(by_user).sort(by_user))
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


def _messy_inputs(base: Path) -> list[str]:
    """A simulated shop in three files, made messy: exact repeats, an event_id reused by
    another user, a row with an unknown signal (quarantined), dwell noise (the simulator's)."""
    from recfb.simulate import SimConfig, simulate

    simulate(SimConfig(seed=21, n_users=900, n_items=300, n_events=60_000), base / "sim")
    events = pl.read_parquet(base / "sim" / "events")
    repeats = events.sample(300, seed=1)  # the same rows again (the first copy wins)
    reused = events.sample(50, seed=2).with_columns(pl.col("user_id") + 7)  # same event_id
    bad = events.head(3).with_columns(pl.lit("teleport").alias("event"), pl.col("event_id") + 10**9)
    files = []
    for i, part in enumerate(
        [events.slice(0, 25_000), pl.concat([events.slice(25_000, 20_000), repeats, bad]),
         pl.concat([reused, events.slice(45_000)])]
    ):  # fmt: skip
        path = base / f"events-{i}.parquet"
        part.write_parquet(path)
        files.append(str(path))
    return files


def _same_outputs(a: Path, b: Path) -> None:
    import json

    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for path in sorted(a.glob("*.parquet")):
        x, y = pl.read_parquet(path), pl.read_parquet(b / path.name)
        assert x.height > 0 or path.name not in ("train.parquet", "events.parquet")
        assert x.equals(y), path.name  # row for row, in the same order
    sa, sb = (json.loads((d / "stats.json").read_text()) for d in (a, b))
    assert sb.pop("engine")["shards"] == 3
    sa.pop("timings_s"), sb.pop("timings_s")
    assert sa == sb


@pytest.mark.parametrize(
    "split",
    [
        {"method": "temporal"},
        {"method": "leave_last_out", "leave_out": "positive"},
        {"method": "leave_last_out", "leave_out": "deepest"},
        {"method": "none"},
    ],
    ids=["temporal", "last-positive", "last-deepest", "none"],
)
def test_the_etl_on_ray_writes_the_local_engines_tables(ray_cluster, tmp_path, split):
    from recfb.config import build_model
    from recfb.etl import EtlConfig, run_etl

    inputs = _messy_inputs(tmp_path)
    base = {
        "input": {"paths": inputs},
        "signals": str(CONF / "signals" / "simulator.yaml"),
        "split": split,
    }
    local = run_etl(build_model(EtlConfig, base | {"out": str(tmp_path / "local")}, "t"), True)
    ray_cfg = base | {
        "out": str(tmp_path / "ray"),
        "engine": "ray",
        "ray": {"address": ray_cluster.address, "workers": 2, "shards": 3},
    }
    on_ray = run_etl(build_model(EtlConfig, ray_cfg, "t"), True)
    rec = on_ray.stats["reconciliation"]
    assert rec["balanced"] and rec["quarantined"] == {"unknown_event": 3}
    assert rec["duplicates_removed"]["same_event_id"] == 350  # the repeats and the reuses
    assert local.stats["reconciliation"] == rec
    _same_outputs(tmp_path / "local", tmp_path / "ray")
    assert not (tmp_path / "ray" / "_shards").exists()
    # the large tables in parts, one per range of users (read above as one table each)
    for name in ("train", "valid", "test", "events"):
        assert (tmp_path / "local" / f"{name}.parquet").is_file()
        parts = sorted(p.name for p in (tmp_path / "ray" / f"{name}.parquet").iterdir())
        assert len(parts) > 1 and parts == [f"part-{i:05d}.parquet" for i in range(len(parts))]


def test_the_etl_on_ray_reads_mixed_files_as_the_local_engine(ray_cluster, tmp_path):
    """Each file is read and validated by its own task: a CSV (text ids and event_ids beside
    the parquet's integers, a ragged record) and a JSONL file (a line that is not JSON, a
    column no other file has) must come out typed, ordered and quarantined as the local
    engine's one query over every file does."""
    from recfb.config import build_model
    from recfb.errors import InputError
    from recfb.etl import EtlConfig, run_etl

    parquet = _messy_inputs(tmp_path)
    text = tmp_path / "events-3.csv"
    pl.read_parquet(parquet[0]).slice(0, 4_000).write_csv(text)  # the same events, as text
    with text.open("a") as fh:
        fh.write("1,2,3,view,2024-01-01,,,,,extra-field\n")
    lines = tmp_path / "events-4.jsonl"
    pl.read_parquet(parquet[1]).slice(0, 3_000).with_columns(
        pl.col("user_id") + 5, pl.lit("spring").alias("campaign")
    ).write_ndjson(lines)
    with lines.open("a") as fh:
        fh.write('{"user_id": 1, "item_id": 2,\n')
    base = {
        "input": {"paths": [parquet[0], str(text), *parquet[1:], str(lines)]},
        "signals": str(CONF / "signals" / "simulator.yaml"),
    }
    local = run_etl(build_model(EtlConfig, base | {"out": str(tmp_path / "local")}, "t"), True)
    cluster = {"address": ray_cluster.address, "shards": 3}
    ray_cfg = base | {"out": str(tmp_path / "ray"), "engine": "ray", "ray": cluster}
    run_etl(build_model(EtlConfig, ray_cfg, "t"), True)
    rec = local.stats["reconciliation"]
    assert rec["quarantined"] == {"unknown_event": 3, "ragged_row": 1, "bad_json": 1}
    assert rec["duplicates_removed"]["same_event_id"] >= 4_000
    quarantine = pl.read_parquet(tmp_path / "local" / "quarantine.parquet")
    assert "campaign" in quarantine.columns
    assert "campaign" in pl.read_parquet(tmp_path / "local" / "events.parquet").columns
    _same_outputs(tmp_path / "local", tmp_path / "ray")

    # an unknown event, where the signal map makes it an error: the task's error as itself
    strict = tmp_path / "strict.yaml"
    signals = (CONF / "signals" / "simulator.yaml").read_text()
    strict.write_text(signals.replace("unknown_events: quarantine", "unknown_events: error"))
    with pytest.raises(InputError) as raised:
        run_etl(build_model(EtlConfig, ray_cfg | {"signals": str(strict)}, "t"), True)
    assert str(raised.value).startswith(f"file {parquet[1]}, row 20301, field 'event'")
    assert "Traceback" not in str(raised.value)


def test_the_etl_on_ray_survives_a_worker_killed_mid_task(ray_cluster, tmp_path):
    """A worker killed with SIGKILL while it runs one of the ETL's tasks: Ray runs the task
    again (tasks never delete what they read), and the tables equal the local engine's."""
    import signal
    import threading

    import psutil

    from recfb.config import build_model
    from recfb.etl import EtlConfig, run_etl

    base = {
        "input": {"paths": _messy_inputs(tmp_path)},
        "signals": str(CONF / "signals" / "simulator.yaml"),
    }
    run_etl(build_model(EtlConfig, base | {"out": str(tmp_path / "local")}, "t"), True)
    cluster = {"address": ray_cluster.address, "shards": 3}
    ray_cfg = base | {"out": str(tmp_path / "ray"), "engine": "ray", "ray": cluster}
    killed: list[str] = []
    done = threading.Event()

    def kill_one() -> None:
        """SIGKILL a fold task's worker once it has read its inputs (it is writing its
        pair tables): a task that had deleted them could not run again."""
        while not done.is_set():
            if any(tmp_path.glob("**/_shards/part-*/train.parquet")):
                break
        for proc in psutil.process_iter(["cmdline"]):
            title = " ".join(proc.info["cmdline"] or [])
            if title.startswith("ray::fold_shard"):
                proc.send_signal(signal.SIGKILL)
                killed.append(title)
                return

    killer = threading.Thread(target=kill_one, daemon=True)
    killer.start()
    try:
        run_etl(build_model(EtlConfig, ray_cfg, "t"), True)
    finally:
        done.set()
        killer.join()
    assert killed, "no fold task was seen running"
    _same_outputs(tmp_path / "local", tmp_path / "ray")


def test_the_etl_on_ray_reads_a_large_parquet_file_in_pieces(ray_cluster, tmp_path):
    """`ray.rows_per_read` splits a parquet file's read over several tasks: the record
    numbers stay the file's (the quarantined rows name theirs), the event_id rule and the
    input order hold across pieces, the tables equal the local engine's."""
    from recfb.config import build_model
    from recfb.etl import EtlConfig, run_etl

    base = {
        "input": {"paths": _messy_inputs(tmp_path)},
        "signals": str(CONF / "signals" / "simulator.yaml"),
    }
    run_etl(build_model(EtlConfig, base | {"out": str(tmp_path / "local")}, "t"), True)
    cluster = {"address": ray_cluster.address, "shards": 3, "rows_per_read": 7_000}
    ray_cfg = base | {"out": str(tmp_path / "ray"), "engine": "ray", "ray": cluster}
    stats = run_etl(build_model(EtlConfig, ray_cfg, "t"), True).stats
    assert stats["engine"]["read_tasks"] == 4 + 3 + 3  # 25,000, 20,303 and 15,050 rows
    quarantine = pl.read_parquet(tmp_path / "ray" / "quarantine.parquet")
    assert quarantine["source_row"].to_list() == [20_301, 20_302, 20_303]
    _same_outputs(tmp_path / "local", tmp_path / "ray")


def test_the_etl_on_ray_extends_an_earlier_vocabulary_as_the_local_engine(ray_cluster, tmp_path):
    """A second run over more data keeps the first run's indices and appends the new ids."""
    from recfb.config import build_model
    from recfb.etl import EtlConfig, run_etl

    inputs = _messy_inputs(tmp_path)
    signals = str(CONF / "signals" / "simulator.yaml")
    first = {"input": {"paths": inputs[:1]}, "signals": signals, "out": str(tmp_path / "v1")}
    run_etl(build_model(EtlConfig, first, "t"), True)
    more = {"input": {"paths": inputs}, "signals": signals, "vocab_from": str(tmp_path / "v1")}
    run_etl(build_model(EtlConfig, more | {"out": str(tmp_path / "local")}, "t"), True)
    cluster = {"address": ray_cluster.address, "shards": 3}
    ray_cfg = more | {"out": str(tmp_path / "ray"), "engine": "ray", "ray": cluster}
    run_etl(build_model(EtlConfig, ray_cfg, "t"), True)
    _same_outputs(tmp_path / "local", tmp_path / "ray")
    v1 = pl.read_parquet(tmp_path / "v1" / "items.parquet")
    v2 = pl.read_parquet(tmp_path / "ray" / "items.parquet")
    assert v2.head(v1.height).equals(v1) and v2.height > v1.height


def test_the_etl_on_ray_filters_as_the_local_engine(ray_cluster, tmp_path):
    """Outlier users and the k-core are decided on the whole data (a user's rate against
    every user's median; the core of every shard's pairs) and applied per shard."""
    from recfb.config import build_model
    from recfb.etl import EtlConfig, run_etl

    filters = {
        "outlier_users": True,
        "outlier_rate_factor": 2.0,
        "min_user_items": 4,
        "min_item_users": 30,
    }
    base = {
        "input": {"paths": _messy_inputs(tmp_path)},
        "signals": str(CONF / "signals" / "simulator.yaml"),
        "filters": filters,
    }
    local = run_etl(build_model(EtlConfig, base | {"out": str(tmp_path / "local")}, "t"), True)
    cluster = {"address": ray_cluster.address, "shards": 3}
    ray_cfg = base | {"out": str(tmp_path / "ray"), "engine": "ray", "ray": cluster}
    run_etl(build_model(EtlConfig, ray_cfg, "t"), True)
    removed = local.stats["reconciliation"]["filtered"]
    assert removed["outlier_user"] > 0 and removed["kcore"] > 0 and removed["noise_dwell"] > 0
    _same_outputs(tmp_path / "local", tmp_path / "ray")


def test_training_on_two_ray_workers_matches_one_process_on_movielens(
    ray_cluster, tmp_path, monkeypatch
):
    """MF (the shipped config) on MovieLens 100k, DDP over two Ray Train workers (each
    reading its own users' pairs) against one process, two seeds each. Seed noise, measured
    over five seeds each (valid NDCG@20, session 32): one process 0.2512 +- 0.0027, two
    workers 0.2546 +- 0.0047 (sd). The means of two seeds must agree within 0.01 (about
    three standard deviations of their difference)."""
    from mlflow import MlflowClient

    from recfb.config import load_config
    from recfb.recommender import train
    from recfb.train.config import TrainConfig

    from conftest import shared_file

    store = f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.chdir(tmp_path)
    from recfb.etl import EtlConfig, run_etl

    ratings = shared_file("ml-100k/u.data")
    sets = [f"out={tmp_path / 'ml'}", f"input.paths=['{ratings}']"]
    sets.append(f"signals={CONF / 'signals' / 'movielens.yaml'}")
    etl = load_config(EtlConfig, CONF / "datasets" / "movielens.yaml", sets)
    run_etl(etl, True)
    cluster = [f"ray.address={ray_cluster.address}", "ray.workers=2"]
    scores: dict[str, list[float]] = {"local": [], "ray": []}
    for engine in ("local", "ray"):
        for seed in (0, 1):
            sets = [f"data={tmp_path / 'ml'}", "eval.exclude=any", f"seed={seed}"]
            sets += [f"engine={engine}", *cluster]
            cfg = load_config(TrainConfig, CONF / "models" / "mf.yaml", sets)
            result = train(cfg, quiet=True)
            scores[engine].append(result.metrics["valid/ndcg@20"])
            if engine == "ray":
                # each worker evaluated its own users; the sums combined give the figure the
                # driver computes on the whole valid split with the best epoch's weights
                best = max(row["valid/ndcg@20"] for row in result.history)
                assert best == pytest.approx(result.metrics["valid/ndcg@20"], abs=1e-4)
    local, on_ray = (sum(v) / len(v) for v in (scores["local"], scores["ray"]))
    assert local > 0.2 and abs(on_ray - local) < 0.01, scores
    params = MlflowClient(store).get_run(result.run_id).data.params
    assert params["engine"] == "ray" and params["ray.workers"] == "2"
    # each worker read a shard: two ranges of users that meet and cover them all
    shards = re.findall(r"users (\d+)-(\d+): (\d+) positives", params["ray.train_shards"])
    n_users = pl.read_parquet(tmp_path / "ml" / "users.parquet").height
    assert [int(shards[0][0]), int(shards[1][0])] == [0, int(shards[0][1]) + 1]
    assert int(shards[1][1]) == n_users - 1 and min(int(s[2]) for s in shards) > 0


def test_the_gates_holdout_scoring_on_ray_gives_the_local_figures(
    ray_cluster, served_shop, monkeypatch
):
    """Every holdout user of the shop (no sample), scored as Ray tasks: the same metrics."""
    from recfb.distributed import RayConfig
    from recfb.pipeline import gate
    from recfb.pipeline.gate import Vectors, holdout_metrics

    monkeypatch.setattr(gate, "CHUNK_USERS", 64)  # several chunks, so several tasks
    vectors = Vectors.from_bundle(served_shop["bundle"])
    local = holdout_metrics(vectors, served_shop["etl"], k=10, max_users=None)
    assert local["users"] > 3 * 64
    on_ray = holdout_metrics(
        vectors,
        served_shop["etl"],
        k=10,
        max_users=None,
        ray=RayConfig(address=ray_cluster.address, workers=2),
    )
    assert on_ray == local
    assert local["ndcg@10"] > 0


def test_a_pipeline_runs_on_ray_behind_the_same_command(ray_cluster, tmp_path):
    """`recfb pipeline run DEF --engine ray --address ADDR`: the ETL, the training and the
    gate on the cluster; the run records where each ran, promotes, and the ETL's tables are
    those of the same ETL run locally."""
    import json

    import yaml
    from mlflow import MlflowClient

    from recfb.config import build_model
    from recfb.etl import EtlConfig, run_etl
    from recfb.simulate import SimConfig, simulate

    simulate(SimConfig(seed=4, n_users=800, n_items=300, n_events=60_000), tmp_path / "sim")
    signals = str(CONF / "signals" / "simulator.yaml")
    etl_sets = [f"input.paths=['{tmp_path / 'sim' / 'events'}']", f"signals={signals}"]
    definition = {
        "name": "on-ray",
        "experiment": "ray-test",
        "registered_model": "recfb-ray",
        "work_dir": str(tmp_path / "pipelines"),
        "stages": {
            "etl": {"config": str(CONF / "etl.yaml"), "set": etl_sets},
            "train": {
                "config": str(CONF / "models" / "mf.yaml"),
                "set": ["model.dim=16", "trainer.max_epochs=3", "ray.workers=2"],
            },
            "evaluate": {},
            "index": {"config": str(CONF / "index.yaml"), "set": [f"models_dir={tmp_path}/m"]},
            "register": {},
            "promote": {},
        },
        "gate": {"max_users": None},
    }
    path = tmp_path / "on-ray.yaml"
    path.write_text(yaml.safe_dump(definition))
    store = f"sqlite:///{tmp_path / 'mlruns.db'}"
    done = recfb(
        "pipeline",
        "run",
        str(path),
        "--engine",
        "ray",
        "--address",
        ray_cluster.address,
        env={"MLFLOW_TRACKING_URI": store},
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    client = MlflowClient(store)
    prod = client.get_model_version_by_alias("recfb-ray", "production")
    params = client.get_run(prod.run_id).data.params
    assert params["engine"] == "ray" and params["ray.address"] == ray_cluster.address
    etl_out = tmp_path / "pipelines" / "on-ray" / "etl"
    stats = json.loads((etl_out / "stats.json").read_text())
    assert stats["engine"]["name"] == "ray"
    local = {"input": {"paths": [str(tmp_path / "sim" / "events")]}, "signals": signals}
    run_etl(build_model(EtlConfig, local | {"out": str(tmp_path / "local")}, "t"), True)
    for name in ("train", "valid", "test", "events"):
        a = pl.read_parquet(tmp_path / "local" / f"{name}.parquet")
        assert a.equals(pl.read_parquet(etl_out / f"{name}.parquet")), name

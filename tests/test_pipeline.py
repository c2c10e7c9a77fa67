"""Pipelines end to end on a small simulated shop, into a temporary MLflow store."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import polars as pl
import pytest

from recfb.pipeline import PipelineBusy, PipelineSpec, StageFailed, run_pipeline
from recfb.pipeline.definition import StageSpec
from recfb.pipeline.runner import pipeline_lock
from recfb.pipeline.stages import gate_decision

from conftest import CONF


def spec_for(base: Path, train_set: list[str], index_set: list[str] | None = None) -> PipelineSpec:
    return PipelineSpec.model_validate(
        {
            "name": "nightly-test",
            "experiment": "pipeline-test",
            "registered_model": "recfb-test",
            "work_dir": str(base / "pipelines"),
            "stages": {
                "etl": {
                    "config": str(CONF / "etl.yaml"),
                    "set": [
                        f"input.paths=['{base / 'sim' / 'events'}']",
                        f"signals={CONF / 'signals' / 'simulator.yaml'}",
                    ],
                },
                "train": {
                    "config": str(CONF / "models" / "mf.yaml"),
                    "set": ["model.dim=16", "trainer.batch_size=1024", *train_set],
                },
                "evaluate": {},
                "index": {
                    "config": str(CONF / "index.yaml"),
                    "set": [f"models_dir={base / 'models'}", *(index_set or [])],
                },
                "register": {},
                "promote": {},
            },
        }
    )


def statuses(result) -> dict[str, str]:
    return {name: rec.status for name, rec in result.stages.items()}


def test_pipeline_resumes_skips_gates_and_locks(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from recfb.simulate import SimConfig, simulate

    simulate(SimConfig(seed=9, n_users=1_500, n_items=400, n_events=150_000), tmp_path / "sim")
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    client = MlflowClient(tracking_uri=uri)
    good = ["trainer.max_epochs=4", "trainer.lr=0.01"]

    # 1. the index stage fails (a coarse IVF cannot reach the recall floor): the run stops there
    coarse = ["factory=IVF16,Flat", "search_params=nprobe=1", "recall_floor=0.99"]
    with pytest.raises(StageFailed, match="stage index failed"):
        run_pipeline(spec_for(tmp_path, good, coarse))
    state = json.loads((tmp_path / "pipelines" / "nightly-test" / "state.json").read_text())
    assert [state[s]["status"] for s in ("etl", "train", "evaluate", "index")] == [
        "ran", "ran", "ran", "failed"
    ]  # fmt: skip
    first_train = state["train"]["outputs"]["run_id"]

    # 2. fixed, it resumes at the index: nothing before it runs again
    result = run_pipeline(spec_for(tmp_path, good))
    assert statuses(result) == {
        "etl": "skipped",
        "train": "skipped",
        "evaluate": "skipped",
        "index": "ran",
        "register": "ran",
        "promote": "ran",
    }
    assert result.stages["train"].outputs["run_id"] == first_train
    prod = client.get_model_version_by_alias("recfb-test", "production")
    # the version points at the logged model (any host fetches it), not at a local path
    assert str(prod.version) == "1" and prod.source.startswith("models:/")
    from recfb.serving.fetch import resolve

    assert (resolve(prod.source) / "manifest.json").is_file()
    assert result.stages["promote"].outputs["passed"]
    report = result.report.read_text()
    assert "## Gate" in report and "promoted to production" in report and "## Data" in report
    # MLflow: a parent run with one child per stage, the train run adopted as a child
    children = client.search_runs(
        [client.get_experiment_by_name("pipeline-test").experiment_id],
        f"tags.mlflow.parentRunId = '{result.parent_run_id}'",
    )
    assert {r.data.tags["recfb.stage"] for r in children} >= {
        "etl", "evaluate", "index", "register", "promote"
    }  # fmt: skip
    assert "report/report.md" in {
        a.path for a in client.list_artifacts(result.parent_run_id, "report")
    }

    # 3. nothing changed: every stage is skipped
    assert set(statuses(run_pipeline(spec_for(tmp_path, good))).values()) == {"skipped"}

    # 4. a deliberately worse candidate (zero epochs: random vectors) is refused by the gate
    worse = run_pipeline(spec_for(tmp_path, ["trainer.max_epochs=0"]))
    assert statuses(worse)["train"] == "ran" and statuses(worse)["etl"] == "skipped"
    verdict = worse.stages["promote"].outputs
    assert not verdict["passed"] and "ndcg@10" in verdict["reason"]
    assert str(client.get_model_version_by_alias("recfb-test", "production").version) == "1"
    assert str(client.get_model_version_by_alias("recfb-test", "candidate").version) == "2"
    assert client.get_model_version("recfb-test", "2").tags["gate"] == "rejected"

    # 5. one run of a pipeline at a time
    with pipeline_lock(tmp_path / "pipelines" / "nightly-test"), pytest.raises(PipelineBusy):
        run_pipeline(spec_for(tmp_path, good))


def test_gate_refuses_more_refunded_or_disliked_items():
    from recfb.pipeline import GateSpec

    gate = GateSpec(tolerance=0.01)
    prod = {"ndcg@10": 0.10, "negative_share@10": 0.010}
    assert gate_decision(gate, {"ndcg@10": 0.095, "negative_share@10": 0.010}, prod)[0]
    assert not gate_decision(gate, {"ndcg@10": 0.085, "negative_share@10": 0.0}, prod)[0]
    passed, reason = gate_decision(gate, {"ndcg@10": 0.2, "negative_share@10": 0.02}, prod)
    assert not passed and "negative_share@10" in reason
    assert gate_decision(gate, {"ndcg@10": 0.0, "negative_share@10": 1.0}, None)[0]


def test_the_service_follows_the_production_alias_without_failed_requests(
    served_shop, tmp_path, monkeypatch
):
    import time

    import httpx
    from mlflow import MlflowClient

    from recfb.index import IndexConfig, build_bundle

    from test_serving import KEY, RequestLoops, Server, known_user, wait_for_bundle

    monkeypatch.setenv("MLFLOW_TRACKING_URI", served_shop["store"])
    client = MlflowClient(tracking_uri=served_shop["store"])
    v2 = build_bundle(
        IndexConfig(run_id=served_shop["run_id"], models_dir=str(tmp_path), name="follow-v2")
    ).path
    client.create_registered_model("recfb-follow")
    for bundle in (served_shop["bundle"], v2):
        client.create_model_version("recfb-follow", str(bundle), served_shop["run_id"])
    client.set_registered_model_alias("recfb-follow", "production", 1)
    extra = ["--set", "follow.model=recfb-follow", "--set", "follow.poll_s=0.3"]
    srv = Server(served_shop["bundle"], tmp_path / "events.db", *extra)
    loops = RequestLoops(srv.url, known_user(served_shop), 3)
    try:
        time.sleep(1.5)
        assert loops.versions == {"v1"}  # the alias points at what it serves: no swap
        client.set_registered_model_alias("recfb-follow", "production", 2)
        with httpx.Client(base_url=srv.url, headers={"X-API-Key": KEY}) as admin:
            assert wait_for_bundle(admin, "follow-v2")["following"]["version"] == "2"
        time.sleep(1.0)
    finally:
        loops.stop()
        srv.stop()
    assert len(loops.statuses) > 20 and set(loops.statuses) == {200}
    assert loops.versions == {"v1", "follow-v2"}


def test_warm_start_copies_the_previous_vectors_by_id(served_shop, monkeypatch):
    import torch

    from recfb.config import build_model
    from recfb.errors import RecfbError
    from recfb.train.config import TrainConfig
    from recfb.train.data import Interactions
    from recfb.train.fit import build_model as build_recommender
    from recfb.train.fit import warm_start
    from recfb.train.runs import load_run

    monkeypatch.setenv("MLFLOW_TRACKING_URI", served_shop["store"])
    data = Interactions.load(served_shop["etl"])
    raw = {"data": str(served_shop["etl"]), "init_from_run": served_shop["run_id"]}
    cfg = build_model(TrainConfig, raw | {"model": {"family": "mf", "dim": 16}}, "test")
    model = build_recommender(cfg, data)
    before = model.user_embedding.weight.detach().clone()
    copied = warm_start(model, cfg, data)
    _, old = load_run(served_shop["run_id"])
    assert copied == {"user": len(old.user_vectors), "item": len(old.item_vectors)}
    assert torch.equal(model.user_embedding.weight.detach(), old.user_vectors)
    assert not torch.equal(before, old.user_vectors)
    narrow = build_model(TrainConfig, raw | {"model": {"family": "mf", "dim": 8}}, "test")
    with pytest.raises(RecfbError, match="dim"):
        warm_start(build_recommender(narrow, data), narrow, data)


def test_pipeline_command_exit_codes(tmp_path):
    """What a scheduler sees: 2 for a bad definition, 75 while another run holds the lock."""
    import subprocess
    import sys

    from conftest import ROOT

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nstages: {etl: {}}\nunknown_key: 1\n")
    cmd = [sys.executable, "-m", "recfb.cli", "pipeline", "run"]
    done = subprocess.run([*cmd, str(bad)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "unknown_key" in done.stdout + done.stderr
    good = tmp_path / "p.yaml"
    good.write_text(f"name: locked\nwork_dir: {tmp_path}\nstages: {{etl: {{}}}}\n")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"}
    with pipeline_lock(tmp_path / "locked"):
        done = subprocess.run(
            [*cmd, str(good)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
        )
    assert done.returncode == 75, done.stdout + done.stderr
    assert "already running" in done.stdout + done.stderr


def test_holdout_metrics_by_id_on_a_hand_built_split(tmp_path):
    """Two items, three holdout users; expected values worked out by hand."""
    import numpy as np
    import polars as pl

    from recfb.pipeline.gate import Vectors, holdout_metrics

    pl.DataFrame({"user_idx": [0, 1, 2], "user_id": ["a", "b", "c"]}).write_parquet(
        tmp_path / "users.parquet"
    )
    items = {"item_idx": [0, 1, 2], "item_id": ["x", "y", "z"]}
    pl.DataFrame(items).write_parquet(tmp_path / "items.parquet")

    def pairs(rows):
        return pl.DataFrame(rows, schema=["user_idx", "item_idx", "label"], orient="row").cast(
            {"user_idx": pl.UInt32, "item_idx": pl.UInt32, "label": pl.Int8}
        )

    # two levels (view < purchase); the earlier pairs are purchases, which the rule hides
    spec = {"levels": [{"name": "view"}, {"name": "purchase"}], "signals": {}}
    (tmp_path / "stats.json").write_text(json.dumps({"signal_map_spec": spec}))
    pairs([(0, 2, 2), (1, 0, 2), (1, 2, 2)]).write_parquet(tmp_path / "train.parquet")  # z popular
    pairs([]).write_parquet(tmp_path / "valid.parquet")
    # a likes x, dislikes y; b likes y; c (unknown to the model) likes x
    pairs([(0, 0, 2), (0, 1, -1), (1, 1, 1), (2, 0, 1)]).write_parquet(tmp_path / "test.parquet")
    model = Vectors(
        user_ids=np.array(["a", "b"]),
        user_vectors=np.array([[0.0, 1.0], [1.0, 0.0]]),
        item_ids=np.array(["x", "y", "z"]),
        item_vectors=np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]),  # a ranks y first, b x
    )
    m = holdout_metrics(model, tmp_path, k=1)
    # a: z seen, top-1 y (disliked, a miss); b: x and z seen, top-1 y (a hit);
    # c: unknown, popularity (z 2/3, x 1/3), nothing seen: z, a miss
    assert m["ndcg@1"] == pytest.approx(1 / 3)
    assert m["recall@1"] == pytest.approx(1 / 3)  # each user has one relevant item
    assert m["negative_share@1"] == pytest.approx(1 / 3)
    assert m["users"] == 3 and m["users_unknown"] == 1


def test_pipeline_with_the_rank_stage_publishes_and_serves_two_stages(tmp_path, monkeypatch):
    """etl -> train -> rank -> evaluate -> index -> register -> promote: the gate judges the
    two-stage list, the bundle carries the ranker (checksummed), and the service ranks with it,
    counting an item carted a moment ago."""
    from fastapi.testclient import TestClient

    from recfb.index.bundle import verify
    from recfb.serving.app import create_app
    from recfb.serving.config import ServeConfig
    from recfb.simulate import SimConfig, simulate

    simulate(SimConfig(seed=4, n_users=800, n_items=300, n_events=60_000), tmp_path / "sim")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns.db'}")
    monkeypatch.chdir(tmp_path)
    spec = spec_for(tmp_path, ["trainer.max_epochs=3", "trainer.lr=0.01"])
    spec.stages["rank"] = StageSpec(
        config=str(CONF / "rank.yaml"),
        set=["ranker.n_estimators=60", "ranker.label_windows=1", "delay_corrected_rates=false"],
    )
    result = run_pipeline(spec)
    assert result.stages["rank"].status == "ran"
    candidate = result.stages["evaluate"].outputs["candidate"]
    assert candidate["ndcg@10"] > 0
    bundle = Path(result.stages["index"].outputs["bundle"])
    manifest = verify(bundle)
    assert manifest["two_stage"] is True
    assert {"ranker.txt", "rank.json", "history.parquet"} <= set(manifest["files"])
    users = pl.read_parquet(bundle / "users.parquet")["user_id"].cast(pl.String).to_list()
    app = create_app(ServeConfig(bundle=str(bundle), event_log=str(tmp_path / "ev.db")), "k")
    with TestClient(app) as client:
        user = users[7]
        first = client.get(f"/v1/users/{user}/recommendations", params={"k": 10})
        assert first.status_code == 200 and first.json()["source"] == "two_stage"
        assert len(first.json()["items"]) == 10
        before = client.get(f"/v1/users/{user}/recommendations", params={"k": 300}).json()
        order = [i["item_id"] for i in before["items"]]
        fresh = order[-1]  # the user's last-ranked item: not a candidate of any source
        now_ms = int(time.time() * 1000)
        event = {"event_id": "e1", "user_id": user, "item_id": fresh, "event": "cart", "ts": now_ms}
        posted = client.post("/v1/events", json={"events": [event]}, headers={"X-API-Key": "k"})
        assert posted.status_code == 200
        after = client.get(f"/v1/users/{user}/recommendations", params={"k": 300}).json()
        moved = [i["item_id"] for i in after["items"]]
        assert fresh in moved and moved.index(fresh) < order.index(fresh)  # a cart just now counts
        new = client.get("/v1/users/nobody-yet/recommendations", params={"k": 5})
        assert new.status_code == 200 and len(new.json()["items"]) == 5

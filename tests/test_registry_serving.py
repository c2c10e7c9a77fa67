"""A model registered through a real MLflow tracking server (artifacts served by it) is served
from `models:/recfb@production` by a service that cannot see the directory that built it:
the version's source is a model URI, the service fetches it into its own cache, verifies the
checksums and answers with the lists the fitted model gives.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import mlflow
import polars as pl
import pytest

import recfb
from recfb.simulate import SimConfig, simulate

from conftest import CONF, ROOT, free_port

MLFLOW = Path(sys.executable).parent / "mlflow"
RECFB = Path(sys.executable).parent / "recfb"


def wait_until(url: str, seconds: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{url}: process exited {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} not up after {seconds} s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group (the server and its workers), SIGKILL if it lingers."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory: pytest.TempPathFactory):
    """`mlflow server` on 127.0.0.1 with a SQLite store and its own artifact store, serving
    artifacts over HTTP (clients never see its directories)."""
    if not MLFLOW.exists():
        pytest.skip(f"{MLFLOW} is absent: the mlflow server comes with the train extra")
    base = tmp_path_factory.mktemp("tracking-server")
    port = free_port()
    log = base / "server.log"
    env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                str(MLFLOW),
                "server",
                "--backend-store-uri",
                f"sqlite:///{base / 'mlflow.db'}",
                "--artifacts-destination",
                str(base / "artifacts"),
                "--serve-artifacts",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ],
            cwd=base,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(f"{url}/health", 90, proc, log)
        yield url
    finally:
        stop(proc)


def test_production_is_served_from_the_registry_on_another_host(tracking_server, tmp_path):
    builder, host = tmp_path / "builder", tmp_path / "service-host"
    builder.mkdir()
    host.mkdir()
    simulate(SimConfig(seed=21, n_users=300, n_items=150, n_events=30_000), builder / "sim")
    data = recfb.etl.run(
        pl.read_parquet(builder / "sim" / "events"), CONF / "signals/simulator.yaml"
    )
    from recfb.tracking import MlflowTracker

    old_uri = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        tracker = MlflowTracker(
            "registry-test", tracking_uri=tracking_server, registered_model_name="recfb"
        )
        model = recfb.Recommender.create(
            "mf", {"model": {"dim": 8}, "trainer": {"max_epochs": 2}, "eval": {"ks": [10, 20]}}
        ).fit(data, tracker=tracker)
        client = mlflow.MlflowClient(tracking_server)
        version = client.search_model_versions("name = 'recfb'")[0]
        assert version.source.startswith("models:/"), version.source  # not a host path
        client.set_registered_model_alias("recfb", "production", version.version)
    finally:
        if old_uri is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_uri
    users = data.users["user_id"].cast(pl.String).head(4).to_list() + ["a-stranger"]
    expected = model.recommend(users, k=5)
    built_at = Path(model.path)
    del model
    shutil.rmtree(built_at.parent, ignore_errors=True)  # the builder's bundle is gone
    shutil.rmtree(builder)
    assert not built_at.exists()

    port = free_port()
    log = host / "serve.log"
    env = os.environ | {
        "MLFLOW_TRACKING_URI": tracking_server,
        "RECFB_CACHE_DIR": str(host / "cache"),
        "RECFB_API_KEY": "k",
    }
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                str(RECFB),
                "serve",
                "--bundle",
                "models:/recfb@production",
                "--config",
                str(ROOT / "conf" / "serve.yaml"),
                "--set",
                f"port={port}",
                "--set",
                f"event_log={host / 'events.db'}",
                "--set",
                f"models_dir={host / 'models'}",
            ],
            cwd=host,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until(f"{base}/readyz", 120, proc, log)
        for user in users:
            body = httpx.get(f"{base}/v1/users/{user}/recommendations", params={"k": 5}).json()
            served = [item["item_id"] for item in body["items"]]
            assert served == expected.filter(pl.col("user_id") == user)["item_id"].to_list()
    finally:
        stop(proc)
    cached = list((host / "cache" / "models").iterdir())
    assert len(cached) == 1 and len(list(cached[0].glob("artifacts/*/manifest.json"))) == 1


def test_a_tampered_cache_is_fetched_again(tracking_server, tmp_path, monkeypatch):
    from recfb.serving.fetch import resolve
    from recfb.tracking import MlflowTracker

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_server)
    monkeypatch.setenv("RECFB_CACHE_DIR", str(tmp_path / "cache"))
    simulate(SimConfig(seed=22, n_users=200, n_items=100, n_events=15_000), tmp_path / "sim")
    data = recfb.etl.run(
        pl.read_parquet(tmp_path / "sim" / "events"), CONF / "signals/simulator.yaml"
    )
    model = recfb.Recommender.create("popularity").fit(data, tracker=MlflowTracker("tamper"))
    uri = f"runs:/{model.fitted.run_id}/model"
    path = resolve(uri)
    original = (path / "pairs.parquet").read_bytes()
    (path / "pairs.parquet").write_bytes(original[:-10] + b"0123456789")
    again = resolve(uri)
    assert again == path and (again / "pairs.parquet").read_bytes() == original
    loaded = recfb.Recommender.load(again)
    assert loaded.recommend(["x"], k=3).equals(model.recommend(["x"], k=3))


def test_a_run_without_a_logged_model_is_a_clear_error(tmp_path, monkeypatch):
    from recfb.errors import RecfbError
    from recfb.serving.fetch import resolve

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("no-model")
    with mlflow.start_run() as run:
        mlflow.log_param("nothing", 1)
    with pytest.raises(RecfbError, match=f"runs:/{run.info.run_id}/model: cannot fetch"):
        resolve(f"runs:/{run.info.run_id}/model")

"""The retrieval service without the training stack: a real `recfb serve` process answers every
kind of request and, when it exits, has imported no torch, lightning or torch_geometric (nor
mlflow or matplotlib: it follows no registry alias here). The slow test installs the project
with the `serve` extra alone into a fresh virtual environment and runs the same check there,
where torch is not even installed."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import polars as pl
import pytest

from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
KEY = "extra-key"
TRAINING_ONLY = {
    "torch",
    "lightning",
    "lightning_fabric",
    "pytorch_lightning",
    "torchmetrics",
    "torch_geometric",
    "mlflow",
    "matplotlib",
}
# Run as the server process: `recfb serve` through the console entry point's own call, and on
# exit the top-level modules the process imported. uvicorn re-raises the SIGTERM it shut down
# on with the handler it found, so the one set here turns it into a normal exit (atexit runs).
WRAPPER = """
import atexit, json, signal, sys

def report(path=sys.argv[1]):
    import recfb
    modules = sorted({name.partition(".")[0] for name in list(sys.modules)})
    with open(path, "w") as out:
        json.dump({"modules": modules, "recfb": recfb.__file__}, out)

atexit.register(report)
signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
from recfb.cli import app
app(sys.argv[2:], prog_name="recfb")
"""


@dataclass
class Served:
    """A bundle to serve and what its answers must show."""

    path: Path
    known_user: str
    item: str
    known_source: str  # `source` of a known user's recommendations
    fresh_source: str  # `source` of a new user's after one posted event
    rates_status: int  # GET /v1/items/{item}/rates: 200 with delay models, else 404


def first_ids(bundle: Path) -> tuple[str, str]:
    user = pl.read_parquet(bundle / "users.parquet")["user_id"].cast(pl.String)[0]
    item = pl.read_parquet(bundle / "items.parquet")["item_id"].cast(pl.String)[0]
    return user, item


@pytest.fixture(scope="module")
def mf_bundle(served_shop) -> Served:
    """A trained MF model's bundle with delay models (the online-rates path)."""
    user, item = first_ids(served_shop["bundle"])
    return Served(served_shop["bundle"], user, item, "model", "session", 200)


@pytest.fixture(scope="module")
def two_stage_bundle(tmp_path_factory) -> Served:
    """serving/loadtest.py's synthetic two-stage bundle (ranker, rank files), with a small
    ranker: the service's two-stage path is what is exercised, not its cost."""
    spec = importlib.util.spec_from_file_location("loadtest", ROOT / "serving" / "loadtest.py")
    loadtest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loadtest)
    full_ranker = loadtest.synthetic_ranker
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loadtest, "synthetic_ranker", lambda cols, rng: full_ranker(cols, rng, 5))
        path = loadtest.synthetic_bundle(
            tmp_path_factory.mktemp("two-stage"), 2_000, 300, 16, two_stage=True
        )
    assert json.loads((path / "manifest.json").read_text())["two_stage"] is True
    return Served(path, "u0", "i0", "two_stage", "two_stage", 404)


def serve_and_report(python: str, served: Served, work: Path, cwd: Path) -> dict:
    """Start the server with `python`, exercise it, stop it with SIGTERM; returns the
    process's report (modules, where `recfb` came from)."""
    port = free_port()
    report = work / f"modules-{port}.json"
    log = work / f"server-{port}.log"
    cmd = [
        python,
        "-c",
        WRAPPER,
        str(report),
        "serve",
        "--bundle",
        str(served.path),
        "--config",
        str(ROOT / "conf" / "serve.yaml"),
        *("--set", f"port={port}", "--set", f"event_log={work / f'events-{port}.db'}"),
        *("--set", "log_level=warning"),
    ]
    env = os.environ | {"RECFB_API_KEY": KEY, "RECFB_CACHE_DIR": str(work / "cache")}
    if cwd != ROOT:  # another environment: its installed recfb, not this checkout's
        env.pop("PYTHONPATH", None)
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(proc, url, log)
        with httpx.Client(base_url=url, timeout=30) as client:
            exercise(client, served)
    finally:
        stop(proc)
    assert proc.returncode == 0, log.read_text()
    assert report.exists(), f"the server wrote no module report; its log: {log.read_text()}"
    return json.loads(report.read_text())


def wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server not ready in {timeout} s: {log.read_text()}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def exercise(client: httpx.Client, served: Served) -> None:
    """One request of each kind, answered as the API promises."""
    assert client.get("/healthz").json() == {"status": "ok"}
    known = client.get(f"/v1/users/{served.known_user}/recommendations", params={"k": 5})
    assert known.status_code == 200, known.text
    assert known.json()["source"] == served.known_source and len(known.json()["items"]) == 5
    unknown = client.get("/v1/users/nobody-at-all/recommendations", params={"k": 5}).json()
    assert unknown["source"] == "popularity" and len(unknown["items"]) == 5
    similar = client.get(f"/v1/items/{served.item}/similar", params={"k": 5})
    assert similar.status_code == 200, similar.text
    similar_ids = [i["item_id"] for i in similar.json()["items"]]
    assert len(similar_ids) == 5 and served.item not in similar_ids
    event = {"event_id": "e-1", "user_id": "fresh-user", "item_id": served.item, "event": "view"}
    refused = client.post("/v1/events", json={"events": [event]})
    assert refused.status_code == 401
    posted = client.post("/v1/events", json={"events": [event]}, headers={"X-API-Key": KEY})
    assert posted.status_code == 200 and posted.json() == {"accepted": 1, "new": 1}
    fresh = client.get("/v1/users/fresh-user/recommendations", params={"k": 5}).json()
    assert fresh["source"] == served.fresh_source and len(fresh["items"]) == 5
    assert client.get(f"/v1/items/{served.item}/rates").status_code == served.rates_status


def assert_serving_only(report: dict, served: Served) -> None:
    modules = set(report["modules"])
    assert not modules & TRAINING_ONLY, f"the server imported {sorted(modules & TRAINING_ONLY)}"
    # the report is of a process that really served: its web stack and index were loaded
    assert {"recfb", "fastapi", "uvicorn", "faiss", "polars"} <= modules
    if served.known_source == "two_stage":
        assert "lightgbm" in modules  # the ranker ran


@pytest.mark.parametrize("kind", ["mf_bundle", "two_stage_bundle"])
def test_the_server_process_imports_no_training_stack(kind, request, tmp_path):
    served = request.getfixturevalue(kind)
    report = serve_and_report(sys.executable, served, tmp_path, ROOT)
    assert Path(report["recfb"]).is_relative_to(ROOT / "recfb")
    assert_serving_only(report, served)


# --- the `serve` extra alone, in a fresh virtual environment -------------------------------------
def index_reachable(python: str) -> bool:
    """Whether pip (with this machine's configuration) reaches a package index that has
    lleaves (a package no local wheel directory here holds)."""
    probe = subprocess.run(
        [python, "-m", "pip", "index", "versions", "lleaves"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return probe.returncode == 0


@pytest.fixture(scope="module")
def serve_venv(tmp_path_factory) -> Iterator[Path]:
    """A venv with `recfb[serve]` installed (non-editable) from a copy of this checkout
    (about 1 GB: removed afterwards)."""
    base = tmp_path_factory.mktemp("serve-venv")
    src = base / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        (src / name).write_bytes((ROOT / name).read_bytes())
    shutil.copytree(ROOT / "recfb", src / "recfb", ignore=shutil.ignore_patterns("__pycache__"))
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    if not index_reachable(python):
        pytest.skip("no package index reachable: cannot install the serve extra")
    started = time.perf_counter()
    install = subprocess.run(
        [python, "-m", "pip", "install", "-q", f"{src}[serve]"],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    print(f"pip install recfb[serve]: {time.perf_counter() - started:.0f} s")
    yield venv
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mf_bundle", "two_stage_bundle"])
def test_the_serve_extra_alone_serves(kind, request, serve_venv, tmp_path):
    served = request.getfixturevalue(kind)
    python = str(serve_venv / "bin" / "python")
    missing = subprocess.run(
        [
            python,
            "-c",
            "import importlib.util as u; print([m for m in "
            "('torch', 'lightning', 'torch_geometric') if u.find_spec(m)])",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert missing.stdout.strip() == "[]"  # not merely unimported: not installed
    # a training command in this install names the extra to add instead of a traceback
    train = subprocess.run(
        [python, "-m", "recfb.cli", "train", "--config", str(ROOT / "conf/models/mf.yaml")],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    assert train.returncode == 2, train.stdout + train.stderr
    assert "pip install 'recfb[train]'" in train.stderr, train.stderr
    assert "Traceback" not in train.stderr
    report = serve_and_report(python, served, tmp_path, tmp_path)
    assert Path(report["recfb"]).is_relative_to(serve_venv)
    assert_serving_only(report, served)

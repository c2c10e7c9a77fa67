"""Shared fixtures: paths of the real datasets, a helper that runs the ETL, and random training
pairs for the models' step tests."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import polars as pl
import pytest
import torch

from recfb.config import build_model
from recfb.etl import EtlConfig, run_etl
from recfb.train.data import csr_by_user

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
CONF = ROOT / "conf"
T = TypeVar("T")


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """models:/ and runs:/ fetches land in a temp cache, never in ~/.cache/recfb."""
    import os

    path = tmp_path_factory.mktemp("recfb-cache")
    os.environ["RECFB_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(scope="session", autouse=True)
def bundle_key_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Bundles are signed with a key file of the test session, never ~/.config/recfb's."""
    import os

    path = tmp_path_factory.mktemp("recfb-config")
    os.environ["RECFB_CONFIG_DIR"] = str(path)
    os.environ.pop("RECFB_BUNDLE_KEY", None)
    return path


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a server a test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shared_file(name: str) -> Path:
    """A file of ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} is absent: the real datasets live in ../shared/data/ beside the repo")
    return path


def random_train_pairs(
    rng: np.random.Generator, n_users: int, n_items: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A model's training buffers over random pairs with uneven labels and weights and
    explicit negatives (900 and 200 draws), and the items' popularity."""
    keys = np.unique(rng.integers(0, n_users * n_items, 900))
    users, items = keys // n_items, keys % n_items
    neg_keys = np.setdiff1d(np.unique(rng.integers(0, n_users * n_items, 200)), keys)
    neg_indptr, neg_items = csr_by_user(neg_keys // n_items, neg_keys % n_items, n_users)
    pos_indptr, pos_by_user = csr_by_user(users, items, n_users)
    pairs = {
        "pos_users": torch.as_tensor(users),
        "pos_items": torch.as_tensor(items),
        "pos_labels": torch.as_tensor(rng.integers(1, 3, len(keys))),
        "pos_weights": torch.as_tensor(rng.uniform(0.2, 2.0, len(keys)).astype(np.float32)),
        "pos_matured": torch.ones(len(keys), dtype=torch.bool),
        "neg_indptr": neg_indptr,
        "neg_items": neg_items,
        "pos_indptr": pos_indptr,
        "pos_by_user": pos_by_user,
        "pair_keys": torch.as_tensor(keys),
        "pair_index": torch.arange(len(keys)),
    }
    popularity = torch.as_tensor(np.bincount(items, minlength=n_items), dtype=torch.float32)
    return pairs, popularity


def run(tmp_path: Path, paths: list[Path | str], signals: Path | str, **sections) -> dict:
    """Run the ETL on `paths` into tmp_path/'out' and return its stats."""
    data = {
        "input": {"paths": [str(p) for p in paths]} | sections.pop("input", {}),
        "signals": str(signals),
        "out": str(tmp_path / "out"),
    } | sections
    cfg = build_model(EtlConfig, data, "test")
    return run_etl(cfg, quiet=True).stats


def read_out(tmp_path: Path, name: str) -> pl.DataFrame:
    return pl.read_parquet(tmp_path / "out" / f"{name}.parquet")


class RandomScorer:
    """Uniformly random scores: the floor a trained model must clear."""

    def __init__(self, n_items: int) -> None:
        self.n_items = n_items
        self.gen = torch.Generator().manual_seed(0)

    def score(self, users: torch.Tensor) -> torch.Tensor:
        return torch.rand(len(users), self.n_items, generator=self.gen)


@pytest.fixture(scope="session")
def served_shop(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A small simulated shop, ETL'd, with an MF model trained on it and indexed into a
    bundle: {'etl', 'store' (MLflow URI), 'run_id', 'bundle', 'models'}."""
    from recfb.index import IndexConfig, build_bundle
    from recfb.recommender import train
    from recfb.simulate import SimConfig, simulate
    from recfb.train.config import TrainConfig

    base = tmp_path_factory.mktemp("served")
    simulate(SimConfig(seed=5, n_users=1_200, n_items=500, n_events=120_000), base / "sim")
    run(base, [base / "sim" / "events"], CONF / "signals" / "simulator.yaml")
    uri = f"sqlite:///{base / 'mlruns.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.chdir(base)
        cfg = build_model(
            TrainConfig,
            {
                "data": str(base / "out"),
                "model": {"family": "mf", "dim": 16},
                "trainer": {"max_epochs": 4, "batch_size": 1024, "lr": 0.01},
                "eval": {"ks": [10, 20]},
            },
            "test",
        )
        result = train(cfg, quiet=True)
        bundle = build_bundle(
            IndexConfig(run_id=result.run_id, models_dir=str(base / "models"), name="v1")
        )
    return {
        "etl": base / "out",
        "store": uri,
        "run_id": result.run_id,
        "bundle": bundle.path,
        "models": base / "models",
        "base": base,
    }


def _started_or_skip(module: str, extra: str, what: str, start: Callable[[], T]) -> T:
    """`start()` (a server the tests need), or skip saying why: its Python package is not
    installed, or it could not be started here."""
    import importlib

    try:
        importlib.import_module(module)
    except ModuleNotFoundError:
        pytest.skip(f"{module} is not installed: pip install 'recfb[{extra}]'")
    try:
        return start()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"no {what} could be started here: {exc}")


@pytest.fixture(scope="session")
def pg_server():
    """A real PostgreSQL server for the session (tests/pgserver.py), or skip saying why."""
    from pgserver import PgServer

    server = _started_or_skip("psycopg", "postgres", "PostgreSQL server", PgServer)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster (recfb.distributed.local) for the session, or skip saying why.
    Drivers in this process and the commands the tests start join it by its address."""

    def start():
        from recfb.distributed.local import LocalCluster

        return LocalCluster()

    cluster = _started_or_skip("ray", "ray", "Ray cluster", start)
    import ray

    from recfb.distributed.local import ENV

    with pytest.MonkeyPatch.context() as patch:
        for name, value in ENV.items():
            patch.setenv(name, value)
        yield cluster
        if ray.is_initialized():  # this process joined it as a driver (in-process engine calls)
            ray.shutdown()
        cluster.stop()

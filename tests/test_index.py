"""FAISS index choice, recall against exact search, and the bundle's integrity checks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest

from recfb.errors import RecfbError
from recfb.index import (
    BundleError,
    IndexConfig,
    build_bundle,
    build_index,
    choose_factory,
    gpu_available,
    load_bundle,
    recall_at_k,
)
from recfb.index.ann import build_measured, exact_topk


def clustered(n: int, d: int = 16, clusters: int = 20, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d))
    x = centres[rng.integers(0, clusters, n)] + 0.3 * rng.normal(size=(n, d))
    return x.astype(np.float32)


def test_size_rule_picks_exact_below_threshold_and_hnsw_above():
    cfg = IndexConfig(exact_below=1000)
    assert choose_factory(999, cfg, on_gpu=False) == ("Flat", None)
    assert choose_factory(1000, cfg, on_gpu=False) == ("HNSW32,Flat", "efSearch=128")
    factory, params = choose_factory(1_000_000, cfg, on_gpu=True)
    assert factory.startswith("IVF") and params.startswith("nprobe=")
    assert choose_factory(10, IndexConfig(factory="IVF4,Flat"), False) == ("IVF4,Flat", None)


def test_exact_index_matches_brute_force_and_hnsw_recalls_clustered_vectors():
    items, queries = clustered(3000), clustered(200, seed=1)
    flat = build_index(items, IndexConfig(exact_below=10_000))
    assert flat.factory == "Flat"
    truth = np.argsort(-(queries @ items.T), axis=1)[:, :10]
    assert recall_at_k(flat.index, queries, items, 10) == 1.0
    # the exact reference itself agrees with numpy's brute force
    ref = exact_topk(queries, items, 10)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ref, truth, strict=True)])
    assert overlap > 0.99
    hnsw, recall = build_measured(items, queries, IndexConfig(exact_below=0))
    assert (hnsw.factory, hnsw.search_params) == ("HNSW32,Flat", "efSearch=128")
    assert recall >= 0.95
    assert recall == recall_at_k(hnsw.index, queries, items, 20)


def test_both_hnsw_forms_return_exact_inner_product_scores():
    items, queries = clustered(2000), clustered(50, seed=1)
    for l2 in (False, True):
        built = build_index(items, IndexConfig(exact_below=0, ef_search=512), l2=l2)
        assert (built.index.augment is not None) == l2
        scores, rows = built.index.search(queries, 5)
        expected = np.einsum("qd,qkd->qk", queries, items[rows])
        assert np.allclose(scores, expected, rtol=1e-3, atol=1e-3)


def test_a_coarse_index_has_measurably_lower_recall():
    items, queries = clustered(3000), clustered(200, seed=1)
    coarse = build_index(items, IndexConfig(factory="IVF64,Flat", search_params="nprobe=1"))
    assert recall_at_k(coarse.index, queries, items, 20) < 0.95


def test_bundle_holds_what_serving_needs(served_shop, monkeypatch, tmp_path: Path):
    bundle = load_bundle(served_shop["bundle"])
    m = bundle.manifest
    assert m["run_id"] == served_shop["run_id"] and m["schema_version"] == 1
    assert bundle.item_vectors.shape == (m["n_items"], m["dim"]) == (bundle.items.height, 16)
    assert bundle.user_vectors.shape[0] == bundle.users.height == m["n_users"]
    assert m["index"]["factory"] == "Flat" and m["index"]["recall"] == 1.0
    assert bundle.index.ntotal == m["n_items"]
    assert m["foldin"]["positive"] > m["foldin"]["negative"]
    assert set(bundle.signals["signals"]) >= {"view", "click", "purchase", "refund"}
    assert {"item_id", "popularity"} <= set(bundle.items.columns)
    # a build's index metrics join the training run in MLflow
    monkeypatch.setenv("MLFLOW_TRACKING_URI", served_shop["store"])
    name = f"tagged-{tmp_path.name}"
    build_bundle(IndexConfig(run_id=m["run_id"], models_dir=str(tmp_path), name=name))
    mlflow.set_tracking_uri(served_shop["store"])
    run = mlflow.get_run(served_shop["run_id"])
    assert run.data.metrics["index/recall_at_20"] == 1.0
    assert run.data.tags["index.bundle"] == name


def test_corrupt_or_incomplete_bundle_is_refused(served_shop, tmp_path: Path):
    copy = tmp_path / "copy"
    shutil.copytree(served_shop["bundle"], copy)
    load_bundle(copy)  # intact copy loads
    vectors = np.load(copy / "item_vectors.npy")
    vectors[0, 0] += 1.0
    np.save(copy / "item_vectors.npy", vectors)
    with pytest.raises(BundleError, match="item_vectors.npy fails its checksum"):
        load_bundle(copy)
    shutil.copy(served_shop["bundle"] / "item_vectors.npy", copy / "item_vectors.npy")
    load_bundle(copy)
    (copy / "index.faiss").unlink()
    with pytest.raises(BundleError, match="index.faiss"):
        load_bundle(copy)
    manifest = json.loads((served_shop["bundle"] / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps(manifest | {"schema_version": 99}))
    with pytest.raises(BundleError, match="schema_version 99"):
        load_bundle(copy)
    with pytest.raises(BundleError, match="manifest.json missing"):
        load_bundle(tmp_path)


def test_build_below_recall_floor_is_not_published(served_shop, monkeypatch, tmp_path: Path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", served_shop["store"])
    cfg = IndexConfig(
        run_id=served_shop["run_id"],
        models_dir=str(tmp_path / "models"),
        name="coarse",
        factory="IVF32,Flat",
        search_params="nprobe=1",
        recall_floor=0.99,
    )
    with pytest.raises(RecfbError, match="below index.recall_floor=0.99; not published"):
        build_bundle(cfg)
    assert not (tmp_path / "models" / "coarse").exists()


@pytest.mark.skipif(not gpu_available(), reason="no GPU or faiss-gpu here (CI is CPU-only)")
def test_gpu_build_matches_cpu_recall():
    items, queries = clustered(20_000), clustered(200, seed=1)
    built = build_index(items, IndexConfig(device="gpu", exact_below=0))
    assert built.device == "gpu"
    assert recall_at_k(built.index, queries, items, 20) >= 0.95

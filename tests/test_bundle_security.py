"""Bundles are authentic: signed manifests, file names confined to the bundle, a swap endpoint
that only takes the model store or the registry, and a default bundle the gate passed."""

from __future__ import annotations

import json
import os
import shutil
import stat
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recfb.index import IndexConfig
from recfb.index.bundle import (
    BundleError,
    BundleParts,
    load_bundle,
    sha256,
    sign_manifest,
    verify,
    write_bundle,
    write_gate_verdict,
)

KEY = "admin-key"


def small_bundle(models: Path, name: str, seed: int = 0) -> Path:
    """A real (tiny) vector bundle: 40 items, 30 users, exact index."""
    rng = np.random.default_rng(seed)
    items, users = 40, 30
    parts = BundleParts(
        items=pl.DataFrame(
            {
                "item_idx": pl.Series(range(items), dtype=pl.UInt32),
                "item_id": [f"i{i}" for i in range(items)],
                "popularity": [1] * items,
            }
        ),
        users=pl.DataFrame(
            {
                "user_idx": pl.Series(range(users), dtype=pl.UInt32),
                "user_id": [f"u{u}" for u in range(users)],
            }
        ),
        item_vectors=rng.normal(size=(items, 8)).astype(np.float32),
        user_vectors=rng.normal(size=(users, 8)).astype(np.float32),
        seen=pl.DataFrame(
            {
                "user_idx": pl.Series([0], dtype=pl.UInt32),
                "item_idx": pl.Series([0], dtype=pl.UInt32),
                "label": [1],
            }
        ),
        signals={"note": "not read by these tests"},
        levels={"1": "click"},
        family="mf",
    )
    cfg = IndexConfig(models_dir=str(models), name=name, factory="Flat", recall_sample=30)
    return write_bundle(parts, cfg).path


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    return small_bundle(tmp_path / "models", "b1")


def rewrite_manifest(path: Path, change) -> dict:
    manifest = json.loads((path / "manifest.json").read_text())
    change(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def test_a_signed_bundle_loads_and_its_key_file_is_private(bundle, bundle_key_dir):
    assert (bundle / "manifest.sig").is_file()
    loaded = load_bundle(bundle, device="cpu")
    assert loaded.items.height == 40
    mode = stat.S_IMODE((bundle_key_dir / "bundle.key").stat().st_mode)
    assert mode == 0o600


def test_a_tampered_and_rehashed_bundle_is_refused(bundle):
    items = pl.read_parquet(bundle / "items.parquet")
    items.with_columns(pl.lit("evil").alias("item_id")).write_parquet(bundle / "items.parquet")
    digest = sha256(bundle / "items.parquet")
    rewrite_manifest(bundle, lambda m: m["files"].__setitem__("items.parquet", digest))
    with pytest.raises(BundleError, match="signature does not match"):
        load_bundle(bundle, device="cpu")


def test_unsigned_bundles_are_refused_unless_the_insecure_switch_is_on(bundle, monkeypatch):
    (bundle / "manifest.sig").unlink()
    with pytest.raises(BundleError, match=r"manifest.sig missing \(unsigned\)"):
        verify(bundle)
    assert verify(bundle, allow_unsigned=True)["name"] == "b1"
    monkeypatch.setenv("RECFB_ALLOW_UNSIGNED", "1")
    assert load_bundle(bundle, device="cpu").version == "b1"


def test_a_bundle_signed_with_another_key_is_refused(bundle, monkeypatch):
    monkeypatch.setenv("RECFB_BUNDLE_KEY", "another-host-key-0123456789")
    with pytest.raises(BundleError, match="not this host's key"):
        verify(bundle)


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink"])
def test_a_manifest_naming_a_file_outside_its_directory_is_refused(bundle, tmp_path, kind):
    outside = tmp_path / "secret.txt"
    outside.write_text("not part of any bundle")
    if kind == "absolute":
        name = str(outside)
    elif kind == "dotdot":
        shutil.copy(outside, bundle.parent / "x")
        name = "../x"
    else:
        os.symlink(outside, bundle / "link.txt")
        name = "link.txt"
    # even a manifest signed with the right key may not name it
    manifest = rewrite_manifest(bundle, lambda m: m["files"].__setitem__(name, sha256(outside)))
    sign_manifest(bundle, manifest)
    with pytest.raises(BundleError, match="outside the bundle directory"):
        verify(bundle)


# --- the swap endpoint ------------------------------------------------------------------------
@pytest.fixture
def admin(tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from recfb.serving import ServeConfig, create_app

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'no-registry.db'}")
    models = tmp_path / "models"
    cfg = ServeConfig(models_dir=str(models), event_log=str(tmp_path / "events.db"))
    with TestClient(create_app(cfg, KEY), headers={"X-API-Key": KEY}) as client:
        small_bundle(models, "inside")  # after start: the server has no bundle of its own
        yield client, models


def test_the_swap_refuses_paths_outside_models_dir_uniformly(admin, tmp_path):
    client, models = admin
    elsewhere = small_bundle(tmp_path / "elsewhere", "outside")  # a valid, signed bundle
    answers = []
    for path in [str(elsewhere), "/etc", "/no/such/dir", f"{models}/../elsewhere/outside"]:
        r = client.post("/v1/admin/bundle", json={"path": path})
        answers.append((r.status_code, r.json()["detail"][0]["msg"]))
    assert answers[0][0] == 422
    assert len(set(answers)) == 1, answers  # nothing tells an existing path from a missing one
    assert "/etc" not in answers[0][1] and "no/such" not in answers[0][1]
    r = client.post("/v1/admin/bundle", json={"path": str(models / "inside")})
    assert r.status_code == 202, r.text


# --- which bundle a server starts on ----------------------------------------------------------
def serve_cfg(models: Path, **extra):
    from recfb.serving import ServeConfig

    return ServeConfig(models_dir=str(models), **extra)


def test_without_a_registry_serve_skips_a_bundle_the_gate_rejected(tmp_path, monkeypatch):
    from recfb.serving.service import startup_bundle

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'absent.db'}")
    models = tmp_path / "models"
    old = small_bundle(models, "old")
    time.sleep(0.01)
    new = small_bundle(models, "new", seed=1)
    write_gate_verdict(new, False, "ndcg@10 worse than production", "recfb", "2")
    assert startup_bundle(serve_cfg(models), None) == old
    # a verdict edited to `passed` without the key is no verdict: still rejected
    verdict = json.loads((new / "gate.json").read_text()) | {"gate": "passed"}
    (new / "gate.json").write_text(json.dumps(verdict))
    assert startup_bundle(serve_cfg(models), None) == old
    assert not (tmp_path / "absent.db").exists()  # asking created no store


def test_serve_defaults_to_the_registry_production_version(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from recfb.serving.service import startup_bundle

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns.db'}")
    models = tmp_path / "models"
    prod = small_bundle(models, "prod")
    time.sleep(0.01)
    newest = small_bundle(models, "never-judged", seed=2)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    client.create_registered_model("recfb")
    version = client.create_model_version("recfb", source=str(prod))
    # the registry knows the model but no alias yet: an unjudged bundle is not served
    assert startup_bundle(serve_cfg(models), None) is None
    write_gate_verdict(prod, True, "first model", "recfb", version.version)
    assert startup_bundle(serve_cfg(models), None) == prod
    client.set_registered_model_alias("recfb", "production", version.version)
    assert Path(startup_bundle(serve_cfg(models), None)) == prod
    assert newest.is_dir()

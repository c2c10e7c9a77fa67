"""The serving speed-ups keep every answer: the fast path of the plain recommendations GET
gives the route's bytes, memory-mapped bundles search alike and are still verified, and
several worker processes share one event log and sum their metrics."""

from __future__ import annotations

import importlib.util
import json
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest

from recfb.errors import RecfbError

ROOT = Path(__file__).resolve().parents[1]
KEY = "speed-key"
ROUTE = "/v1/users/{user_id}/recommendations"


def loadtest_module():
    """serving/loadtest.py (a script, not a package): its synthetic bundles of real shapes."""
    spec = importlib.util.spec_from_file_location("loadtest", ROOT / "serving" / "loadtest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("speed")
    lt = loadtest_module()
    return {
        "one_stage": lt.synthetic_bundle(work, 3000, 400, 16),
        "two_stage": lt.synthetic_bundle(work, 3000, 400, 16, two_stage=True),
    }


def routed_count(metrics: str) -> float:
    """The latency histogram's count of 200s on the recommendations route."""
    return sum(
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("recfb_request_seconds_count")
        and f'route="{ROUTE}"' in line
        and 'status="200"' in line
    )


def events_for(users: list[str], now_ms: int) -> list[dict]:
    rng = np.random.default_rng(3)
    kinds = ["view", "click", "purchase", "dislike"]
    return [
        {
            "event_id": uuid.uuid4().hex,
            "user_id": u,
            "item_id": f"i{rng.integers(3000)}",
            "event": kinds[j % len(kinds)],
            "ts": now_ms - 60_000 * (j + 1),
        }
        for u in users
        for j in range(4)
    ]


@pytest.mark.parametrize("kind", ["one_stage", "two_stage"])
def test_the_fast_path_answers_byte_for_byte_as_the_route(bundles, kind, tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    import recfb.serving.fastpath as fastpath
    from recfb.serving import ServeConfig, create_app

    now = time.time()  # one clock for both servers: fold-in decay depends on it
    monkeypatch.setattr(time, "time", lambda: now)
    taken = []
    respond = fastpath.respond
    monkeypatch.setattr(fastpath, "respond", lambda *a: taken.append(1) or respond(*a))
    events = events_for(["u1", "u2", "a-new-visitor"], int(now * 1000))
    answers = {}
    for fast in (True, False):
        cfg = ServeConfig(
            bundle=str(bundles[kind]), event_log=str(tmp_path / f"{fast}.db"), fast_path=fast
        )
        with TestClient(create_app(cfg, KEY), headers={"X-API-Key": KEY}) as client:
            client.post("/v1/events", json={"events": events}).raise_for_status()
            out = []
            for user in ["u1", "u2", "u3", "a-new-visitor", "x%2Fy", "é"]:
                for query in ["", "?k=1", "?k=7", "?k=500", "?k=501", "?k=0", "?k=05", "?k=3&k=4"]:
                    r = client.get(f"/v1/users/{user}/recommendations{query}")
                    out.append((user, query, r.status_code, r.headers["content-type"], r.content))
            r = client.get(f"/v1/users/{'u' * 257}/recommendations")
            out.append(("long", "", r.status_code, r.headers["content-type"], r.content))
            answers[fast] = out
            metrics = client.get("/metrics").text
        if fast:
            # the plain ones (no k, 1, 7, 500) took the fast path; x%2Fy is x/y: no such route
            assert len(taken) == 5 * 4
            # both kinds count on the route's label: 5 users x 6 queries answered 200
            # (FastAPI reads k=05 as 5, and k=3&k=4 as its last k)
            assert routed_count(metrics) == 5 * 6
    assert answers[True] == answers[False]
    statuses = {(q, s) for _, q, s, _, _ in answers[True]}
    assert ("?k=501", 422) in statuses and ("?k=0", 422) in statuses
    assert json.loads(answers[True][0][4])["items"]  # not an empty answer compared to another


def test_a_memory_mapped_bundle_searches_alike_and_is_still_verified(bundles, tmp_path):
    import shutil

    from recfb.index import load_bundle

    plain = load_bundle(bundles["one_stage"])
    mapped = load_bundle(bundles["one_stage"], mmap=True)
    assert isinstance(mapped.item_vectors, np.memmap)
    q = plain.user_vectors[:50]
    assert np.array_equal(mapped.item_vectors, plain.item_vectors)
    for a, b in zip(plain.index.search(q, 20), mapped.index.search(q, 20), strict=True):
        assert np.array_equal(a, b)
    copy = tmp_path / "copy"
    shutil.copytree(bundles["one_stage"], copy)
    vectors = np.load(copy / "item_vectors.npy")
    vectors[0, 0] += 1.0
    np.save(copy / "item_vectors.npy", vectors)
    with pytest.raises(RecfbError, match="checksum"):
        load_bundle(copy, mmap=True)


@pytest.mark.parametrize("factory", ["HNSW16,Flat", "IVF16,Flat"])
def test_memory_mapped_graph_and_inverted_indexes_search_alike(factory, tmp_path):
    import faiss

    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 16)).astype(np.float32)
    index = faiss.index_factory(16, factory, faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    index.add(x)
    faiss.write_index(index, str(tmp_path / "index.faiss"))
    mapped = faiss.read_index(str(tmp_path / "index.faiss"), faiss.IO_FLAG_MMAP_IFC)
    for a, b in zip(index.search(x[:20], 10), mapped.search(x[:20], 10), strict=True):
        assert np.array_equal(a, b)


def test_several_workers_share_the_event_log_and_sum_their_metrics(bundles, tmp_path):
    from tests.test_serving import Server

    log = tmp_path / "events.db"
    server = Server(bundles["one_stage"], log, "--set", "workers=2")
    server_key = {"X-API-Key": "test-key"}  # tests.test_serving.Server's key
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            first = client.get("/v1/users/u5/recommendations?k=10").json()["items"][0]["item_id"]
            disliked = {
                "event_id": uuid.uuid4().hex,
                "user_id": "u5",
                "item_id": first,
                "event": "dislike",
            }
            r = client.post("/v1/events", json={"events": [disliked]}, headers=server_key)
            assert r.status_code == 200, r.text
            # fresh connections: uvicorn hands them to either worker; every one reads the
            # event log the other may have written (the ids: scores move with the clock)
            answers = set()
            for _ in range(20):
                with httpx.Client(base_url=server.url, timeout=30) as fresh:
                    body = fresh.get("/v1/users/u5/recommendations?k=10").json()
                answers.add(tuple(i["item_id"] for i in body["items"]))
            assert len(answers) == 1 and first not in next(iter(answers))
            assert routed_count(client.get("/metrics").text) == 21
            r = client.post("/v1/admin/bundle", json={"path": "x"}, headers=server_key)
            assert r.status_code == 409 and "worker processes" in r.text
    finally:
        server.stop()

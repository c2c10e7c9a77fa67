"""The retrieval API as users meet it: a real server in a subprocess, spoken to over HTTP."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import polars as pl
import pytest

from recfb.index import IndexConfig, build_bundle

from conftest import free_port

KEY = "test-key"
ROOT = Path(__file__).resolve().parents[1]


class Server:
    """`recfb serve` in a subprocess on 127.0.0.1; stopped (or killed) by the test."""

    def __init__(
        self, bundle: Path, event_log: Path | str, *extra: str, output: Path | None = None
    ) -> None:
        """`event_log`: a SQLite file (the server's output goes beside it) or a PostgreSQL
        URI (then `output` names the directory for the server's output)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        if output is None:
            self.log_file = Path(event_log).with_suffix(f".{self.port}.log")
        else:
            self.log_file = output / f"server.{self.port}.log"
        cmd = [
            sys.executable,
            "-m",
            "recfb.cli",
            "serve",
            "--bundle",
            str(bundle),
            "--set",
            f"port={self.port}",
            "--set",
            f"event_log={event_log}",
            "--set",
            "log_level=warning",
            *extra,
        ]
        env = os.environ | {"RECFB_API_KEY": KEY}
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=self.log_file.open("w"), stderr=subprocess.STDOUT
        )
        deadline = time.time() + 90
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_file.read_text()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not ready in 90 s: {self.log_file.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def server(served_shop, tmp_path_factory) -> Iterator[Server]:
    srv = Server(served_shop["bundle"], tmp_path_factory.mktemp("log") / "events.db")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def ids(body: dict) -> list[str]:
    return [x["item_id"] for x in body["items"]]


def event(user: str, item: str, kind: str, **extra) -> dict:
    return {"event_id": uuid.uuid4().hex, "user_id": user, "item_id": item, "event": kind} | extra


def post(client: httpx.Client, events: list[dict]) -> httpx.Response:
    return client.post("/v1/events", json={"events": events}, headers={"X-API-Key": KEY})


def ingest_until(
    url: str,
    stop: threading.Event,
    acknowledged: list[str],
    batch_of: Callable[[int], list[dict]],
) -> None:
    """POST `batch_of(n)` for n = 0, 1, ... until `stop` is set or the server dies, adding
    the event_ids of every acknowledged (200) batch to `acknowledged`."""
    with httpx.Client(base_url=url, headers={"X-API-Key": KEY}, timeout=10) as c:
        n = 0
        while not stop.is_set():
            batch = batch_of(n)
            n += 1
            try:
                r = c.post("/v1/events", json={"events": batch})
            except httpx.HTTPError:
                return  # the server died mid-request: not acknowledged
            if r.status_code == 200:
                acknowledged.extend(e["event_id"] for e in batch)


def known_user(shop: dict, rank: int = 0) -> str:
    """A user with many training pairs (so the bundle has a vector worth folding into)."""
    train = pl.read_parquet(shop["etl"] / "train.parquet")
    users = pl.read_parquet(shop["etl"] / "users.parquet")
    top = train.group_by("user_idx").len().sort(["len", "user_idx"], descending=True)
    idx = top["user_idx"][rank]
    return users.filter(pl.col("user_idx") == idx)["user_id"][0]


def test_recommendations_for_a_known_user_follow_the_bundle(client, served_shop):
    user = known_user(served_shop)
    r = client.get(f"/v1/users/{user}/recommendations", params={"k": 15})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["source"] == "model" and body["bundle_version"] == "v1"
    assert len(body["items"]) == 15 and len(set(ids(body))) == 15
    scores = [x["score"] for x in body["items"]]
    assert scores == sorted(scores, reverse=True)
    # the scores are the bundle's inner products for this user, and nothing purchased is shown
    items = pl.read_parquet(served_shop["bundle"] / "items.parquet")
    users = pl.read_parquet(served_shop["bundle"] / "users.parquet")
    u = users.filter(pl.col("user_id") == user)["user_idx"][0]
    uvec = np.load(served_shop["bundle"] / "user_vectors.npy")[u]
    ivec = np.load(served_shop["bundle"] / "item_vectors.npy")
    row = dict(zip(items["item_id"], items["item_idx"], strict=True))
    expected = [float(ivec[row[i]] @ uvec) for i in ids(body)]
    assert np.allclose(scores, expected, atol=1e-4)
    seen = pl.read_parquet(served_shop["bundle"] / "seen.parquet")
    bought = set(seen.filter((pl.col("user_idx") == u) & (pl.col("label") == 4))["item_idx"])
    assert not bought & {row[i] for i in ids(body)}
    # `exclude` removes what the caller names
    first = ids(body)[0]
    again = client.get(f"/v1/users/{user}/recommendations", params={"k": 15, "exclude": first})
    assert first not in ids(again.json())


def test_unknown_user_gets_popularity_and_similar_items_work(client, served_shop):
    items = pl.read_parquet(served_shop["bundle"] / "items.parquet").sort(
        ["popularity", "item_idx"], descending=[True, False]
    )
    body = client.get("/v1/users/nobody-like-this/recommendations", params={"k": 5}).json()
    assert body["source"] == "popularity"
    assert ids(body) == items["item_id"].head(5).to_list()
    item = items["item_id"][0]
    sim = client.get(f"/v1/items/{item}/similar", params={"k": 7})
    assert sim.status_code == 200
    assert len(ids(sim.json())) == 7 and item not in ids(sim.json())
    assert client.get("/v1/items/no-such-item/similar").status_code == 404


@pytest.mark.parametrize(
    "method,path,kwargs,field",
    [
        ("get", "/v1/users/u/recommendations", {"params": {"k": 0}}, "k"),
        ("get", "/v1/users/u/recommendations", {"params": {"k": 100_000}}, "k"),
        ("get", "/v1/users/u/recommendations", {"params": {"k": "ten"}}, "k"),
        ("post", "/v1/recommendations", {"json": {"user_ids": []}}, "user_ids"),
        ("post", "/v1/recommendations", {"json": {"user_ids": ["a"] * 2000}}, "user_ids"),
        ("post", "/v1/events", {"json": {"events": [{"user_id": "u"}]}}, "event_id"),
        ("post", "/v1/events", {"json": {"events": [event("u", "i", "teleport")]}}, "event"),
        ("post", "/v1/events", {"json": {"events": [event("u", "i", "view", ts="soon")]}}, "ts"),
        ("post", "/v1/events", {"content": b"not json"}, None),
    ],
)
def test_bad_requests_get_422_naming_the_field(client, method, path, kwargs, field):
    r = client.request(method.upper(), path, headers={"X-API-Key": KEY}, **kwargs)
    assert r.status_code == 422, r.text
    if field is not None:
        locs = [d["loc"] for d in r.json()["detail"]]
        assert any(field in loc for loc in locs), locs


def test_writes_need_the_api_key(client):
    assert client.post("/v1/events", json={"events": [event("u", "i", "view")]}).status_code == 401
    r = client.post(
        "/v1/events", json={"events": [event("u", "i", "view")]}, headers={"X-API-Key": "no"}
    )
    assert r.status_code == 401
    assert client.get("/v1/admin/bundle").status_code == 401


def test_events_are_idempotent_on_event_id(client):
    batch = [event("idem-user", "i1", "view"), event("idem-user", "i2", "view")]
    first, second = post(client, batch).json(), post(client, batch).json()
    assert first == {"accepted": 2, "new": 2}
    assert second == {"accepted": 2, "new": 0}


def test_fresh_events_change_the_next_recommendations(client, served_shop):
    user = known_user(served_shop, rank=3)
    before = client.get(f"/v1/users/{user}/recommendations", params={"k": 20}).json()
    # engage deeply with items from the far end of the list: their neighbours should rise
    items = pl.read_parquet(served_shop["bundle"] / "items.parquet")
    ivec = np.load(served_shop["bundle"] / "item_vectors.npy")
    target = items["item_id"][int(np.argmax(ivec[:, 0]))]
    neighbours = ids(client.get(f"/v1/items/{target}/similar", params={"k": 20}).json())
    engaged = [target, *neighbours[:2]]
    r = post(client, [event(user, i, kind) for i in engaged for kind in ("click", "cart")])
    assert r.status_code == 200
    after = client.get(f"/v1/users/{user}/recommendations", params={"k": 20}).json()
    assert ids(after) != ids(before)
    overlap_before = len(set(ids(before)) & set(neighbours))
    overlap_after = len(set(ids(after)) & set(neighbours))
    assert overlap_after > overlap_before, (overlap_before, overlap_after)
    # a dislike pushes an item out at once; a purchase too (the default exclusion)
    top = ids(after)[0]
    post(client, [event(user, top, "dislike")])
    assert top not in ids(client.get(f"/v1/users/{user}/recommendations").json())
    second = ids(after)[1]
    post(client, [event(user, second, "purchase", order_id="o-1")])
    assert second not in ids(client.get(f"/v1/users/{user}/recommendations").json())


def test_a_new_user_is_served_from_the_session(client, served_shop):
    items = pl.read_parquet(served_shop["bundle"] / "items.parquet")
    anchor = items["item_id"][10]
    neighbours = ids(client.get(f"/v1/items/{anchor}/similar", params={"k": 30}).json())
    user = f"new-{uuid.uuid4().hex[:6]}"
    post(client, [event(user, anchor, "click"), event(user, anchor, "cart")])
    body = client.get(f"/v1/users/{user}/recommendations", params={"k": 10}).json()
    assert body["source"] == "session"
    assert len(set(ids(body)) & set(neighbours)) >= 5


def test_batch_recommendations_and_metrics(client, served_shop):
    users = [known_user(served_shop, 0), "nobody"]
    r = client.post("/v1/recommendations", json={"user_ids": users, "k": 3})
    assert r.status_code == 200
    results = r.json()["results"]
    assert [x["source"] for x in results] == ["model", "popularity"]
    assert all(len(x["items"]) == 3 for x in results)
    text = client.get("/metrics").text
    assert (
        'recfb_request_seconds_count{method="GET",route="/v1/users/{user_id}/recommendations"'
        in text
    )
    assert 'recfb_stage_seconds_count{stage="search"}' in text
    assert 'recfb_bundle_info{version="v1"} 1.0' in text
    assert client.get("/openapi.json").json()["paths"]["/v1/events"]


class RequestLoops:
    """`n` threads asking for one user's recommendations until stopped; records every status
    and every bundle version answered (for swaps under load)."""

    def __init__(self, url: str, user: str, n: int) -> None:
        self.url, self.user = url, user
        self.statuses: list[int] = []
        self.versions: set[str] = set()
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(n)
        self._futures = [self._pool.submit(self._loop) for _ in range(n)]

    def _loop(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as c:
            while not self._stop.is_set():
                r = c.get(f"/v1/users/{self.user}/recommendations")
                self.statuses.append(r.status_code)
                if r.status_code == 200:
                    self.versions.add(r.json()["bundle_version"])

    def stop(self) -> None:
        self._stop.set()
        for f in self._futures:
            f.result()
        self._pool.shutdown()


def wait_for_bundle(admin: httpx.Client, version: str, timeout: float = 60.0) -> dict:
    """Poll the admin status until `version` is served; returns the status."""
    deadline = time.time() + timeout
    while (status := admin.get("/v1/admin/bundle").json())["bundle_version"] != version:
        assert time.time() < deadline, status
        time.sleep(0.1)
    return status


def test_hot_swap_under_concurrent_requests_has_no_errors(served_shop, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", served_shop["store"])
    v2 = build_bundle(
        IndexConfig(run_id=served_shop["run_id"], models_dir=str(served_shop["models"]), name="v2")
    ).path
    # the swap takes bundles of the server's model store only
    models = f"models_dir={served_shop['models']}"
    srv = Server(served_shop["bundle"], tmp_path / "events.db", "--set", models)
    loops = RequestLoops(srv.url, known_user(served_shop), 4)
    try:
        time.sleep(1.0)
        with httpx.Client(base_url=srv.url, headers={"X-API-Key": KEY}) as admin:
            assert admin.post("/v1/admin/bundle", json={"path": str(v2)}).status_code == 202
            wait_for_bundle(admin, "v2")
        time.sleep(1.0)
    finally:
        loops.stop()
        srv.stop()
    assert len(loops.statuses) > 20 and set(loops.statuses) == {200}
    assert loops.versions == {"v1", "v2"}


def test_kill_9_during_ingestion_loses_no_acknowledged_event(served_shop, tmp_path):
    log_path = tmp_path / "events.db"
    srv = Server(served_shop["bundle"], log_path)
    acknowledged: list[str] = []
    stop = threading.Event()

    def batch_of(n: int) -> list[dict]:
        return [event(f"k{n}", "x", "view") for _ in range(50)]

    writer = threading.Thread(target=ingest_until, args=(srv.url, stop, acknowledged, batch_of))
    writer.start()
    time.sleep(2.0)
    srv.proc.send_signal(signal.SIGKILL)
    srv.proc.wait()
    stop.set()
    writer.join()
    assert len(acknowledged) >= 100
    restarted = Server(served_shop["bundle"], log_path)
    try:
        with sqlite3.connect(log_path) as db:
            stored = {r[0] for r in db.execute("SELECT event_id FROM events")}
        assert set(acknowledged) <= stored, len(set(acknowledged) - stored)
        # and the restarted server reads the same log
        with httpx.Client(base_url=restarted.url) as c:
            assert post(c, [event("k0", "x", "view")]).status_code == 200
    finally:
        restarted.stop()


def test_server_refuses_a_corrupt_bundle(served_shop, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(served_shop["bundle"], bad)
    (bad / "seen.parquet").write_bytes(b"garbage")
    proc = subprocess.run(
        [sys.executable, "-m", "recfb.cli", "serve", "--bundle", str(bad)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "seen.parquet fails its checksum" in proc.stderr


def test_the_event_log_is_an_input_of_the_next_etl(served_shop, tmp_path):
    """Online events close the loop: the ETL reads the log like any canonical file."""
    from recfb.serving import EventLog

    from conftest import CONF, run

    log = EventLog(tmp_path / "events.db")
    rows = [
        ("e1", "u1", "i1", "click", 1_767_225_600_000, 12.0, None),
        ("e2", "u1", "i1", "purchase", 1_767_225_700_000, 9.5, "o1"),
        ("e3", "u2", "i1", "view", 1_767_225_800_000, None, None),
        ("e4", "u2", "i2", "teleport", 1_767_225_900_000, None, None),  # quarantined
    ]
    assert log.append(rows) == 4 and log.append(rows[:1]) == 0
    log.close()
    stats = run(tmp_path, [tmp_path / "events.db"], CONF / "signals" / "simulator.yaml")
    rec = stats["reconciliation"]
    assert rec["rows_in"] == 4 and rec["balanced"]
    assert sum(rec["quarantined"].values()) == 1
    pairs = pl.concat(
        [pl.read_parquet(tmp_path / "out" / f"{s}.parquet") for s in ("train", "valid", "test")]
    )
    # the temporal split may put the click and the later purchase of (u1, i1) in two splits
    assert pairs.select("user_idx", "item_idx").unique().height == 2
    assert pairs["label"].max() == 4
    quarantined = pl.read_parquet(tmp_path / "out" / "quarantine.parquet")
    assert quarantined["event_id"].to_list() == ["e4"]


def test_fuzzing_the_openapi_description_finds_no_server_error(server: Server):
    """schemathesis generates valid and invalid requests for every operation of /openapi.json:
    none may answer 5xx or hang (each request has a 10 s limit)."""
    st = Path(sys.executable).with_name("schemathesis")
    if not st.exists():
        pytest.skip("schemathesis is not installed (it comes with the dev extra)")
    proc = subprocess.run(
        [
            str(st),
            "run",
            f"{server.url}/openapi.json",
            "--checks",
            "not_a_server_error",
            "--max-examples",
            "25",
            "--request-timeout",
            "10",
            "--header",
            f"X-API-Key: {KEY}",
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "Tested: 10" in proc.stdout  # every operation was exercised
    generated = re.search(r"(\d+) generated, (\d+) passed", proc.stdout)
    assert generated and int(generated.group(1)) >= 100, proc.stdout[-2000:]
    assert generated.group(1) == generated.group(2)


def test_category_filter_keeps_only_that_category(client, served_shop):
    items = pl.read_parquet(served_shop["bundle"] / "items.parquet")
    category = items["category"].drop_nulls().mode()[0]
    members = set(items.filter(pl.col("category") == category)["item_id"])
    user = known_user(served_shop)
    body = client.get(
        f"/v1/users/{user}/recommendations", params={"k": 5, "category": str(category)}
    ).json()
    assert len(body["items"]) == 5 and set(ids(body)) <= members
    empty = client.get(f"/v1/users/{user}/recommendations", params={"category": "no-such"})
    assert empty.status_code == 200 and empty.json()["items"] == []


def test_both_filter_paths_rank_the_same(served_shop):
    """A narrow filter is scored exactly; a wide one over-fetches from the index: same list."""
    from recfb.index import load_bundle
    from recfb.serving import ServeConfig
    from recfb.serving.retrieval import ServingBundle, Timings

    bundle = load_bundle(served_shop["bundle"])
    exact = ServingBundle(bundle, ServeConfig(exact_filter_below=10**9))
    fetched = ServingBundle(bundle, ServeConfig(exact_filter_below=0))
    category = next(iter(exact.category))
    query = bundle.user_vectors[0]
    a = exact.rank(query, 10, {1, 2, 3}, category, Timings())
    b = fetched.rank(query, 10, {1, 2, 3}, category, Timings())
    assert a[0] == b[0] and np.allclose(a[1], b[1], atol=1e-4)
    assert set(a[0]) <= set(exact.category[category].tolist()) and not {1, 2, 3} & set(a[0])

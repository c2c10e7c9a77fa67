"""Delay-corrected item rates in the retrieval service: from the bundle's history and from
events posted to the running server; the NetCVR re-ranking blend."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import numpy as np
import polars as pl
import pytest

from recfb.serving.rates import RatesTable
from recfb.serving.retrieval import rerank

from test_serving import Server, event, post

DAY_MS = 86_400_000


@pytest.fixture(scope="module")
def rates_client(served_shop, tmp_path_factory) -> Iterator[httpx.Client]:
    # the shop's log is from January: "now" is its newest event, not the wall clock
    srv = Server(
        served_shop["bundle"],
        tmp_path_factory.mktemp("rates") / "events.db",
        "--set",
        "rates.clock=data",
        "--set",
        "rates.refresh_s=0.2",
    )
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        yield c
    srv.stop()


def cutoff_ms(shop: dict) -> int:
    return json.loads((shop["bundle"] / "delays.json").read_text())["cutoff_ms"]


def window_clicks(shop: dict, event: str = "click", days: int = 7) -> pl.DataFrame:
    """Events per item id in the days before the bundle's cut-off, from its files."""
    ev = pl.read_parquet(shop["bundle"] / "cascade_events.parquet")
    items = pl.read_parquet(shop["bundle"] / "items.parquet", columns=["item_idx", "item_id"])
    since = cutoff_ms(shop) - days * DAY_MS
    return (
        ev.filter((pl.col("event") == event) & (pl.col("ts").dt.epoch("ms") >= since))
        .group_by("item_idx")
        .len()
        .join(items, on="item_idx")
        .sort("len", descending=True)
    )


def test_rates_of_a_busy_item_come_from_the_bundle_history(rates_client, served_shop):
    busiest = window_clicks(served_shop).row(0, named=True)
    body = rates_client.get(f"/v1/items/{busiest['item_id']}/rates").json()
    assert body["clicks"] == busiest["len"]
    assert 0 < body["purchases"] <= body["clicks"]
    assert body["cvr_naive"] == pytest.approx(body["purchases"] / body["clicks"])
    # the youngest clicks may still convert: the correction only ever raises the rate here
    assert body["cvr_corrected"] >= body["cvr_naive"]
    assert body["netcvr_corrected"] <= body["cvr_corrected"]
    assert body["conversion_delay"]["family"] in {"exponential", "weibull", "lognormal"}
    assert rates_client.get("/v1/items/no-such-item/rates").status_code == 404


def wait_for(client: httpx.Client, path: str, ok, timeout: float = 30.0) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        body = client.get(path).json()
        if ok(body):
            return body
        time.sleep(0.2)
    raise AssertionError(f"{path} never satisfied the condition; last: {body}")


def test_posted_clicks_purchases_and_refunds_move_the_rates(rates_client, served_shop):
    busy = set(window_clicks(served_shop)["item_id"].to_list())
    busy |= set(window_clicks(served_shop, "purchase", 28)["item_id"].to_list())
    items = pl.read_parquet(served_shop["bundle"] / "items.parquet")["item_id"].to_list()
    quiet = next(i for i in items if i not in busy)  # no clicks or purchases in the windows
    t0 = cutoff_ms(served_shop) + 3_600_000
    iso = lambda ms: time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms / 1000))  # noqa: E731
    clicks = [event(f"rate-u{i}", quiet, "click", ts=iso(t0)) for i in range(40)]
    buys = [event(f"rate-u{i}", quiet, "purchase", ts=iso(t0 + 600_000)) for i in range(4)]
    assert post(rates_client, clicks + buys).status_code == 200
    path = f"/v1/items/{quiet}/rates"
    body = wait_for(rates_client, path, lambda b: b["clicks"] == 40)
    assert body["purchases"] == pytest.approx(4.0)  # one click per user: fully attributed
    assert body["cvr_naive"] == pytest.approx(0.1)
    # clicks 10 minutes old: most of their purchases are still to come
    assert body["cvr_corrected"] > 1.5 * body["cvr_naive"]
    assert body["refunds"] == 0
    refund = event("rate-u0", quiet, "refund", ts=iso(t0 + 1_200_000))
    assert post(rates_client, [refund]).status_code == 200
    body = wait_for(rates_client, path, lambda b: b["refunds"] == 1)
    assert body["purchases_in_window"] == 4
    assert body["refund_naive"] == pytest.approx(0.25)
    assert body["netcvr_corrected"] == pytest.approx(
        body["cvr_corrected"] * (1 - body["refund_corrected"])
    )


def test_rerank_blends_relevance_with_log_netcvr():
    netcvr = np.array([0.5, 0.01, 0.2, np.nan])
    table = RatesTable(pl.DataFrame(), 0, netcvr)
    rows, scores = [0, 1, 2, 3], [1.0, 3.0, 1.5, 2.0]
    assert rerank(rows, scores, table, 0.0, 1e-4, 4)[0] == [1, 3, 2, 0]  # weight 0: as scored
    got, blended = rerank(rows, scores, table, 1.0, 1e-4, 3)
    # 1 + ln .5 = 0.31, 3 + ln .01 = -1.61, 1.5 + ln .2 = -0.11, 2 + ln 1e-4 (no rate) = -7.2
    assert got == [0, 2, 1]
    assert blended[0] == pytest.approx(1.0 + np.log(0.5))


def test_the_bundle_carries_delay_models_and_the_run_their_plot(served_shop):
    from mlflow import MlflowClient

    manifest = json.loads((served_shop["bundle"] / "manifest.json").read_text())
    assert {"delays.json", "cascade_events.parquet"} <= set(manifest["files"])
    client = MlflowClient(tracking_uri=served_shop["store"])
    listed = {a.path for a in client.list_artifacts(served_shop["run_id"], "delays")}
    assert {"delays/delay_curves.png", "delays/delays.json"} <= listed
    metrics = client.get_run(served_shop["run_id"]).data.metrics
    # the simulator's click -> purchase delay: log-normal with a 2 h median
    assert metrics["delay/conversion_median_h"] == pytest.approx(2.0, rel=0.3)

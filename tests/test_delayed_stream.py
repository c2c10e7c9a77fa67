"""Sample emission for delayed-feedback training and the day-by-day replay."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import polars as pl
import pytest

from recfb.delayed.cvr import CvrConfig, rate_metrics, run_continuous
from recfb.delayed.stream import click_outcomes, emit, refund_trials

H = 3_600_000  # one hour in ms


def trials() -> pl.DataFrame:
    # converts inside a 1 h window / converts after 5 h / never converts
    return pl.DataFrame(
        {
            "user_idx": [0, 1, 2],
            "item_idx": [0, 0, 0],
            "trial_ms": [0, 0, 0],
            "outcome_ms": [H // 2, 5 * H, None],
        }
    )


def kinds(df: pl.DataFrame) -> list[tuple]:
    return sorted(zip(df["user_idx"], df["emit_ms"], df["label"], df["kind"], strict=True))


def test_emission_by_mode():
    end = 100 * H
    assert kinds(emit(trials(), "esdfm", H, end)) == [
        (0, H // 2, 1, "positive"),  # immediate positive, at its purchase
        (1, H, 0, "negative"),  # fake negative at the window's end ...
        (1, 5 * H, 1, "late"),  # ... and the late positive when it arrives
        (2, H, 0, "negative"),  # real negative
    ]
    assert kinds(emit(trials(), "naive", H, end)) == [
        (0, H // 2, 1, "positive"),
        (1, H, 0, "negative"),  # never corrected
        (2, H, 0, "negative"),
    ]
    assert kinds(emit(trials(), "fnw", H, end)) == [
        (0, 0, 0, "negative"),  # every click goes out at once as a negative
        (0, H // 2, 1, "late"),
        (1, 0, 0, "negative"),
        (1, 5 * H, 1, "late"),
        (2, 0, 0, "negative"),
    ]
    assert kinds(emit(trials(), "oracle", H, end)) == [  # the future, known at once
        (0, 0, 1, "matured"),
        (1, 0, 1, "matured"),
        (2, 0, 0, "matured"),
    ]
    assert kinds(emit(trials(), "wait", H, end, mature_ms=4 * H)) == [
        (0, 4 * H, 1, "matured"),
        (1, 4 * H, 0, "matured"),  # its purchase comes after the 4 h it waited
        (2, 4 * H, 0, "matured"),
    ]
    # a cancelled outcome (a refunded purchase, for a net label) is no outcome once cancelled
    net = trials().with_columns(pl.Series("cancel_ms", [2 * H, None, None]))
    assert kinds(emit(net, "wait", H, end, mature_ms=4 * H))[0] == (0, 4 * H, 0, "matured")
    assert kinds(emit(net, "wait", H, end, mature_ms=H))[0] == (0, H, 1, "matured")
    # nothing is emitted from the future: at 2 h the late positive has not arrived
    assert (2, 5 * H) not in {(u, t) for u, t, *_ in kinds(emit(trials(), "esdfm", H, 2 * H))}


def test_click_outcomes_link_purchases_and_refunds():
    ev = pl.DataFrame(
        {
            "user_idx": [0, 0, 0, 1],
            "item_idx": [0, 0, 0, 1],
            "event": ["click", "purchase", "click", "click"],
            "h": [0, 2, 3, 1],
            "refund_h": [None, 30, None, None],
        }
    ).select(
        "user_idx",
        "item_idx",
        "event",
        (pl.col("h") * H).cast(pl.Datetime("ms")).alias("ts"),
        (pl.col("refund_h") * H).cast(pl.Datetime("ms")).alias("cancelled_at"),
    )
    out = click_outcomes(ev, ["click"], ["purchase"], 100 * H).sort("user_idx", "trial_ms")
    assert out["outcome_ms"].to_list() == [2 * H, None, None]
    assert out["next_ms"].to_list() == [30 * H, None, None]
    buys = refund_trials(out)
    assert buys["trial_ms"].to_list() == [2 * H]
    assert buys["outcome_ms"].to_list() == [30 * H]
    assert buys["buy_delay_s"].to_list() == [7200.0]


def test_rate_metrics_against_hand_computed_values():
    m = rate_metrics(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
    assert m["auc"] == pytest.approx(0.75)  # 3 of the 4 (pos, neg) pairs are ordered right
    assert m["nll"] == pytest.approx(
        -np.mean([np.log(0.9), np.log(0.6), np.log(0.35), np.log(0.8)])
    )
    assert m["pred_over_obs"] == pytest.approx(0.4125 / 0.5)


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    from recfb.simulate import DelaySpec, SimConfig, simulate

    from conftest import CONF, run

    base = tmp_path_factory.mktemp("stream")
    cfg = SimConfig(
        seed=3,
        n_users=2_000,
        n_items=200,
        n_events=600_000,
        days=16,
        purchase_logit=-3.0,
        purchase_delay=DelaySpec(distribution="lognormal", median_hours=24.0, shape=1.0),
    )
    simulate(cfg, base / "sim")
    run(
        base,
        [base / "sim" / "events"],
        CONF / "signals" / "simulator.yaml",
        split={"method": "none"},
    )
    events = pl.scan_parquet(base / "out" / "events.parquet")
    clicks = click_outcomes(events, ["click"], ["purchase"], cfg.end_ms())
    return cfg, clicks, refund_trials(clicks), base / "out"


def test_importance_weighting_beats_naive_training_on_a_delayed_stream(stream):
    """With a 24 h median delay and a 1 h wait, naive training sees almost no positives; the
    weighted modes recover calibrated rates (pred/obs near 1) and a better log loss."""
    cfg, clicks, buys, _ = stream
    days = [cfg.start_ms() + d * 24 * H for d in (7, 8)]
    run = lambda mode: run_continuous(  # noqa: E731
        clicks, buys, mode, CvrConfig(epochs_per_day=2), 2_000, 200, days, cfg.end_ms()
    ).pooled["cvr"]
    naive, esdfm = run("naive"), run("esdfm")
    assert naive["pred_over_obs"] < 0.5
    assert 0.6 < esdfm["pred_over_obs"] < 1.4
    assert esdfm["nll"] < naive["nll"]


def test_fast_conversions_weigh_more():
    from recfb.delayed.cvr import fast_weights
    from recfb.delayed.survival import DelayModel

    model = DelayModel("exponential", p=0.1, log_scale=np.log(3600.0))  # mean 1 h
    w = fast_weights(
        np.array([1, 1, 1, 0]), np.array([60.0, 3600.0, np.nan, np.nan]), model, strength=2.0
    )
    assert w[0] == pytest.approx(1 + 2 * np.exp(-60 / 3600))
    assert w[1] == pytest.approx(1 + 2 * np.exp(-1))
    assert list(w[2:]) == [1.0, 1.0]  # unknown delay, negative


def test_netcvr_command_records_a_replay_in_mlflow(stream, tmp_path):
    from mlflow import MlflowClient

    from conftest import CONF

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    cmd = [sys.executable, "-m", "recfb.cli", "netcvr", "-c", str(CONF / "netcvr.yaml")]
    cmd += ["--set", f"data={stream[3]}", "--set", "mode=fnw"]
    cmd += ["--set", "first_test_day=7", "--set", "test_days=2"]
    env = os.environ | {"MLFLOW_TRACKING_URI": uri}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("recfb-netcvr").experiment_id])
    assert run.data.tags["mode"] == "fnw" and run.data.tags["model"] == "cascade"
    assert run.data.params["cvr.wait_hours"] == "1.0"
    assert run.data.metrics["cvr/auc"] > 0.6  # learnt, on the next days' clicks
    assert 0.6 < run.data.metrics["netcvr/pred_over_obs"] < 1.4
    assert len(client.get_metric_history(run.info.run_id, "day/cvr/auc")) == 2
    # a replay that runs past the log's end is refused, naming the field
    cmd[-3:] = ["first_test_day=15", "--set", "test_days=5"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and "first_test_day" in done.stdout + done.stderr

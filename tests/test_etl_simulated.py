"""The ETL against the simulator's known truth: noise, refunds, levels vs true affinity."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from recfb.simulate import SimConfig, simulate

from conftest import CONF, read_out, run

SIGNALS = CONF / "signals" / "simulator.yaml"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sim") / "world"
    cfg = SimConfig(
        seed=5,
        n_users=3_000,
        n_items=800,
        n_events=300_000,
        noise_click_rate=0.05,
        noise_positive_share=0.2,
        duplicate_rate=0.01,
    )
    simulate(cfg, out)
    return out


@pytest.fixture(scope="module")
def etl_out(world: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("etl")
    stats = run(tmp, [world / "events"], SIGNALS)
    return tmp, stats


def test_dwell_rule_removes_mostly_injected_accidental_clicks(world: Path, etl_out):
    tmp, stats = etl_out
    truth = pl.read_parquet(world / "truth" / "events.parquet").select("event_id", "noise")
    removed = (
        read_out(tmp, "filtered")
        .filter(pl.col("reason") == "noise_dwell")
        .with_columns(pl.col("event_id").cast(pl.Int64))
        .join(truth, on="event_id", how="left")
    )
    precision = (removed["noise"] == "accidental_click").mean()
    injected = truth.filter(pl.col("noise") == "accidental_click").height
    recall = (removed["noise"] == "accidental_click").sum() / injected
    assert removed.height > 1000
    assert precision > 0.95, precision
    assert recall > 0.85, recall


def test_duplicates_are_exactly_the_resent_events(world: Path, etl_out):
    _, stats = etl_out
    parts = pl.read_parquet(world / "events")
    resent = parts.height - parts["event_id"].n_unique()
    assert stats["reconciliation"]["duplicates_removed"]["same_event_id"] == resent > 0
    assert stats["reconciliation"]["balanced"]


def test_refunds_cancel_the_purchase_of_their_order(world: Path, etl_out):
    tmp, _ = etl_out
    events = read_out(tmp, "events")
    purchases = events.filter(pl.col("event") == "purchase").select("order_id", "cancelled_at")
    refunds = events.filter(pl.col("event") == "refund").select("order_id", refund_ts="ts")
    joined = purchases.join(refunds, on="order_id", how="left")
    assert refunds.height > 50
    refunded = joined.filter(pl.col("refund_ts").is_not_null())
    assert (refunded["cancelled_at"] == refunded["refund_ts"]).all()
    assert joined.filter(pl.col("refund_ts").is_null())["cancelled_at"].is_null().all()


def test_deeper_levels_have_higher_true_affinity(world: Path, etl_out):
    from recfb.simulate import true_affinity

    tmp, _ = etl_out
    pairs = (
        read_out(tmp, "train")
        .join(read_out(tmp, "users").select("user_idx", "user_id"), on="user_idx")
        .join(read_out(tmp, "items").select("item_idx", "item_id"), on="item_idx")
    )
    affinity = true_affinity(
        world / "truth",
        pairs["user_id"].cast(pl.Int64).to_numpy(),
        pairs["item_id"].cast(pl.Int64).to_numpy(),
    )
    means = (
        pairs.with_columns(pl.Series("affinity", affinity))
        .group_by("label")
        .agg(pl.col("affinity").mean())
        .sort("label")
    )
    by_label = dict(means.iter_rows())
    assert by_label[1] < by_label[2] < by_label[3] < by_label[4]  # view < click < engage < buy
    assert by_label[-1] < by_label[2]  # explicit negatives sit below clicks

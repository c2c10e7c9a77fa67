"""Per-item rates shrunk toward their segment with a strength chosen by held-out likelihood
(`recfb.delayed.rates.heldout_prior_strength`), against known truth."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recfb.delayed.rates import corrected_rates, heldout_prior_strength
from recfb.delayed.survival import DelayModel

HOUR = 3600.0
DELAY = DelayModel("lognormal", p=0.2, log_scale=math.log(12 * HOUR), log_shape=0.0)


def _trials(true: np.ndarray, per_item: int | np.ndarray, seed: int, horizon_h: float = 96.0):
    """Clicks spread over `horizon_h` hours before the cut-off, each converting with its
    item's true rate after a lognormal delay (median 12 h); outcomes after the cut-off are
    not seen. Returns (item, outcome seen, S(age), click time in ms)."""
    rng = np.random.default_rng(seed)
    counts = np.broadcast_to(per_item, true.shape)
    item = np.repeat(np.arange(true.size), counts)
    age = rng.uniform(0, horizon_h * HOUR, item.size)
    delay = 12 * HOUR * np.exp(rng.standard_normal(item.size))
    seen = (rng.random(item.size) < true[item]) & (delay < age)
    ts_ms = ((horizon_h * HOUR - age) * 1000).astype(np.int64)
    return item, seen.astype(float), DELAY.survival(age), ts_ms


def test_no_item_variance_gives_a_large_strength_and_large_variance_a_small_one():
    n = 300
    flat = np.full(n, 0.1)
    m_flat = heldout_prior_strength(*_trials(flat, 40, seed=1), n, 0.1)
    spread = np.random.default_rng(2).uniform(0.01, 0.5, n)
    m_spread = heldout_prior_strength(*_trials(spread, 40, seed=3), n, 0.1)
    assert m_flat > 100, m_flat  # the likelihood is flat up there: any large value
    assert m_spread < 20, m_spread


def test_the_chosen_strength_lowers_per_item_error_and_leaves_thick_items_alone():
    rng = np.random.default_rng(4)
    n = 400
    # items scatter modestly around their segment's rate: thin items are mostly noise
    true = np.clip(0.1 * np.exp(0.3 * rng.standard_normal(n)), 0.005, 0.9)
    per_item = np.where(np.arange(n) < 20, 5_000, rng.integers(3, 60, n))
    item, seen, surv, ts = _trials(true, per_item, seed=5)
    m = heldout_prior_strength(item, seen, surv, ts, n, 0.1)
    plain = corrected_rates(item, seen, surv, n, 0.1, 0.0).corrected
    shrunk = corrected_rates(item, seen, surv, n, 0.1, m).corrected
    thin = per_item < 5_000
    err_plain = np.median(np.abs(plain[thin] - true[thin]))
    err_shrunk = np.median(np.abs(shrunk[thin] - true[thin]))
    assert err_shrunk < 0.7 * err_plain, (m, err_plain, err_shrunk)
    thick = ~thin
    assert np.max(np.abs(shrunk[thick] / plain[thick] - 1)) < 0.03, m


@pytest.mark.parametrize("strength", [0.0, 5.0, 1e4])
def test_held_out_likelihood_prefers_the_strength_it_chose(strength: float):
    """The search's optimum beats fixed strengths on the same held-out half."""
    from recfb.delayed.rates import heldout_log_likelihood

    rng = np.random.default_rng(6)
    n = 200
    true = np.clip(0.1 * np.exp(0.5 * rng.standard_normal(n)), 0.005, 0.9)
    item, seen, surv, ts = _trials(true, 30, seed=7)
    chosen = heldout_prior_strength(item, seen, surv, ts, n, 0.1)
    early, late = ts < np.median(ts), ts >= np.median(ts)

    def score(m: float) -> float:
        fit = corrected_rates(item[early], seen[early], surv[early], n, 0.1, m).corrected
        return heldout_log_likelihood(fit, item[late], seen[late], surv[late])

    assert score(chosen) >= score(strength) - 1e-6


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """A small simulated shop with slow conversions (a third still pending at the end)."""
    import recfb
    from recfb.simulate import DelaySpec, SimConfig, simulate

    out = tmp_path_factory.mktemp("shop") / "sim"
    cfg = SimConfig(
        seed=4,
        n_users=6_000,
        n_items=1_500,
        n_events=400_000,
        days=14,
        purchase_logit=-3.0,
        purchase_delay=DelaySpec(distribution="lognormal", median_hours=24.0, shape=1.0),
    )
    simulate(cfg, out)
    signals = Path(__file__).resolve().parents[1] / "conf" / "signals" / "simulator.yaml"
    return out, recfb.etl.run(out / "events", signals, split={"method": "none"}), cfg


def test_shrinkage_lowers_per_item_cvr_error_on_the_simulator_and_keeps_thick_items(shop):
    from recfb.delayed import click_trials, fit_delays, item_rates, purchase_trials
    from recfb.delayed.fit import item_segments

    sim, data, cfg = shop
    now = cfg.end_ms()
    since = now - 7 * 86_400_000
    fits = fit_delays(data, cutoff_ms=now)
    clicks = click_trials(
        data.events, ["click"], ["purchase"], now, since, delay=fits.conversion.overall
    )
    buys = purchase_trials(data.events, ["purchase"], now, since)
    segments = item_segments(data.events, "category", data.n_items)
    plain = item_rates(clicks, buys, fits.conversion, fits.refund, data.n_items, segments, 0.0, 0.0)
    shrunk = item_rates(
        clicks, buys, fits.conversion, fits.refund, data.n_items, segments, "auto", "auto"
    )
    # truth from the simulator alone: the mean true purchase probability of the window's clicks
    # (those the ETL kept: its dwell rule drops the accidental ones)
    truth = (
        data.events.filter((pl.col("event") == "click") & (pl.col("ts").dt.epoch("ms") >= since))
        .select("item_idx", "event_id")
        .collect()
        .join(
            pl.read_parquet(sim / "truth" / "events.parquet", columns=["event_id", "p_purchase"]),
            on="event_id",
        )
        .group_by("item_idx")
        .agg(pl.col("p_purchase").mean().alias("true"))
    )
    frame = (
        plain.select("item_idx", "clicks", plain_cvr="cvr_corrected")
        .join(shrunk.select("item_idx", shrunk_cvr="cvr_corrected"), on="item_idx")
        .join(truth, on="item_idx")
        .filter(pl.col("clicks") > 0)
    )
    err_plain = (frame["plain_cvr"] - frame["true"]).abs().median()
    err_shrunk = (frame["shrunk_cvr"] - frame["true"]).abs().median()
    assert frame.height > 500
    assert err_shrunk < 0.8 * err_plain, (err_plain, err_shrunk)
    thick = frame.filter(pl.col("clicks") >= 100)
    assert thick.height >= 3, thick.height
    moved = (thick["shrunk_cvr"] / thick["plain_cvr"] - 1).abs().max()
    assert moved < 0.1, moved

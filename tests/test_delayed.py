"""Delay models and delay-corrected rates: recovered against known generating parameters, the
simulator's truth and real Taobao data."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from datetime import datetime

import numpy as np
import polars as pl
import pytest

from recfb.config import read_yaml
from recfb.delayed.fit import fit_delays
from recfb.delayed.observations import click_trials, purchase_trials
from recfb.delayed.rates import corrected_rates
from recfb.delayed.survival import DelayModel, fit_best, kaplan_meier, shrink

from conftest import CONF, ROOT, run, shared_file

HOUR = 3600.0


def cure_sample(rng, n, p, delays_s, horizon_s):
    """Trials at uniform times in [0, horizon); each converts with p after its delay; observed
    at the horizon. Returns (observed delays, ages of trials without an outcome yet)."""
    start = rng.uniform(0, horizon_s, n)
    converts = rng.random(n) < p
    d = delays_s(n)
    seen = converts & (start + d < horizon_s)
    return d[seen], (horizon_s - start)[~seen]


@pytest.mark.parametrize(
    ("family", "draw", "median_h", "shape", "horizon"),
    [
        ("lognormal", lambda r, n: 2 * HOUR * np.exp(1.5 * r.standard_normal(n)), 2.0, 1.5, 10),
        (
            "weibull",
            lambda r, n: 96 * HOUR / math.log(2) ** (1 / 1.5) * r.weibull(1.5, n),
            96.0,
            1.5,
            3,
        ),
    ],
)
def test_cure_fit_recovers_generating_parameters_under_censoring(
    family, draw, median_h, shape, horizon
):
    rng = np.random.default_rng(1)
    # trials over `horizon` medians: many conversions are still to come at the cut-off
    # (a heavy log-normal tail needs a longer horizon before p and the tail separate)
    delays, ages = cure_sample(rng, 40_000, 0.2, lambda n: draw(rng, n), horizon * median_h * HOUR)
    naive_p = delays.size / (delays.size + ages.size)
    assert naive_p < 0.17  # censoring hides a good share of the 0.2
    best, fits = fit_best(delays, ages)
    assert best.family == family
    assert best.p == pytest.approx(0.2, rel=0.06)
    assert best.median_s() / HOUR == pytest.approx(median_h, rel=0.08)
    assert math.exp(best.log_shape) == pytest.approx(shape, rel=0.08)
    assert all(best.aic <= f.aic for f in fits.values())


def test_kaplan_meier_matches_the_cure_curve():
    rng = np.random.default_rng(2)
    delays, ages = cure_sample(rng, 30_000, 0.3, lambda n: rng.exponential(5 * HOUR, n), 50 * HOUR)
    durations = np.concatenate([delays, ages])
    observed = np.concatenate([np.ones(delays.size, bool), np.zeros(ages.size, bool)])
    times, surv = kaplan_meier(durations, observed)
    for t in (2 * HOUR, 5 * HOUR, 20 * HOUR):
        km = 1 - surv[np.searchsorted(times, t, side="right") - 1]
        assert km == pytest.approx(0.3 * (1 - math.exp(-t / (5 * HOUR))), abs=0.012)


def test_shrinkage_moves_a_thin_segment_toward_the_global_fit():
    overall = DelayModel("lognormal", p=0.1, log_scale=math.log(3600), log_shape=0.0, n_events=1e4)
    thin = DelayModel("lognormal", p=0.3, log_scale=math.log(36_000), log_shape=0.0, n_events=20)
    rich = DelayModel("lognormal", p=0.3, log_scale=math.log(36_000), log_shape=0.0, n_events=2e4)
    s_thin, s_rich = shrink(thin, overall, 200), shrink(rich, overall, 200)
    assert 0.1 < s_thin.p < s_rich.p < 0.3
    assert s_thin.median_s() < s_rich.median_s() < 36_000
    assert s_rich.median_s() > 0.9 * 36_000


def test_corrected_rates_recover_true_item_rates_the_naive_ones_miss():
    rng = np.random.default_rng(3)
    n_items, horizon = 50, 48 * HOUR
    true = rng.uniform(0.05, 0.4, n_items)
    model = DelayModel("lognormal", p=0.2, log_scale=math.log(24 * HOUR), log_shape=0.0)
    item = rng.integers(0, n_items, 200_000)
    age = rng.uniform(0, horizon, item.size)
    delay = 24 * HOUR * np.exp(rng.standard_normal(item.size))
    outcome = (rng.random(item.size) < true[item]) & (delay < age)
    rates = corrected_rates(item, outcome, model.survival(age), n_items, 0.2, prior_strength=0)
    assert np.mean(rates.naive / true - 1) < -0.35  # about half still pending
    assert np.mean(rates.corrected / true - 1) == pytest.approx(0, abs=0.03)
    assert np.median(np.abs(rates.corrected / true - 1)) < 0.1
    # the prior decides for an item with no trials, and pulls a thin one toward it
    thin = corrected_rates(np.array([0]), np.array([True]), np.array([1.0]), 2, 0.05, 10)
    assert thin.corrected[1] == pytest.approx(0.05)
    assert 0.05 < thin.corrected[0] < 0.2


def _ts(hours: float) -> datetime:
    return datetime(2026, 1, 1) + (datetime(2026, 1, 1, 1) - datetime(2026, 1, 1)) * hours


def test_trials_attribute_a_purchase_to_the_latest_click_and_censor_at_the_cutoff():
    rows = [  # user, item, event, hours, refunded at (hours)
        (0, 0, "click", 0, None),
        (0, 0, "click", 1, None),
        (0, 0, "purchase", 3, 50),  # -> the 1 h click, 2 h later; refunded after 47 h
        (0, 1, "click", 2, None),  # never converts: age 10 h at the cut-off
        (1, 1, "click", 4, None),
        (1, 1, "purchase", 11, None),  # after the cut-off: not seen
        (1, 2, "purchase", 5, None),  # no click before it: no trial
    ]
    ev = pl.DataFrame(
        {
            "user_idx": [r[0] for r in rows],
            "item_idx": [r[1] for r in rows],
            "event": [r[2] for r in rows],
            "ts": [_ts(r[3]) for r in rows],
            "cancelled_at": [_ts(r[4]) if r[4] is not None else None for r in rows],
        }
    )
    cutoff = int((_ts(10) - datetime(1970, 1, 1)).total_seconds() * 1000)
    clicks = click_trials(ev, ["click"], ["purchase"], cutoff).sort("user_idx", "ts_ms")
    assert clicks["outcome"].to_list() == [False, True, False, False]
    assert clicks["delay_s"].to_list()[1] == 2 * HOUR
    assert clicks["age_s"].to_list() == [10 * HOUR, 9 * HOUR, 8 * HOUR, 6 * HOUR]
    buys = purchase_trials(ev, ["purchase"], cutoff).sort("user_idx")
    assert buys["outcome"].to_list() == [False, False]  # the refund comes after the cut-off
    later = int((_ts(60) - datetime(1970, 1, 1)).total_seconds() * 1000)
    assert purchase_trials(ev, ["purchase"], later)["delay_s"].to_list()[0] == 47 * HOUR


@pytest.fixture(scope="module")
def sim_etl(tmp_path_factory):
    from recfb.simulate import SimConfig, simulate

    base = tmp_path_factory.mktemp("delayed")
    simulate(SimConfig(seed=11, n_users=3_000, n_items=400, n_events=400_000), base / "sim")
    run(base, [base / "sim" / "events"], CONF / "signals" / "simulator.yaml")
    return base / "out"


def test_fit_on_the_simulator_recovers_its_delay_distributions(sim_etl):
    """Simulator truth: click -> purchase log-normal, median 2 h, sigma 1.5; purchase -> refund
    Weibull, median 96 h, shape 1.5 (SimConfig defaults)."""
    fits = fit_delays(sim_etl)
    conv, ref = fits.conversion.overall, fits.refund.overall
    assert conv.family == "lognormal"
    assert conv.median_s() / HOUR == pytest.approx(2.0, rel=0.15)
    assert math.exp(conv.log_shape) == pytest.approx(1.5, rel=0.1)
    assert ref.family == "weibull"
    assert ref.median_s() / HOUR == pytest.approx(96.0, rel=0.15)
    assert math.exp(ref.log_shape) == pytest.approx(1.5, rel=0.15)
    assert fits.conversion.segments  # categories with enough purchases got their own fit
    # a round trip through JSON keeps the model
    again = type(fits).from_dict(fits.to_dict())
    assert again.conversion.overall.median_s() == pytest.approx(conv.median_s())


def test_fit_on_taobao_finds_fast_real_view_to_buy_delays(tmp_path):
    """The data README: Taobao's view -> buy delays have a median under an hour."""
    path = shared_file("taobao_userbehavior_84k.csv")
    cfg = read_yaml(CONF / "datasets" / "taobao.yaml")
    run(tmp_path, [path], CONF / "signals" / "taobao.yaml", input=cfg["input"])
    fits = fit_delays(tmp_path / "out")
    conv = fits.conversion.overall
    assert fits.refund is None  # the log has no refunds
    assert conv.n_events > 500
    assert conv.median_s() < HOUR
    assert 0.001 < conv.p < 0.1


def test_delays_command_writes_models_and_plot(sim_etl, tmp_path):
    cmd = [sys.executable, "-m", "recfb.cli", "delays", "--etl", str(sim_etl), "-o", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    fits = json.loads((tmp_path / "delays.json").read_text())
    assert fits["conversion"]["overall"]["family"] == "lognormal"
    assert (tmp_path / "delay_curves.png").stat().st_size > 10_000
    bad = [sys.executable, "-m", "recfb.cli", "delays", "--etl", str(tmp_path / "missing")]
    done = subprocess.run(bad, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "missing" in done.stdout + done.stderr and "stats.json" in done.stdout + done.stderr

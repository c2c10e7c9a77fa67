"""The cure-model likelihood's closed forms (value and gradient) against scipy.stats and finite
differences, and the log-time binning of large fits against the unbinned fit."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from recfb.delayed import survival

HOUR = 3600.0


def _sample(rng, n):
    start = rng.uniform(0, 20 * 24 * HOUR, n)
    delay = 24 * HOUR * np.exp(rng.standard_normal(n))
    seen = (rng.random(n) < 0.2) & (start + delay < 20 * 24 * HOUR)
    delays, ages = np.maximum(delay[seen], 1.0), (20 * 24 * HOUR - start)[~seen]
    return delays, ages, rng.uniform(0.2, 1, delays.size), rng.uniform(0.5, 1, ages.size)


def _scipy_nll(theta, family, delays, ages, w_d, w_a):
    p, scale = 1 / (1 + math.exp(-theta[0])), math.exp(theta[1])
    dist = {
        "exponential": lambda: stats.expon(scale=scale),
        "weibull": lambda: stats.weibull_min(math.exp(theta[2]), scale=scale),
        "lognormal": lambda: stats.lognorm(math.exp(theta[2]), scale=scale),
    }[family]()
    ll = w_d @ (math.log(p) + dist.logpdf(delays)) + w_a @ np.log(1 - p + p * dist.sf(ages))
    return -ll


@pytest.mark.parametrize("family", ["exponential", "weibull", "lognormal"])
def test_likelihood_and_gradient_match_scipy_and_finite_differences(family, monkeypatch):
    monkeypatch.setattr(survival, "BIN_FROM", 10**12)  # the exact arrays
    rng = np.random.default_rng(5)
    delays, ages, w_d, w_a = _sample(rng, 20_000)
    data = survival._Data.of(delays, ages, w_d, w_a)
    theta = np.array([-1.2, math.log(30 * HOUR), 0.2][: 3 if family != "exponential" else 2])
    value, grad = survival._neg_log_lik_grad(theta, family, data)
    assert value == pytest.approx(_scipy_nll(theta, family, delays, ages, w_d, w_a), rel=1e-10)
    for i in range(theta.size):
        step = np.eye(theta.size)[i] * 1e-5
        up = _scipy_nll(theta + step, family, delays, ages, w_d, w_a)
        down = _scipy_nll(theta - step, family, delays, ages, w_d, w_a)
        assert grad[i] == pytest.approx((up - down) / 2e-5, rel=1e-4, abs=1e-3)


def test_binned_fit_matches_the_unbinned_fit(monkeypatch):
    rng = np.random.default_rng(6)
    delays, ages, w_d, w_a = _sample(rng, 200_000)
    monkeypatch.setattr(survival, "BIN_FROM", 10**12)
    exact = survival.fit_best(delays, ages, delay_weights=w_d, age_weights=w_a)[1]
    monkeypatch.setattr(survival, "BIN_FROM", 1_000)
    binned = survival.fit_best(delays, ages, delay_weights=w_d, age_weights=w_a)[1]
    for family, e in exact.items():
        b = binned[family]
        assert b.p == pytest.approx(e.p, rel=1e-4)
        assert b.log_scale == pytest.approx(e.log_scale, rel=1e-5)
        assert math.exp(b.log_shape) == pytest.approx(math.exp(e.log_shape), rel=1e-4)
        assert b.log_likelihood == pytest.approx(e.log_likelihood, rel=1e-6)

"""Delay distributions fitted with right censoring, as mixture cure models.

Why a cure model: most clicks never convert, so "time to purchase" is not a proper distribution.
A click converts with probability ``p`` and, if it does, after a delay ``D ~ F``. A click seen
converting after ``d`` contributes ``p f(d)``; a click of age ``e`` with no purchase *yet*
contributes ``1 - p + p S(e)`` (it may be a real negative or a conversion still to come). The
same model fits purchase -> refund. ``p`` and ``F`` are fitted jointly by maximum likelihood for
each family (exponential, Weibull, log-normal, as in ``scipy.stats``) and the family with the
lowest AIC wins; the likelihood and its gradient are written out in closed form so BFGS needs a
few dozen evaluations, on log-time-binned data for large stages (``_Data``). The Kaplan-Meier
estimate of time to conversion over all trials (``1 - KM`` is
``p F`` up to the longest follow-up) is the non-parametric check the plots draw beside the fits.

Segments (e.g. item categories) get their own fit of the global family, shrunk toward the global
parameters on the unconstrained scale with weight ``n / (n + shrink_events)``, ``n`` = observed
conversions in the segment; segments with fewer than ``min_events`` use the global fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy import optimize, special, stats

Family = Literal["exponential", "weibull", "lognormal"]
FAMILIES: tuple[Family, ...] = ("exponential", "weibull", "lognormal")
_N_SHAPE = {"exponential": 0, "weibull": 1, "lognormal": 1}


def _dist(family: str, log_scale: float, log_shape: float):
    """The frozen scipy distribution of the delay (seconds) for unconstrained parameters."""
    scale = math.exp(log_scale)
    if family == "exponential":
        return stats.expon(scale=scale)
    if family == "weibull":
        return stats.weibull_min(math.exp(log_shape), scale=scale)
    if family == "lognormal":
        return stats.lognorm(math.exp(log_shape), scale=scale)
    raise ValueError(f"unknown delay family {family!r}; expected one of {FAMILIES}")


@dataclass(frozen=True)
class DelayModel:
    """P(outcome) = ``p``; given the outcome, the delay in seconds follows ``family``.

    ``log_scale``/``log_shape`` are the unconstrained parameters (scipy's scale and shape);
    ``n_trials``/``n_events`` say how much data the fit saw.
    """

    family: Family
    p: float
    log_scale: float
    log_shape: float = 0.0
    n_trials: int = 0
    n_events: int = 0
    log_likelihood: float = float("nan")
    aic: float = float("nan")

    def survival(self, seconds: np.ndarray) -> np.ndarray:
        """S(t) = P(delay > t | the outcome happens): the share of outcomes still to come."""
        t = np.maximum(np.asarray(seconds, dtype=np.float64), 0.0)
        return _dist(self.family, self.log_scale, self.log_shape).sf(t)

    def logpdf(self, seconds: np.ndarray) -> np.ndarray:
        """log f(t) of the delay density (seconds; at least 1 s, as in the fit)."""
        t = np.maximum(np.asarray(seconds, dtype=np.float64), 1.0)
        return _dist(self.family, self.log_scale, self.log_shape).logpdf(t)

    def cdf(self, seconds: np.ndarray) -> np.ndarray:
        """F(t) = P(delay <= t | the outcome happens)."""
        return 1.0 - self.survival(seconds)

    def median_s(self) -> float:
        """Median delay in seconds among trials that convert."""
        return float(_dist(self.family, self.log_scale, self.log_shape).median())

    def quantile_s(self, q: float) -> float:
        """The q-quantile of the delay in seconds (e.g. 0.95: when 95% of outcomes are in)."""
        return float(_dist(self.family, self.log_scale, self.log_shape).ppf(q))

    def to_dict(self) -> dict:
        return {
            "family": self.family,
            "p": self.p,
            "log_scale": self.log_scale,
            "log_shape": self.log_shape,
            "n_trials": self.n_trials,
            "n_events": self.n_events,
            "log_likelihood": self.log_likelihood,
            "aic": self.aic,
            "median_hours": self.median_s() / 3600.0,
        }

    @classmethod
    def from_dict(cls, d: dict) -> DelayModel:
        keys = ("family", "p", "log_scale", "log_shape", "n_trials", "n_events")
        extra = {k: d[k] for k in ("log_likelihood", "aic") if d.get(k) is not None}
        return cls(**{k: d[k] for k in keys}, **extra)


_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


# Log-time bin width of the likelihood's data (see _Data.of) and the size from which it bins.
BIN_WIDTH = 1e-3
BIN_FROM = 50_000


def _binned(t: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Times pooled into log-time bins of width BIN_WIDTH, each at its weighted mean log-time
    with the summed weight: ``(t, log t, w)`` of the bins."""
    x = np.log(t)
    if t.size < BIN_FROM:
        return t, x, w
    idx = np.floor(x / BIN_WIDTH).astype(np.int64)
    idx -= idx.min()
    total = np.bincount(idx, weights=w)
    used = total > 0
    total = total[used]
    xb = np.bincount(idx, weights=w * x)[used] / total
    return np.exp(xb), xb, total


@dataclass(frozen=True)
class _Data:
    """A fit's data, prepared once: delays and ages with their logs and weights.

    Large arrays are pooled into log-time bins of width BIN_WIDTH (0.1%) at each bin's weighted
    mean log-time: a term's first-order error cancels within a bin, so the log-likelihood moves
    by about ``n * BIN_WIDTH**2 / 24`` (relative ~1e-7) and the fitted parameters far less
    than 0.1%, while a 3M-click stage shrinks to ~20k points. Ages of 0 are dropped: S(0) = 1
    adds nothing to the likelihood or its gradient."""

    delays: np.ndarray
    log_d: np.ndarray
    w_d: np.ndarray
    ages: np.ndarray
    log_a: np.ndarray
    w_a: np.ndarray

    @classmethod
    def of(cls, delays: np.ndarray, ages: np.ndarray, w_d: np.ndarray, w_a: np.ndarray) -> _Data:
        keep = (ages > 0) & (w_a > 0)
        return cls(*_binned(delays, w_d), *_binned(ages[keep], w_a[keep]))


# Exponents are clipped here: exp(-700) ~ 1e-304 is 0 next to the O(1) terms it joins, and
# subnormal results (below ~1e-308) would slow every later operation on them many times over.
_MIN_EXP = -700.0


def _exp(x: np.ndarray) -> np.ndarray:
    return np.exp(np.maximum(x, _MIN_EXP))


def _log_terms(family: str, log_scale: float, log_shape: float, x: np.ndarray, t: np.ndarray):
    """log f, d log f / d(log_scale, log_shape) at log-times ``x`` (times ``t``)."""
    if family == "exponential":
        z = t * math.exp(-log_scale)
        return -log_scale - z, (z - 1.0, None)
    if family == "weibull":
        k = math.exp(log_shape)
        u = k * (x - log_scale)
        z = _exp(u)
        logf = log_shape - log_scale + (k - 1.0) * (x - log_scale) - z
        return logf, (k * (z - 1.0), 1.0 + u - u * z)
    if family == "lognormal":
        sigma = math.exp(log_shape)
        z = (x - log_scale) / sigma
        logf = -0.5 * z * z - _HALF_LOG_2PI - log_shape - x
        return logf, (z / sigma, z * z - 1.0)
    raise ValueError(f"unknown delay family {family!r}; expected one of {FAMILIES}")


def _sf_terms(family: str, log_scale: float, log_shape: float, x: np.ndarray, t: np.ndarray):
    """S, dS / d(log_scale, log_shape) at log-times ``x`` (times ``t``)."""
    if family == "exponential":
        z = t * math.exp(-log_scale)
        sf = _exp(-z)
        return sf, (sf * z, None)
    if family == "weibull":
        k = math.exp(log_shape)
        u = k * (x - log_scale)
        z = _exp(u)
        sf = _exp(-z)
        z *= sf
        return sf, (k * z, -u * z)
    if family == "lognormal":
        sigma = math.exp(log_shape)
        z = np.clip((x - log_scale) / sigma, -37.0, 37.0)  # Phi(-37) ~ 6e-300
        phi = _exp(-0.5 * z * z - _HALF_LOG_2PI)
        return special.ndtr(-z), (phi / sigma, phi * z)
    raise ValueError(f"unknown delay family {family!r}; expected one of {FAMILIES}")


def _neg_log_lik_grad(theta: np.ndarray, family: str, data: _Data) -> tuple[float, np.ndarray]:
    """Negative log-likelihood of the cure model and its exact gradient in ``theta`` =
    (logit p, log scale[, log shape]): the same value as scipy.stats' densities give, without
    freezing a distribution per call and with no numerical differencing."""
    logit_p, log_scale = float(theta[0]), float(theta[1])
    shaped = _N_SHAPE[family] > 0
    log_shape = float(theta[2]) if shaped else 0.0
    log_p = -float(np.logaddexp(0.0, -logit_p))
    p, q = math.exp(log_p), math.exp(-float(np.logaddexp(0.0, logit_p)))
    logf, (df_s, df_h) = _log_terms(family, log_scale, log_shape, data.log_d, data.delays)
    sf, (ds_s, ds_h) = _sf_terms(family, log_scale, log_shape, data.log_a, data.ages)
    n_d = float(data.w_d.sum())
    open_ = q + p * sf  # 1 - p + p S(e): no outcome yet at age e
    with np.errstate(divide="ignore"):
        ll = n_d * log_p + float(data.w_d @ logf) + float(data.w_a @ np.log(open_))
    if not np.isfinite(ll):
        return 1e300, np.zeros(len(theta))
    g = data.w_a * (p / open_)  # d log(open) / d(p S), weighted
    grad = np.empty(len(theta))
    grad[0] = q * n_d - q * float(g @ (1.0 - sf))
    grad[1] = float(data.w_d @ df_s) + float(g @ ds_s)
    if shaped:
        grad[2] = float(data.w_d @ df_h) + float(g @ ds_h)
    return -ll, -grad


def _weights(w: np.ndarray | None, n: int) -> np.ndarray:
    return np.ones(n) if w is None else np.asarray(w, dtype=np.float64)


def fit_cure(
    delays: np.ndarray,
    ages: np.ndarray,
    family: Family,
    delay_weights: np.ndarray | None = None,
    age_weights: np.ndarray | None = None,
) -> DelayModel:
    """Maximum-likelihood cure-model fit of one family.

    ``delays``: seconds from trial to outcome, for trials whose outcome was seen;
    ``ages``: seconds from trial to the cut-off, for trials with no outcome yet (censored).
    Weights (default 1) let a trial count in part as converted and in part as still open (a
    purchase shared among several clicks, ``recfb.delayed.observations``).
    """
    return _fit_families(delays, ages, (family,), delay_weights, age_weights)[family]


def _fit_families(
    delays: np.ndarray,
    ages: np.ndarray,
    families: tuple[Family, ...],
    delay_weights: np.ndarray | None,
    age_weights: np.ndarray | None,
    start: DelayModel | None = None,
) -> dict[str, DelayModel]:
    """``fit_cure`` of several families on one preparation of the data; ``start``: a fit
    (e.g. the global one, for a segment) to start its family's optimiser from."""
    delays = np.maximum(np.asarray(delays, dtype=np.float64), 1.0)  # a 0 s delay: log f blows up
    ages = np.maximum(np.asarray(ages, dtype=np.float64), 0.0)
    w_d, w_a = _weights(delay_weights, delays.size), _weights(age_weights, ages.size)
    n_events, n = float(w_d.sum()), float(w_d.sum() + w_a.sum())
    if n_events < 2:
        raise ValueError(f"a delay fit needs at least 2 observed outcomes, got {n_events:g}")
    p0 = min(max(n_events / n, 1e-6), 1 - 1e-6)
    logd = np.log(delays)
    mean_log = float(w_d @ logd / n_events)
    spread = max(math.sqrt(float(w_d @ (logd - mean_log) ** 2 / n_events)), 0.1)
    starts = {
        "exponential": [special.logit(p0), mean_log],
        "weibull": [special.logit(p0), float(np.log(w_d @ delays / n_events)), 0.0],
        "lognormal": [special.logit(p0), mean_log, math.log(spread)],
    }
    if start is not None:
        starts[start.family] = [special.logit(start.p), start.log_scale, start.log_shape]
    data = _Data.of(delays, ages, w_d, w_a)
    out: dict[str, DelayModel] = {}
    for family in families:
        if family not in starts:
            raise ValueError(f"unknown delay family {family!r}; expected one of {FAMILIES}")
        res = optimize.minimize(
            lambda th, fam=family: tuple(v / n for v in _neg_log_lik_grad(th, fam, data)),
            np.array(starts[family][: 2 + _N_SHAPE[family]]),
            jac=True,
            method="BFGS",  # 2-3 parameters: L-BFGS-B's per-step overhead would dominate
            options={"gtol": 1e-9, "maxiter": 1000},
        )
        theta, ll = res.x, -float(res.fun) * n
        k = 2 + _N_SHAPE[family]
        out[family] = DelayModel(
            family=family,
            p=float(special.expit(theta[0])),
            log_scale=float(theta[1]),
            log_shape=float(theta[2]) if _N_SHAPE[family] else 0.0,
            n_trials=round(n),
            n_events=round(n_events),
            log_likelihood=ll,
            aic=2 * k - 2 * ll,
        )
    return out


def fit_best(
    delays: np.ndarray,
    ages: np.ndarray,
    families: tuple[Family, ...] = FAMILIES,
    delay_weights: np.ndarray | None = None,
    age_weights: np.ndarray | None = None,
) -> tuple[DelayModel, dict[str, DelayModel]]:
    """Fit every family; return the lowest-AIC fit and all fits by family name."""
    fits = _fit_families(delays, ages, families, delay_weights, age_weights)
    best = min(fits.values(), key=lambda m: m.aic)
    return best, fits


def shrink(segment: DelayModel, toward: DelayModel, shrink_events: float) -> DelayModel:
    """Pull a segment fit toward the global one on the unconstrained scale, by its evidence."""
    w = segment.n_events / (segment.n_events + shrink_events)
    logit = w * special.logit(segment.p) + (1 - w) * special.logit(toward.p)
    return DelayModel(
        family=segment.family,
        p=float(special.expit(logit)),
        log_scale=w * segment.log_scale + (1 - w) * toward.log_scale,
        log_shape=w * segment.log_shape + (1 - w) * toward.log_shape,
        n_trials=segment.n_trials,
        n_events=segment.n_events,
    )


@dataclass
class SegmentedDelays:
    """A global delay model plus shrunk per-segment models (segment key -> model)."""

    overall: DelayModel
    segments: dict[str, DelayModel] = field(default_factory=dict)
    candidates: dict[str, DelayModel] = field(default_factory=dict)  # every family, global

    def for_segment(self, key: object) -> DelayModel:
        return self.segments.get(str(key), self.overall)

    def to_dict(self) -> dict:
        return {
            "overall": self.overall.to_dict(),
            "segments": {k: m.to_dict() for k, m in self.segments.items()},
            "candidates": {k: m.to_dict() for k, m in self.candidates.items()},
        }

    @classmethod
    def from_dict(cls, d: dict) -> SegmentedDelays:
        return cls(
            overall=DelayModel.from_dict(d["overall"]),
            segments={k: DelayModel.from_dict(v) for k, v in d.get("segments", {}).items()},
            candidates={k: DelayModel.from_dict(v) for k, v in d.get("candidates", {}).items()},
        )


def fit_segments(
    overall: DelayModel,
    delays: np.ndarray,
    ages: np.ndarray,
    delay_segments: np.ndarray,
    age_segments: np.ndarray,
    delay_weights: np.ndarray | None = None,
    age_weights: np.ndarray | None = None,
    min_events: int = 30,
    shrink_events: float = 200.0,
) -> dict[str, DelayModel]:
    """One fit of the global family per segment with at least ``min_events`` (weighted)
    outcomes, shrunk toward the global fit."""
    w_d, w_a = _weights(delay_weights, delays.size), _weights(age_weights, ages.size)
    by_d, by_a = _split(delay_segments), _split(age_segments)
    out: dict[str, DelayModel] = {}
    empty = np.zeros(0, dtype=np.int64)
    for key, in_d in by_d.items():
        if w_d[in_d].sum() < min_events:
            continue
        in_a = by_a.get(key, empty)
        fam = overall.family
        seg = _fit_families(delays[in_d], ages[in_a], (fam,), w_d[in_d], w_a[in_a], overall)[fam]
        out[str(key)] = shrink(seg, overall, shrink_events)
    return out


def _split(keys: np.ndarray) -> dict:
    """Positions of each key (ascending keys, positions in order): one sort, not a pass per key."""
    order = np.argsort(keys, kind="stable")
    uniq, first = np.unique(keys[order], return_index=True)
    return dict(zip(uniq.tolist(), np.split(order, first[1:]), strict=True))


def kaplan_meier(durations: np.ndarray, observed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Kaplan-Meier survival of time-to-outcome over all trials (scipy.stats.ecdf):
    ``(times, S(times))``; ``1 - S`` estimates ``p F(t)`` up to the longest follow-up."""
    durations = np.maximum(np.asarray(durations, dtype=np.float64), 0.0)
    observed = np.asarray(observed, dtype=bool)
    data = stats.CensoredData(uncensored=durations[observed], right=durations[~observed])
    sf = stats.ecdf(data).sf
    return np.asarray(sf.quantiles), np.asarray(sf.probabilities)

"""Per-item conversion, refund and NetCVR rates corrected for feedback that has not arrived yet.

A trial of age ``e`` with no outcome yet still sees it with probability
``p S(e) / (1 - p + p S(e))`` (``S``: the delay model's survival, ``p``: the item's rate). The
corrected rate is the fixed point of ``p = (outcomes + m p0 + sum of those probabilities) /
(trials + m)``: an EM for the cure-model likelihood with the delay distribution held fixed,
plus a Beta prior of strength ``m`` pseudo-trials at the segment's rate ``p0`` for thin items.
The naive rate is outcomes / trials, as a dashboard on recent traffic would show it.
NetCVR = CVR x (1 - refund rate), each corrected on its own stage.

The prior's strength ``m`` is either fixed (the prior rate then is the delay fit's segment
``p``) or empirical Bayes (``"auto"``, ``shrunk_stage``): the prior rate is the item's segment
pooled over the same trials (``pooled_prior``), and ``m`` is chosen by held-out likelihood
(``heldout_prior_strength``): the stage's trials are cut in time at their median, rates are
corrected on the earlier half with a candidate ``m``, and ``m`` maximises the cure-model
likelihood of the later half's outcomes (seen, or still possible at their age) under those
rates. Items that truly differ from their segment want a small ``m``; items that differ only
by sampling noise a large one. The best ``m`` in pseudo-trials does not depend on how many
trials an item has, so the one chosen on half the history serves the whole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import polars as pl
from scipy import optimize

from recfb.delayed.survival import SegmentedDelays


@dataclass(frozen=True)
class StageRates:
    """Arrays over items: trials, outcomes seen, pending trials, naive and corrected rates."""

    trials: np.ndarray
    outcomes: np.ndarray
    pending: np.ndarray
    naive: np.ndarray
    corrected: np.ndarray


def corrected_rates(
    item: np.ndarray,
    outcome: np.ndarray,
    survival: np.ndarray,
    n_items: int,
    prior_rate: np.ndarray | float,
    prior_strength: float,
    max_iter: int = 500,
    tol: float = 1e-9,
) -> StageRates:
    """Rates per item from trials (``item`` index, ``outcome`` = the share of an outcome seen,
    0..1, ``survival`` = S(age) of the delay model at the trial's age; it applies to the share
    not seen)."""
    item = np.asarray(item, dtype=np.int64)
    outcome = np.clip(np.asarray(outcome, dtype=np.float64), 0.0, 1.0)
    trials = np.bincount(item, minlength=n_items).astype(np.float64)
    seen = np.bincount(item, outcome, minlength=n_items)
    still = outcome < 1.0
    open_item, w_open = item[still], 1.0 - outcome[still]
    s_open = np.clip(np.asarray(survival, dtype=np.float64)[still], 0.0, 1.0)
    prior = np.broadcast_to(np.asarray(prior_rate, dtype=np.float64), (n_items,))
    denom = trials + prior_strength
    with np.errstate(invalid="ignore", divide="ignore"):
        naive = np.where(trials > 0, seen / trials, np.nan)
        p = np.where(denom > 0, (seen + prior_strength * prior) / denom, prior)
        for _ in range(max_iter):
            p_open = p[open_item]
            late = w_open * p_open * s_open / np.maximum(1.0 - p_open + p_open * s_open, 1e-300)
            new = (seen + prior_strength * prior + np.bincount(open_item, late, n_items)) / denom
            new = np.where(denom > 0, new, prior)
            if np.nanmax(np.abs(new - p), initial=0.0) < tol:
                p = new
                break
            p = new
    pending = np.bincount(open_item, w_open * s_open, n_items)  # open trials' S(age) mass
    return StageRates(trials=trials, outcomes=seen, pending=pending, naive=naive, corrected=p)


Strength = float | Literal["auto"]
STRENGTH_BOUNDS = (0.01, 1e5)  # pseudo-trials searched by "auto" (log scale)


def heldout_log_likelihood(
    rates: np.ndarray, item: np.ndarray, outcome: np.ndarray, survival: np.ndarray
) -> float:
    """Cure-model log-likelihood of trials under per-item rates, the delay model held fixed:
    an outcome seen contributes ``log p``, a trial still open ``log(1 - p + p S(age))``
    (``outcome`` is the share seen, 0..1). The delay density term does not depend on ``p``
    and is left out."""
    p = np.clip(rates[np.asarray(item, dtype=np.int64)], 1e-12, 1 - 1e-12)
    seen = np.clip(np.asarray(outcome, dtype=np.float64), 0.0, 1.0)
    s = np.clip(np.asarray(survival, dtype=np.float64), 0.0, 1.0)
    return float(np.sum(seen * np.log(p) + (1.0 - seen) * np.log(1.0 - p + p * s)))


def pooled_prior(
    item: np.ndarray,
    outcome: np.ndarray,
    survival: np.ndarray,
    groups: np.ndarray,
    fallback: np.ndarray | float,
) -> np.ndarray:
    """Each item's prior rate: the delay-corrected rate of its group (``groups``: a group
    index per item) pooled over all the group's trials; ``fallback`` where the group has
    none. What similar items say, measured on the same trials, not on the delay fit's
    segment rate (which is itself shrunk toward the global one)."""
    groups = np.asarray(groups, dtype=np.int64)
    n_groups = int(groups.max()) + 1 if groups.size else 0
    item = np.asarray(item, dtype=np.int64)
    pooled = corrected_rates(groups[item], outcome, survival, n_groups, 0.0, 0.0)
    rate = pooled.corrected[groups]
    fallback = np.broadcast_to(np.asarray(fallback, dtype=np.float64), groups.shape)
    return np.where(pooled.trials[groups] > 0, rate, fallback)


def heldout_prior_strength(
    item: np.ndarray,
    outcome: np.ndarray,
    survival: np.ndarray,
    ts_ms: np.ndarray,
    n_items: int,
    prior_rate: np.ndarray | float,
    groups: np.ndarray | None = None,
    bounds: tuple[float, float] = STRENGTH_BOUNDS,
) -> float:
    """The prior strength (pseudo-trials) whose rates, corrected on the earlier half of the
    trials (cut at their median time), best predict the later half's outcomes (module
    docstring). With ``groups`` the prior is the group's pooled rate on the earlier half
    (``pooled_prior``; ``prior_rate`` where a group has none there), so no held-out outcome
    leaks into it. A 1-d bounded search over log m (scipy's ``minimize_scalar``). Returns the
    upper bound when the later half holds no trial of an item the earlier half saw (nothing
    to tell items apart with: the prior is all there is)."""
    item = np.asarray(item, dtype=np.int64)
    ts = np.asarray(ts_ms)
    later = ts >= np.median(ts) if ts.size else np.zeros(0, dtype=bool)
    earlier = ~later
    seen_early = np.bincount(item[earlier], minlength=n_items) > 0
    scored = later & seen_early[item]
    if not scored.any() or not earlier.any():
        return bounds[1]
    outcome, survival = np.asarray(outcome), np.asarray(survival)
    fit_on = item[earlier], outcome[earlier], survival[earlier]
    if groups is not None:
        prior_rate = pooled_prior(*fit_on, groups, prior_rate)

    def loss(log_m: float) -> float:
        fit = corrected_rates(*fit_on, n_items, prior_rate, math.exp(log_m))
        return -heldout_log_likelihood(
            fit.corrected, item[scored], outcome[scored], survival[scored]
        )

    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    best = optimize.minimize_scalar(
        loss, bounds=(lo, hi), method="bounded", options={"xatol": 0.05}
    )
    return float(math.exp(best.x))


def segment_groups(item_segment: np.ndarray | None, n_items: int) -> np.ndarray:
    """A group index per item from its segment label (no segments: one group)."""
    if item_segment is None:
        return np.zeros(n_items, dtype=np.int64)
    return np.unique(np.asarray(item_segment).astype(str), return_inverse=True)[1].reshape(-1)


def _survival_and_prior(
    trials: pl.DataFrame, delays: SegmentedDelays, item_segment: np.ndarray | None, n_items: int
) -> tuple[np.ndarray, np.ndarray]:
    """S(age) of each trial under its item's segment model, and each item's prior rate."""
    ages = trials["age_s"].to_numpy()
    items = trials["item_idx"].to_numpy().astype(np.int64)
    surv = delays.overall.survival(ages)
    prior = np.full(n_items, delays.overall.p)
    if item_segment is not None and delays.segments:
        seg = item_segment.astype(str)
        for key, model in delays.segments.items():
            in_seg = seg == key
            prior[in_seg] = model.p
            mask = in_seg[items]
            if mask.any():
                surv[mask] = model.survival(ages[mask])
    return surv, prior


def shrunk_stage(
    trials: pl.DataFrame, delays: SegmentedDelays, item_segment: np.ndarray | None, n_items: int
) -> tuple[StageRates, float]:
    """One stage's rates shrunk empirically: toward the item's segment pooled on the same
    trials, with the strength chosen by held-out likelihood; returns the rates and the
    strength (pseudo-trials)."""
    surv, fit_prior = _survival_and_prior(trials, delays, item_segment, n_items)
    item, outcome = trials["item_idx"].to_numpy(), trials["outcome"].to_numpy()
    groups = segment_groups(item_segment, n_items)
    strength = heldout_prior_strength(
        item, outcome, surv, trials["ts_ms"].to_numpy(), n_items, fit_prior, groups
    )
    prior = pooled_prior(item, outcome, surv, groups, fit_prior)
    return corrected_rates(item, outcome, surv, n_items, prior, strength), strength


def _stage_rates(
    trials: pl.DataFrame,
    delays: SegmentedDelays,
    item_segment: np.ndarray | None,
    n_items: int,
    prior_strength: Strength,
) -> StageRates:
    """One stage's rates: trials (``observations``) under their items' delay models; a fixed
    prior at the delay fit's segment rate, or (``"auto"``) ``shrunk_stage``."""
    if prior_strength == "auto":
        return shrunk_stage(trials, delays, item_segment, n_items)[0]
    surv, prior = _survival_and_prior(trials, delays, item_segment, n_items)
    return corrected_rates(
        trials["item_idx"].to_numpy(),
        trials["outcome"].to_numpy(),
        surv,
        n_items,
        prior,
        prior_strength,
    )


def item_rates(
    clicks: pl.DataFrame,
    purchases: pl.DataFrame,
    conversion: SegmentedDelays,
    refund: SegmentedDelays | None,
    n_items: int,
    item_segment: np.ndarray | None = None,
    cvr_prior_strength: Strength = 2.0,
    refund_prior_strength: Strength = 2.0,
) -> pl.DataFrame:
    """Naive and corrected CVR, refund rate and NetCVR per item from click and purchase trials
    (``recfb.delayed.observations``). Without a refund model the refund rate is taken as 0.
    A strength ``"auto"`` is chosen by held-out likelihood (``heldout_prior_strength``)."""
    cvr = _stage_rates(clicks, conversion, item_segment, n_items, cvr_prior_strength)
    cols = {
        "item_idx": np.arange(n_items, dtype=np.uint32),
        "clicks": cvr.trials.astype(np.int64),
        "purchases": cvr.outcomes,  # attributed: a purchase may be shared among clicks
        "cvr_naive": cvr.naive,
        "cvr_corrected": cvr.corrected,
    }
    if refund is not None:
        ref = _stage_rates(purchases, refund, item_segment, n_items, refund_prior_strength)
        cols |= {
            "purchases_in_window": ref.trials.astype(np.int64),
            "refunds": ref.outcomes.astype(np.int64),
            "refund_naive": ref.naive,
            "refund_corrected": ref.corrected,
        }
        refund_naive = np.nan_to_num(ref.naive, nan=0.0)
        refund_corr = ref.corrected
    else:
        refund_naive = refund_corr = np.zeros(n_items)
    cols["netcvr_naive"] = cvr.naive * (1.0 - refund_naive)
    cols["netcvr_corrected"] = cvr.corrected * (1.0 - refund_corr)
    return pl.DataFrame(cols)

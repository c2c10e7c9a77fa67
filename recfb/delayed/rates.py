"""Per-item conversion, refund and NetCVR rates corrected for feedback that has not arrived yet.

A trial of age ``e`` with no outcome yet still sees it with probability
``p S(e) / (1 - p + p S(e))`` (``S``: the delay model's survival, ``p``: the item's rate). The
corrected rate is the fixed point of ``p = (outcomes + m p0 + sum of those probabilities) /
(trials + m)``: an EM for the cure-model likelihood with the delay distribution held fixed,
plus a Beta prior of strength ``m`` pseudo-trials at the segment's rate ``p0`` for thin items.
The naive rate is outcomes / trials, as a dashboard on recent traffic would show it.
NetCVR = CVR x (1 - refund rate), each corrected on its own stage.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

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


def _stage_rates(
    trials: pl.DataFrame,
    delays: SegmentedDelays,
    item_segment: np.ndarray | None,
    n_items: int,
    prior_strength: float,
) -> StageRates:
    """One stage's rates: trials (``observations``) under their items' delay models."""
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
    cvr_prior_strength: float = 2.0,
    refund_prior_strength: float = 2.0,
) -> pl.DataFrame:
    """Naive and corrected CVR, refund rate and NetCVR per item from click and purchase trials
    (``recfb.delayed.observations``). Without a refund model the refund rate is taken as 0."""
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

"""Per-day measures of a served policy, from the simulator's truth.

Why these: net purchases and refunds per 1,000 impressions are what a shop earns; the
true-affinity NDCG says how good the lists are for the user whatever the funnel's luck;
the Gini of impressions over items, the share of the top 1% of items and the catalogue
coverage say whether retraining on its own exposures narrows what users see.
"""

from __future__ import annotations

import numpy as np


def gini(counts: np.ndarray) -> float:
    """Gini coefficient of non-negative counts (0: every item equally shown, ->1: one item)."""
    x = np.sort(np.asarray(counts, dtype=np.float64))
    n = x.size
    total = x.sum()
    if n == 0 or total <= 0:
        return float("nan")
    ranks = np.arange(1, n + 1)
    return float((2.0 * np.sum(ranks * x) / (n * total)) - (n + 1.0) / n)


def top_share(counts: np.ndarray, fraction: float = 0.01) -> float:
    """Share of all impressions that went to the most shown `fraction` of items."""
    x = np.sort(np.asarray(counts, dtype=np.float64))[::-1]
    total = x.sum()
    if total <= 0:
        return float("nan")
    top = max(1, int(np.ceil(fraction * x.size)))
    return float(x[:top].sum() / total)


def true_ndcg(shown_gain: np.ndarray, best_gain: np.ndarray) -> np.ndarray:
    """NDCG of each list: gains of the shown items (rows, NaN where a slot was empty) against
    the best possible gains (rows, sorted descending), both with log2 position discounts."""
    k = shown_gain.shape[1]
    disc = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = np.nansum(shown_gain * disc, axis=1)
    idcg = np.sum(best_gain[:, :k] * disc[: best_gain.shape[1]], axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(idcg > 0, dcg / idcg, np.nan)

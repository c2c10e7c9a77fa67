"""Self-normalised inverse-propensity recall (SNIPS): offline recall corrected for exposure.

What a held-out log holds depends on what the recommender showed: popular (much shown) items
are over-represented among the relevant pairs, so plain recall rewards popularity. Weighting
each relevant pair by ``1 / theta_i`` (``theta_i``: item i's exposure propensity) estimates
recall as if every item had been shown alike (Yang et al. 2018, unbiased offline evaluation of
recommenders under MNAR feedback); normalising by the user's own weight sum (SNIPS) bounds it
in [0, 1] and keeps the variance down:

    snips_recall@k(u) = sum_{i in top-k(u) and relevant(u)} w_i / sum_{i in relevant(u)} w_i

averaged over the users with a relevant item. The top-k and the relevant sets are the
evaluator's (`recfb.evaluate.metrics`: the same masking, a masked item is not relevant).
With equal weights it is plain uncapped recall, hits / |relevant|.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl

from recfb.evaluate.metrics import EvalConfig, ScoreFn, _masked_pairs, topk_items


def propensities(counts: np.ndarray, eta: float, clip: float) -> np.ndarray:
    """theta_i = (count_i / max count)^eta, clipped from below at `clip` (the training
    side's rule too: `recfb.models.base` takes its propensities from here), from exposure
    (or popularity) counts per item."""
    counts = np.clip(np.asarray(counts, dtype=np.float64), 0.0, None)
    theta = (counts / max(counts.max(initial=0.0), 1.0)) ** eta
    return np.maximum(theta, clip)


def snips_recall(
    score: ScoreFn,
    n_items: int,
    heldout: pl.DataFrame,
    train: pl.DataFrame,
    theta: np.ndarray,
    config: EvalConfig = EvalConfig(),
) -> dict[str, float]:
    """``snips_recall@k`` for each k of ``config.ks`` (module docstring) and ``n_users``;
    relevant = held-out pairs with ``label >= config.relevant_min_level``, less the masked
    train pairs. ``theta``: the propensity of each item (length n_items, > 0)."""
    theta = np.asarray(theta, dtype=np.float64)
    if theta.shape != (n_items,) or not (theta > 0).all():
        raise ValueError(f"theta must be {n_items} positive propensities, got shape {theta.shape}")
    pairs = (
        heldout.filter(pl.col("label") >= config.relevant_min_level)
        .select("user_idx", "item_idx")
        .unique()
    )
    masked = _masked_pairs(train, config)
    if masked is not None:
        pairs = pairs.join(masked, on=["user_idx", "item_idx"], how="anti")
    if pairs.height == 0:
        return {"n_users": 0.0}
    users = np.unique(pairs["user_idx"].to_numpy()).astype(np.int64)
    ks: Sequence[int] = config.ks
    top, _ = topk_items(score, n_items, users, train, config, min(ks[-1], n_items))
    row = np.searchsorted(users, pairs["user_idx"].to_numpy().astype(np.int64))
    item = pairs["item_idx"].to_numpy().astype(np.int64)
    weight = 1.0 / theta[item]
    total = np.bincount(row, weight, minlength=users.size)
    # each relevant pair's slot in its user's list (depth when absent)
    lists = top.numpy()
    depth = lists.shape[1]
    slot = np.full(item.size, depth, dtype=np.int64)
    hit_row, hit_slot = np.nonzero(lists[row] == item[:, None])
    slot[hit_row] = hit_slot
    out: dict[str, float] = {"n_users": float(users.size)}
    for k in ks:
        found = np.bincount(row, weight * (slot < k), minlength=users.size)
        out[f"snips_recall@{k}"] = float(np.mean(found / total))
    return out

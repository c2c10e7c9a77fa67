"""Per-list ranking metrics: the one definition of recall@k, ndcg@k and hr@k.

Offline evaluation (`full_ranking_metrics`) and the promotion gate (`recfb.pipeline.gate`)
both reduce a user's ranked list to a row of hits (slot j holds a relevant item) and the size
of the user's relevant set, and call `ranking_metrics`, so a metric's name means the same
number wherever it is reported:

* ``recall@k = hits@k / min(k, |relevant|)``: recall capped at k, so that a perfect list
  scores 1 even when a user has more relevant items than k (the README's benchmark figures
  use this definition);
* ``ndcg@k``: binary gains, discount ``1 / log2(rank + 1)`` (rank from 1), divided by the
  ideal DCG of ``min(k, |relevant|)`` hits in the first slots;
* ``hr@k``: 1 when the first k slots hold at least one relevant item.

Relevant items that the list cannot contain (an item the model does not know, a new item)
count in ``|relevant|``, i.e. as misses; which items are relevant is the caller's decision.
A list shorter than k is a list whose missing slots are misses.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Sequence

import numpy as np

METRICS = ("recall", "ndcg", "hr")
"""The keys of `ranking_metrics`' result, in the order evaluation reports them."""


def hit_matrix(
    lists: Sequence[Sequence[Hashable]], relevant: Sequence[Collection[Hashable]], depth: int
) -> tuple[np.ndarray, np.ndarray]:
    """Hits of ranked lists of ids against relevant sets, for `ranking_metrics`.

    Returns ``hits`` (bool (U, depth): slot j of list u holds an item of ``relevant[u]``; lists
    are cut or padded with misses to ``depth``) and ``n_relevant`` (int64 (U,)). An item that
    appears twice in a list is a hit only at its first slot, so recall cannot exceed 1.
    """
    if len(lists) != len(relevant):
        raise ValueError(f"{len(lists)} ranked lists but {len(relevant)} relevant sets")
    if depth < 0:
        raise ValueError(f"depth must be >= 0, got {depth}")
    hits = np.zeros((len(lists), depth), dtype=bool)
    n_relevant = np.zeros(len(lists), dtype=np.int64)
    for u, (ranked, rel) in enumerate(zip(lists, relevant, strict=True)):
        rel = rel if isinstance(rel, set | frozenset) else set(rel)
        n_relevant[u] = len(rel)
        found: set[Hashable] = set()
        for j, item in enumerate(ranked[:depth]):
            if item in rel and item not in found:
                hits[u, j] = True
                found.add(item)
    return hits, n_relevant


def ranking_metrics(
    hits: np.ndarray, n_relevant: np.ndarray, ks: Sequence[int]
) -> dict[str, np.ndarray]:
    """Recall, NDCG and hit rate at each k of each user (see the module docstring).

    ``hits`` is (U, L) with a true where the slot holds a relevant item (slots past L are
    misses), ``n_relevant`` (U,) the size of each user's relevant set (>= 1: a user with
    nothing relevant has no defined recall and is the caller's to skip). Returns
    ``{"recall", "ndcg", "hr"}`` -> float64 (U, len(ks)), columns in the order of ``ks``.
    """
    hits = np.asarray(hits, dtype=bool)
    n_relevant = np.asarray(n_relevant, dtype=np.int64)
    if hits.ndim != 2 or n_relevant.shape != (hits.shape[0],):
        raise ValueError(
            f"hits must be (users, slots) and n_relevant (users,), got {hits.shape} and "
            f"{n_relevant.shape}"
        )
    ks_arr = np.asarray(ks, dtype=np.int64).reshape(-1)
    if ks_arr.size == 0 or ks_arr.min() < 1:
        raise ValueError(f"cut-offs must be >= 1, got {list(ks)}")
    if n_relevant.size and n_relevant.min() < 1:
        raise ValueError("every user needs at least one relevant item (skip the others)")
    if np.any(hits.sum(1) > n_relevant):
        raise ValueError("a list holds more hits than its user has relevant items")
    depth = int(ks_arr.max())
    if hits.shape[1] < depth:  # a short list: the missing slots are misses
        hits = np.pad(hits, ((0, 0), (0, depth - hits.shape[1])))
    discount = 1.0 / np.log2(np.arange(2, depth + 2, dtype=np.float64))
    ideal = np.cumsum(discount)
    at_k = ks_arr - 1
    n_hits = np.cumsum(hits[:, :depth], 1, dtype=np.float64)[:, at_k]
    dcg = np.cumsum(hits[:, :depth] * discount, 1)[:, at_k]
    cap = np.minimum(ks_arr, n_relevant[:, None])
    return {
        "recall": n_hits / cap,
        "ndcg": dcg / ideal[cap - 1],
        "hr": (n_hits > 0).astype(np.float64),
    }

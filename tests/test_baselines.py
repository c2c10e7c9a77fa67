"""recfb.models.baselines against independent computations (polars counts, dense numpy KNN)
and, for the factor models, against what a working recommender must do on planted structure.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from recfb.models import baselines
from recfb.models.baselines import (
    ImplicitALS,
    ImplicitBPR,
    ItemKNN,
    Popularity,
    make_baseline,
)
from recfb.models.config import FAMILIES

SCHEMA = {"user_idx": pl.UInt32, "item_idx": pl.UInt32, "label": pl.Int8, "weight": pl.Float32}


def frame(users, items, labels, weights=None) -> pl.DataFrame:
    """A pair table with the ETL's dtypes."""
    weights = np.ones(len(users)) if weights is None else weights
    data = {"user_idx": users, "item_idx": items, "label": labels, "weight": weights}
    return pl.DataFrame({k: np.asarray(v) for k, v in data.items()}, schema=SCHEMA)


def random_pairs(n_users: int, n_items: int, density: float, seed: int) -> pl.DataFrame:
    """Unique random pairs with every label, exposures and explicit negatives included."""
    rng = np.random.default_rng(seed)
    users, items = np.nonzero(rng.random((n_users, n_items)) < density)
    labels = rng.choice([-1, 0, 1, 2, 3], size=len(users), p=[0.1, 0.2, 0.4, 0.2, 0.1])
    weights = rng.uniform(0.5, 2.0, size=len(users))
    return frame(users, items, labels, weights)


def block_data(seed: int = 0) -> tuple[pl.DataFrame, np.ndarray, int, int]:
    """3 user groups, each liking half of its own block of 20 items (plus one stray item);
    one liked block item per user is held out. Returns (train, held-out item per user, n_users,
    n_items)."""
    rng = np.random.default_rng(seed)
    n_groups, group_users, block = 3, 30, 20
    n_users, n_items = n_groups * group_users, n_groups * block
    users, items, held = [], [], np.zeros(n_users, dtype=np.int64)
    for u in range(n_users):
        g = u // group_users
        liked = g * block + rng.choice(block, size=11, replace=False)
        held[u] = liked[0]
        stray = rng.choice(np.setdiff1d(np.arange(n_items), np.arange(g * block, (g + 1) * block)))
        for i in [*liked[1:], stray]:
            users.append(u)
            items.append(i)
    labels = rng.integers(1, 4, size=len(users))
    weights = labels.astype(np.float64)
    return frame(users, items, labels, weights), held, n_users, n_items


def held_out_rank_share(model, train: pl.DataFrame, held: np.ndarray) -> np.ndarray:
    """Relative rank (0 = top) of each user's held-out item among the items not in train."""
    scores = model.score(torch.arange(len(held))).numpy().astype(np.float64)
    scores[train["user_idx"].to_numpy(), train["item_idx"].to_numpy()] = -np.inf
    candidates = np.isfinite(scores).sum(axis=1)
    own = scores[np.arange(len(held)), held]
    better = (scores > own[:, None]).sum(axis=1)
    return better / candidates


# --- Popularity ------------------------------------------------------------------------------


@pytest.mark.parametrize("min_label", [1, 2])
def test_popularity_counts_distinct_users_with_a_positive(min_label: int) -> None:
    train = random_pairs(40, 30, 0.3, seed=1)
    # a duplicated positive pair must not count its user twice
    train = pl.concat([train, train.filter(pl.col("label") >= 3).head(5)])
    expected = np.zeros(30)
    counts = (
        train.filter(pl.col("label") >= min_label)
        .group_by("item_idx")
        .agg(pl.col("user_idx").n_unique())
    )
    expected[counts["item_idx"].to_numpy()] = counts["user_idx"].to_numpy()
    model = Popularity(min_label=min_label).fit(train, 40, 30)
    np.testing.assert_array_equal(model.popularity_vector(), expected)
    scores = model.score(torch.tensor([0, 7, 39, 7]))
    assert scores.shape == (4, 30)
    for row in scores:
        np.testing.assert_array_equal(row.numpy(), expected)


def test_negatives_and_exposures_are_not_counted() -> None:
    train = frame([0, 1, 2, 3, 0], [0, 0, 0, 1, 1], [-1, 0, 1, 2, -1])
    np.testing.assert_array_equal(Popularity().fit(train, 4, 3).popularity_vector(), [1, 1, 0])
    np.testing.assert_array_equal(
        Popularity(min_label=-1).fit(train, 4, 3).popularity_vector(), [3, 2, 0]
    )


# --- ItemKNN ---------------------------------------------------------------------------------


def brute_force_knn(x: np.ndarray, k: int, shrink: float) -> np.ndarray:
    """Dense top-k shrunk cosine, row by row; ties go to the lower item index."""
    dot = x.T @ x
    norms = np.sqrt(np.diag(dot))
    sim = dot / (np.outer(norms, norms) + shrink)
    out = np.zeros_like(sim)
    for i in range(len(sim)):
        neighbours = [j for j in range(len(sim)) if j != i and sim[i, j] > 0]
        for j in sorted(neighbours, key=lambda j: (-sim[i, j], j))[:k]:
            out[i, j] = sim[i, j]
    return out


@pytest.mark.parametrize(("k", "shrink", "seed"), [(5, 2.0, 0), (3, 0.0, 1), (100, 10.0, 2)])
@pytest.mark.parametrize("chunk_items", [None, 4], ids=["one_chunk", "chunks_of_4"])
def test_itemknn_matches_brute_force(
    k: int, shrink: float, seed: int, chunk_items: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    n_users, n_items = 30, 25
    if chunk_items is not None:  # the item chunking must not change the result
        monkeypatch.setattr(baselines, "_KNN_CELLS_PER_CHUNK", chunk_items * n_items)
    train = random_pairs(n_users, n_items, 0.35, seed=seed)
    pos = train.filter(pl.col("label") >= 1)
    x = np.zeros((n_users, n_items))
    x[pos["user_idx"].to_numpy(), pos["item_idx"].to_numpy()] = 1.0
    expected = brute_force_knn(x, k, shrink)
    model = ItemKNN(k=k, shrink=shrink).fit(train, n_users, n_items)
    np.testing.assert_allclose(model.similarity.toarray(), expected, rtol=1e-5, atol=1e-7)
    assert (model.similarity.getnnz(axis=1) <= k).all()
    scores = model.score(torch.arange(n_users))
    np.testing.assert_allclose(scores.numpy(), x @ expected, rtol=1e-5, atol=1e-6)


def test_itemknn_keeps_the_lower_index_on_ties() -> None:
    # items 1, 2, 3 are each co-liked with item 0 by one user, with equal norms: a three-way tie
    train = frame([0, 0, 1, 1, 2, 2], [0, 1, 0, 2, 0, 3], [1] * 6)
    sim = ItemKNN(k=2, shrink=0.0).fit(train, 3, 4).similarity.toarray()
    assert np.flatnonzero(sim[0]).tolist() == [1, 2]


def test_itemknn_ignores_pairs_below_min_label() -> None:
    train = random_pairs(30, 20, 0.4, seed=3)
    only_pos = train.filter(pl.col("label") >= 2)
    a = ItemKNN(k=4, min_label=2).fit(train, 30, 20)
    b = ItemKNN(k=4, min_label=1).fit(only_pos, 30, 20)
    assert (a.similarity != b.similarity).nnz == 0
    assert (a.similarity != ItemKNN(k=4).fit(train, 30, 20).similarity).nnz > 0


# --- implicit wrappers -----------------------------------------------------------------------


# few factors: the planted structure has rank 3 and 90 users would let more factors overfit


def make_als(**kw) -> ImplicitALS:
    return ImplicitALS(factors=4, regularization=0.1, **kw)


def make_bpr(**kw) -> ImplicitBPR:
    # one thread: implicit's BPR threads race (Hogwild), so only then is the fit reproducible
    return ImplicitBPR(factors=8, num_threads=1, **kw)


@pytest.mark.parametrize("make", [make_als, make_bpr], ids=["als", "bpr"])
def test_factor_models_learn_the_blocks(make) -> None:
    train, held, n_users, n_items = block_data()
    model = make().fit(train, n_users, n_items)
    share = held_out_rank_share(model, train, held)
    # at random about 20% of users would have the held-out item in their top 20%
    assert (share < 0.2).mean() > 0.8
    assert share.mean() < 0.15  # random: 0.5


@pytest.mark.parametrize("make", [make_als, make_bpr], ids=["als", "bpr"])
def test_factor_models_are_deterministic_by_seed(make) -> None:
    train, _, n_users, n_items = block_data()
    a = make(seed=3).fit(train, n_users, n_items)
    b = make(seed=3).fit(train, n_users, n_items)
    c = make(seed=4).fit(train, n_users, n_items)
    np.testing.assert_array_equal(a.user_vectors(), b.user_vectors())
    np.testing.assert_array_equal(a.item_vectors(), b.item_vectors())
    assert not np.array_equal(a.item_vectors(), c.item_vectors())
    users = torch.arange(n_users)
    np.testing.assert_allclose(
        a.score(users).numpy(), a.user_vectors() @ a.item_vectors().T, rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("make", [make_als, make_bpr], ids=["als", "bpr"])
def test_factor_models_ignore_pairs_below_min_label(make) -> None:
    train, _, n_users, n_items = block_data()
    rng = np.random.default_rng(5)
    noise = frame(
        rng.integers(0, n_users, 200), rng.integers(0, n_items, 200), rng.choice([-1, 0], 200)
    )
    noisy = pl.concat([train, noise]).unique(["user_idx", "item_idx"], keep="first")
    clean = noisy.filter(pl.col("label") >= 1)
    a = make().fit(noisy, n_users, n_items)
    b = make().fit(clean, n_users, n_items)
    np.testing.assert_array_equal(a.item_vectors(), b.item_vectors())


def test_als_weights_change_the_fit() -> None:
    train, _, n_users, n_items = block_data()
    weighted = make_als().fit(train, n_users, n_items)
    flat = make_als(use_weights=False).fit(train, n_users, n_items)
    same = make_als(use_weights=True).fit(train.with_columns(weight=pl.lit(1.0)), n_users, n_items)
    assert not np.allclose(weighted.item_vectors(), flat.item_vectors())
    np.testing.assert_allclose(same.item_vectors(), flat.item_vectors(), rtol=1e-5, atol=1e-6)


# --- protocol and registry -------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", sorted(n for n, f in FAMILIES.items() if f.kind == "baseline" and n != "cascade")
)
def test_scores_follow_the_protocol(name: str) -> None:
    train = random_pairs(12, 9, 0.5, seed=4)
    params = {"factors": 4, "iterations": 3} if name in ("als", "bpr_implicit") else {}
    model = make_baseline(name, **params)
    assert isinstance(model, FAMILIES[name].load_class())
    with pytest.raises(RuntimeError):
        model.score(torch.tensor([0]))
    assert model.fit(train, 12, 9) is model
    assert (model.n_users, model.n_items) == (12, 9)
    scores = model.score(torch.tensor([3, 0, 11, 3], dtype=torch.long))
    assert scores.shape == (4, 9) and scores.dtype == torch.float32
    torch.testing.assert_close(scores[0], scores[3])
    assert model.score(torch.zeros(0, dtype=torch.long)).shape == (0, 9)
    with pytest.raises(IndexError):
        model.score(torch.tensor([12]))


def test_fit_rejects_ids_outside_the_catalogue() -> None:
    train = frame([0, 5], [0, 1], [1, 1])
    with pytest.raises(ValueError, match="user_idx"):
        Popularity().fit(train, 5, 3)
    with pytest.raises(ValueError, match="item_idx"):
        ItemKNN().fit(train, 6, 1)


def test_make_baseline_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="unknown baseline"):
        make_baseline("nope")

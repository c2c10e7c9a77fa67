"""recfb.models.cascade against a dense numpy reference written from the update rule, plus its
batching, its handling of explicit negatives, its config checks and a sanity check on the real
Taobao log (it must beat popularity when only purchases are hidden).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from pydantic import ValidationError

from recfb.config import read_yaml
from recfb.evaluate import EvalConfig, full_ranking_metrics
from recfb.models.baselines import Popularity, make_baseline
from recfb.models.cascade import CascadeConfig, CascadeRank
from recfb.models.config import FAMILIES
from recfb.train.data import Interactions

from conftest import CONF, run, shared_file

SCHEMA = {"user_idx": pl.UInt32, "item_idx": pl.UInt32, "label": pl.Int8, "weight": pl.Float32}

# 4 users, 7 items, 3 levels. User 2 has only level-1 pairs; item 6 only an exposure (label 0);
# (0, 5) and (2, 0) are explicit negatives; (1, 1) appears twice (its deepest label 2 counts).
HAND_PAIRS = [
    (0, 0, 3), (0, 1, 1), (0, 2, 2), (0, 5, -1),
    (1, 0, 1), (1, 1, 2), (1, 3, 1), (1, 4, 0), (1, 1, 1),
    (2, 2, 1), (2, 3, 1), (2, 4, 1), (2, 0, -1),
    (3, 1, 3), (3, 4, 2), (3, 5, 1), (3, 6, 0),
]  # fmt: skip
HAND_USERS, HAND_ITEMS = 4, 7


def frame(pairs: list[tuple[int, int, int]]) -> pl.DataFrame:
    """A pair table with the ETL's dtypes (and a weight column the walk must ignore)."""
    users, items, labels = (np.array(c) for c in zip(*pairs, strict=True))
    weight = np.linspace(0.5, 3.0, len(pairs))
    data = {"user_idx": users, "item_idx": items, "label": labels, "weight": weight}
    return pl.DataFrame(data, schema=SCHEMA)


def random_pairs(n_users: int, n_items: int, density: float, seed: int) -> list:
    rng = np.random.default_rng(seed)
    users, items = np.nonzero(rng.random((n_users, n_items)) < density)
    labels = rng.choice([-1, 0, 1, 2, 3], size=len(users), p=[0.1, 0.15, 0.45, 0.2, 0.1])
    return [(int(u), int(i), int(lv)) for u, i, lv in zip(users, items, labels, strict=True)]


def dense_reference(
    pairs: list[tuple[int, int, int]],
    n_users: int,
    n_items: int,
    alpha: float,
    beta: float,
    n_levels: int,
    level_weights: list[float] | None = None,
    iterations: int | None = None,
    tol: float = 1e-13,
) -> np.ndarray:
    """Scores (n_users, n_items) from dense float64 matrices, every user at once (one column
    each). Gauss-Seidel: r_u of a step feeds r_i of the same step. ``iterations`` runs exactly
    that many steps per level; otherwise until the largest change of r_i is below ``tol``."""
    depth = np.zeros((n_users, n_items), dtype=np.int64)
    negative = np.zeros((n_users, n_items), dtype=bool)
    for u, i, label in pairs:
        if label == -1:
            negative[u, i] = True
        depth[u, i] = max(depth[u, i], min(label, n_levels))
    weights = np.ones(n_levels) if level_weights is None else np.asarray(level_weights, float)
    g = 1.0 - alpha - beta
    eye = np.eye(n_users)
    r_u = r_i = np.zeros(0)
    for t in range(1, n_levels + 1):
        adjacency = np.where(depth >= t, weights[np.maximum(depth, 1) - 1], 0.0)
        deg_u, deg_i = adjacency.sum(1), adjacency.sum(0)
        inv_sqrt_u = np.divide(1.0, np.sqrt(deg_u), out=np.zeros(n_users), where=deg_u > 0)
        inv_sqrt_i = np.divide(1.0, np.sqrt(deg_i), out=np.zeros(n_items), where=deg_i > 0)
        norm = inv_sqrt_u[:, None] * adjacency * inv_sqrt_i[None, :]
        inv_u = np.divide(1.0, deg_u, out=np.zeros(n_users), where=deg_u > 0)
        q_u, q_i = eye, (adjacency * inv_u[:, None]).T  # column u: user u's queries
        prior_u, prior_i = (q_u, q_i) if t == 1 else (r_u, r_i)
        r_u, r_i = prior_u.copy(), prior_i.copy()
        for step in range(100_000):
            if iterations is not None and step == iterations:
                break
            r_u = g * norm @ r_i + alpha * q_u + beta * prior_u
            new_i = g * norm.T @ r_u + alpha * q_i + beta * prior_i
            change = np.abs(new_i - r_i).max()
            r_i = new_i
            if iterations is None and change < tol:
                break
    scores = r_i.T.copy()
    for u in range(n_users):
        scores[u, negative[u]] = scores[u].min() - 1.0
    return scores


def exact_fixed_point(pairs, n_users, n_items, alpha, beta, n_levels) -> np.ndarray:
    """The levels' fixed points by a linear solve, no iteration (checks the reference)."""
    g = 1.0 - alpha - beta
    depth = np.zeros((n_users, n_items), dtype=np.int64)
    for u, i, label in pairs:
        depth[u, i] = max(depth[u, i], min(label, n_levels))
    eye = np.eye(n_users)
    r = np.zeros(0)
    for t in range(1, n_levels + 1):
        adjacency = (depth >= t).astype(float)
        deg_u, deg_i = adjacency.sum(1), adjacency.sum(0)
        du = np.divide(1.0, np.sqrt(deg_u), out=np.zeros(n_users), where=deg_u > 0)
        di = np.divide(1.0, np.sqrt(deg_i), out=np.zeros(n_items), where=deg_i > 0)
        norm = du[:, None] * adjacency * di[None, :]
        q_i = (adjacency * np.divide(1.0, deg_u, out=np.zeros(n_users), where=deg_u > 0)[:, None]).T
        query = np.vstack([eye, q_i])
        prior = query if t == 1 else r
        walk = np.block(
            [[np.zeros((n_users, n_users)), norm], [norm.T, np.zeros((n_items, n_items))]]
        )
        system = np.eye(n_users + n_items) - g * walk
        r = np.linalg.solve(system, alpha * query + beta * prior)
    return r[n_users:].T


def fit_hand(**params) -> CascadeRank:
    return CascadeRank(**params).fit(frame(HAND_PAIRS), HAND_USERS, HAND_ITEMS)


def all_scores(model: CascadeRank, n_users: int) -> np.ndarray:
    return model.score(torch.arange(n_users)).numpy()


# --- against the dense reference -------------------------------------------------------------


@pytest.mark.parametrize(
    ("alpha", "beta", "weights"),
    [
        (0.0, 0.9, None),
        (0.15, 0.6, None),
        (0.3, 0.0, None),
        (0.05, 0.05, None),
        (0.1, 0.7, [1, 2, 5]),
    ],
)
def test_scores_match_the_dense_reference(alpha, beta, weights) -> None:
    model = fit_hand(alpha=alpha, beta=beta, level_weights=weights, tol=1e-6, max_iter=5000)
    expected = dense_reference(HAND_PAIRS, HAND_USERS, HAND_ITEMS, alpha, beta, 3, weights)
    got = all_scores(model, HAND_USERS)
    assert got.dtype == np.float32 and got.shape == (HAND_USERS, HAND_ITEMS)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    assert len(model.iterations_used) == 3 and max(model.iterations_used) < 5000
    if weights is None:  # the reference itself reaches the fixed point of the linear system
        exact = exact_fixed_point(HAND_PAIRS, HAND_USERS, HAND_ITEMS, alpha, beta, 3)
        positive = expected > -0.5  # negatives are pushed below 0 after the walk
        np.testing.assert_allclose(expected[positive], exact[positive], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(("alpha", "beta", "steps"), [(0.0, 0.5, 1), (0.2, 0.3, 2), (0.1, 0.1, 4)])
def test_a_fixed_number_of_steps_matches_the_reference_step_for_step(alpha, beta, steps) -> None:
    """tol = 0 runs exactly ``steps`` Gauss-Seidel steps per level from the prior: this pins the
    iteration style and the starting point, not only the fixed point."""
    model = fit_hand(alpha=alpha, beta=beta, tol=0.0, max_iter=steps)
    expected = dense_reference(HAND_PAIRS, HAND_USERS, HAND_ITEMS, alpha, beta, 3, iterations=steps)
    np.testing.assert_allclose(all_scores(model, HAND_USERS), expected, rtol=1e-5, atol=1e-7)
    assert model.iterations_used == [steps] * 3


def test_n_levels_clips_deeper_labels_and_adds_empty_levels() -> None:
    shallow = fit_hand(alpha=0.1, beta=0.6, n_levels=2, tol=1e-7, max_iter=5000)
    expected = dense_reference(HAND_PAIRS, HAND_USERS, HAND_ITEMS, 0.1, 0.6, 2)
    np.testing.assert_allclose(all_scores(shallow, HAND_USERS), expected, rtol=1e-4, atol=1e-6)
    assert len(shallow.iterations_used) == 2
    deep = fit_hand(alpha=0.1, beta=0.6, n_levels=4, tol=1e-7, max_iter=5000)
    expected = dense_reference(HAND_PAIRS, HAND_USERS, HAND_ITEMS, 0.1, 0.6, 4)
    np.testing.assert_allclose(all_scores(deep, HAND_USERS), expected, rtol=1e-4, atol=1e-6)


def test_the_deep_levels_reorder_the_shallow_walk() -> None:
    """Not a no-op: the cascade differs from a walk on the view graph alone."""
    cascade = all_scores(fit_hand(alpha=0.1, beta=0.6, tol=1e-7), HAND_USERS)
    views_only = all_scores(fit_hand(alpha=0.1, beta=0.6, tol=1e-7, n_levels=1), HAND_USERS)
    assert not np.allclose(cascade, views_only, rtol=1e-3)


# --- batching, negatives ---------------------------------------------------------------------


def test_batching_does_not_change_the_scores() -> None:
    n_users, n_items = 30, 25
    pairs = random_pairs(n_users, n_items, 0.2, seed=3)
    train = frame(pairs)
    # a loose tol: were converged users not frozen, a batch would iterate its users as long as
    # its slowest one and the scores would differ by about tol
    params = {"alpha": 0.1, "beta": 0.5, "tol": 1e-3, "max_iter": 200}
    users = torch.arange(n_users)

    def scores(batch_users: int, order: torch.Tensor = users) -> torch.Tensor:
        model = CascadeRank(batch_users=batch_users, **params).fit(train, n_users, n_items)
        return model.score(order)

    full = scores(1024)
    some = users[::3]  # one user per batch: a few users are enough
    torch.testing.assert_close(scores(1, some), full[some], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(scores(7), full, rtol=1e-5, atol=1e-7)
    perm = torch.randperm(n_users, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(scores(1024, perm), full[perm], rtol=1e-5, atol=1e-7)
    # and it is the reference's answer, within the loose tolerance
    expected = dense_reference(pairs, n_users, n_items, 0.1, 0.5, 3)
    np.testing.assert_allclose(full.numpy(), expected, rtol=0, atol=5e-3 * np.abs(expected).max())


def test_a_column_drained_to_zero_still_converges() -> None:
    """b = 0: users without level-2/3 pairs walk their r_i down to 0 at those levels; a test
    relative to the current r_i alone would never stop there (it would run until underflow)."""
    model = fit_hand(alpha=0.3, beta=0.0, tol=1e-6, max_iter=500)
    all_scores(model, HAND_USERS)
    assert max(model.iterations_used) < 40, model.iterations_used  # rate about g^2 = 0.49


def test_negatives_rank_last_and_leave_the_rest_alone() -> None:
    pairs = random_pairs(40, 30, 0.3, seed=8)
    train = frame(pairs)
    scores = CascadeRank(alpha=0.1, beta=0.7).fit(train, 40, 30).score(torch.arange(40)).numpy()
    as_exposures = train.with_columns(pl.col("label").clip(lower_bound=0))
    plain = CascadeRank(alpha=0.1, beta=0.7).fit(as_exposures, 40, 30).score(torch.arange(40))
    assert np.isfinite(scores).all()
    negative = np.zeros((40, 30), dtype=bool)
    for u, i, label in pairs:
        negative[u, i] |= label == -1
    assert negative.sum() > 10 and negative.any(1).sum() > 5
    for u in np.flatnonzero(negative.any(1)):
        assert scores[u, negative[u]].max() < scores[u, ~negative[u]].min()
        order = np.argsort(-scores[u], kind="stable")
        assert set(order[-negative[u].sum() :]) == set(np.flatnonzero(negative[u]))
    np.testing.assert_array_equal(scores[~negative], plain.numpy()[~negative])


def test_hand_graph_negatives_and_unreachable_items() -> None:
    scores = all_scores(fit_hand(alpha=0.1, beta=0.6), HAND_USERS)
    assert scores[0, 5] < scores[0, [0, 1, 2, 3, 4, 6]].min()
    assert scores[2, 0] < scores[2, 1:].min()
    assert (scores[:, 6] == 0).all()  # an item with only an exposure is never reached
    assert (scores[[1, 3]] >= 0).all()  # users without negatives keep their walk scores


# --- config, protocol, registry --------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"alpha": 0.5, "beta": 0.5}, "alpha \\+ beta must be < 1"),
        ({"alpha": 0.3, "beta": 0.9}, "alpha \\+ beta must be < 1"),
        ({"alpha": 0.0, "beta": 0.0}, "alpha \\+ beta must be > 0"),
        ({"alpha": -0.1}, "alpha must be a finite number >= 0"),
        ({"beta": float("nan")}, "beta must be a finite number >= 0"),
        ({"level_weights": [1.0, 0.0, 2.0]}, "level_weights must be finite and > 0"),
        ({"tol": -1e-3}, "tol must be"),
        ({"max_iter": 0}, "max_iter must be >= 1"),
        ({"batch_users": 0}, "batch_users must be >= 1"),
        ({"gamma": 0.1}, "Extra inputs are not permitted"),
    ],
)
def test_config_rejects_bad_values(params, message) -> None:
    with pytest.raises(ValidationError, match=message):
        CascadeConfig(**params)


def test_model_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError, match="alpha \\+ beta must be < 1"):
        CascadeRank(alpha=0.4, beta=0.6)
    with pytest.raises(ValueError, match="min_label"):
        CascadeRank(min_label=0)
    with pytest.raises(ValueError, match="n_levels"):
        CascadeRank(n_levels=0)
    with pytest.raises(ValueError, match="level_weights holds 2 weights but there are 3 levels"):
        fit_hand(level_weights=[1.0, 2.0])
    with pytest.raises(RuntimeError, match="fitted"):
        CascadeRank().score(torch.tensor([0]))


def test_min_label_drops_the_shallow_levels() -> None:
    model = fit_hand(alpha=0.1, beta=0.6, min_label=2, tol=1e-7, max_iter=5000)
    assert model.levels == [2, 3]
    # the walk over levels 2..3 is the full walk on the pairs relabelled one level shallower
    shifted = [(u, i, lv - 1 if lv >= 2 else (0 if lv == 1 else lv)) for u, i, lv in HAND_PAIRS]
    expected = dense_reference(shifted, HAND_USERS, HAND_ITEMS, 0.1, 0.6, 2)
    np.testing.assert_allclose(all_scores(model, HAND_USERS), expected, rtol=1e-4, atol=1e-6)
    assert len(model.iterations_used) == 2


def test_a_train_without_positives_scores_zero_except_negatives() -> None:
    train = frame([(0, 1, 0), (1, 2, -1)])
    scores = CascadeRank().fit(train, 2, 3).score(torch.arange(2)).numpy()
    np.testing.assert_array_equal(scores, [[0, 0, 0], [0, 0, -1]])


def test_registered_as_a_baseline_family() -> None:
    assert FAMILIES["cascade"].load_class() is CascadeRank
    model = make_baseline("cascade", min_label=1, beta=0.5)
    assert isinstance(model, CascadeRank) and model.config.beta == 0.5


# --- real data -------------------------------------------------------------------------------


def test_beats_popularity_on_taobao_when_only_purchases_are_hidden(tmp_path: Path) -> None:
    path = shared_file("taobao_userbehavior_84k.csv")
    cfg = read_yaml(CONF / "datasets" / "taobao.yaml")
    run(
        tmp_path,
        [path],
        CONF / "signals" / "taobao.yaml",
        input=cfg["input"] | {"paths": [str(path)]},
        split=cfg["split"],
    )
    data = Interactions.load(tmp_path / "out")
    eval_cfg = EvalConfig(ks=(10,), exclude="min_level", exclude_min_level=3)
    results = {}
    for name, model in (("popularity", Popularity()), ("cascade", CascadeRank())):
        model.fit(data.train, data.n_users, data.n_items)
        results[name] = full_ranking_metrics(
            model.score, data.n_items, data.test, data.train, data.level_names, eval_cfg
        )
    pop, cascade = results["popularity"], results["cascade"]
    assert cascade["n_users"] == pop["n_users"] > 500
    # measured: cascade 0.26, popularity 0.02 (users come back to what they viewed)
    assert cascade["hr@10"] > max(3 * pop["hr@10"], pop["hr@10"] + 0.1), results
    assert cascade["recall@10/purchase"] > pop["recall@10/purchase"], results

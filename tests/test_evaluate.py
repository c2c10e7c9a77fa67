"""recfb.evaluate against a plain-Python reference written from the specification.

The reference loops over users, sorts scores with Python's sorted() and builds sets, so it
shares no code (and hopefully no mistake) with the vectorised torch implementation.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict

import numpy as np
import polars as pl
import pytest
import torch
from pydantic import ValidationError

from recfb.evaluate import (
    EvalConfig,
    full_ranking_metrics,
    item_popularity,
    level_auc,
    topk_items,
)
from recfb.evaluate.ranking import hit_matrix, ranking_metrics

LEVELS = {1: "view", 2: "click", 3: "engage", 4: "purchase"}

Pair = tuple[int, int, int]


def frame(pairs: list[Pair]) -> pl.DataFrame:
    """A pair table with the ETL's dtypes."""
    return pl.DataFrame(
        {
            "user_idx": [p[0] for p in pairs],
            "item_idx": [p[1] for p in pairs],
            "label": [p[2] for p in pairs],
        },
        schema={"user_idx": pl.UInt32, "item_idx": pl.UInt32, "label": pl.Int8},
    )


def table_scorer(table: torch.Tensor, calls: list[torch.Tensor] | None = None):
    """score(users) reading rows of a fixed matrix; optionally records its calls."""

    def score(users: torch.Tensor) -> torch.Tensor:
        if calls is not None:
            calls.append(users.clone())
        return table[users]

    return score


# --------------------------------------------------------------------------------------------
# the reference


def masked_by_user(train: list[Pair], exclude: str, exclude_min_level: int) -> dict[int, set]:
    masked: dict[int, set] = defaultdict(set)
    for u, i, label in train:
        if exclude == "any" or (exclude == "min_level" and label >= exclude_min_level):
            masked[u].add(i)
    return masked


def reference_ranking(scores: list[list[float]], masked: set, k: int) -> list[int]:
    """Unmasked items by descending score, the first k."""
    allowed = [i for i in range(len(scores)) if i not in masked]
    return sorted(allowed, key=lambda i: -scores[i])[:k]


def reference_metrics(
    scores: list[list[float]],
    n_items: int,
    heldout: list[Pair],
    train: list[Pair],
    levels: dict[int, str],
    ks: list[int],
    exclude: str,
    exclude_min_level: int,
    relevant_min_level: int,
) -> dict[str, float]:
    masked = masked_by_user(train, exclude, exclude_min_level)
    label_of: dict[tuple[int, int], int] = {}
    for u, i, label in heldout:
        label_of[(u, i)] = max(label, label_of.get((u, i), -100))
    users = sorted({u for u, _, _ in heldout})

    count = [0] * n_items
    for _, i, label in train:
        if label >= 1:
            count[i] += 1
    percentile = []
    for i in range(n_items):
        below = sum(1 for c in count if c < count[i])
        tied = sum(1 for c in count if c == count[i])
        mean_rank = below + (tied + 1) / 2
        percentile.append((mean_rank - 1) / (n_items - 1) if n_items > 1 else 0.5)

    groups = [("", relevant_min_level)] + [(f"/{name}", t) for t, name in sorted(levels.items())]
    out: dict[str, float] = {}
    shown: dict[int, set] = {k: set() for k in ks}
    pct_total = {k: 0.0 for k in ks}
    slots = {k: 0 for k in ks}
    for suffix, threshold in groups:
        values: dict[str, list[float]] = defaultdict(list)
        for u in users:
            relevant = {
                i
                for (v, i), label in label_of.items()
                if v == u and label >= threshold and i not in masked[u]
            }
            if not relevant:
                continue
            for k in ks:
                top = reference_ranking(scores[u], masked[u], k)
                hits = sum(1 for i in top if i in relevant)
                cap = min(k, len(relevant))
                dcg = sum(1 / math.log2(r + 2) for r, i in enumerate(top) if i in relevant)
                ideal = sum(1 / math.log2(r + 2) for r in range(cap))
                values[f"recall@{k}"].append(hits / cap)
                values[f"ndcg@{k}"].append(dcg / ideal)
                values[f"hr@{k}"].append(1.0 if hits else 0.0)
                if suffix == "":
                    shown[k].update(top)
                    pct_total[k] += sum(percentile[i] for i in top)
                    slots[k] += len(top)
        n = len(values[f"hr@{ks[0]}"])
        out[f"n_users{suffix}"] = float(n)
        if n:
            for key, vals in values.items():
                out[f"{key}{suffix}"] = sum(vals) / n
    if out["n_users"]:
        for k in ks:
            out[f"coverage@{k}"] = len(shown[k]) / n_items
            out[f"popularity@{k}"] = pct_total[k] / slots[k] if slots[k] else 0.0
    return out


def random_case(seed: int, duplicates: bool = False):
    """Small random world: scores, train pairs and held-out pairs that partly overlap train."""
    rng = np.random.default_rng(seed)
    n_users = int(rng.integers(3, 15))
    n_items = int(rng.integers(4, 40))
    scores = rng.standard_normal((n_users, n_items))
    cells = [(u, i) for u in range(n_users) for i in range(n_items)]
    order = rng.permutation(len(cells))
    n_train = int(rng.integers(0, len(cells) // 2))
    train = [(*cells[j], int(rng.integers(-1, 5))) for j in order[:n_train]]
    fresh = [(*cells[j], int(rng.integers(-1, 5))) for j in order[n_train : n_train + 25]]
    again = [(u, i, int(rng.integers(-1, 5))) for u, i, _ in train[: int(rng.integers(0, 10))]]
    heldout = fresh + again
    if duplicates and heldout:
        heldout += [(u, i, int(rng.integers(-1, 5))) for u, i, _ in heldout[:5]]
    return scores, n_items, heldout, train


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("exclude", ["none", "any", "min_level"])
def test_matches_reference(seed: int, exclude: str) -> None:
    scores, n_items, heldout, train = random_case(seed, duplicates=seed % 2 == 1)
    ks = [1, 3, 5, 50] if seed % 2 else [2, 10]
    exclude_min_level = 2 + seed % 3
    relevant_min_level = 1 + seed % 2
    config = EvalConfig(
        ks=tuple(ks),
        exclude=exclude,
        exclude_min_level=exclude_min_level,
        relevant_min_level=relevant_min_level,
        batch_users=3,
    )
    got = full_ranking_metrics(
        table_scorer(torch.from_numpy(scores)),
        n_items,
        frame(heldout),
        frame(train),
        LEVELS,
        config,
    )
    want = reference_metrics(
        scores.tolist(),
        n_items,
        heldout,
        train,
        LEVELS,
        ks,
        exclude,
        exclude_min_level,
        relevant_min_level,
    )
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key


def test_reference_cases_are_not_trivial() -> None:
    """The random cases must exercise masking of held-out pairs and users left out."""
    overlap = skipped = 0
    for seed in range(8):
        _, _, heldout, train = random_case(seed)
        train_cells = {(u, i) for u, i, _ in train}
        overlap += sum((u, i) in train_cells for u, i, _ in heldout)
        users = {u for u, _, _ in heldout}
        skipped += sum(1 for u in users if all(label < 4 for v, _, label in heldout if v == u))
    assert overlap > 5 and skipped > 5


# --------------------------------------------------------------------------------------------
# perfect and worst scorers


def dense_case(seed: int = 0) -> tuple[int, int, list[Pair], list[Pair]]:
    rng = np.random.default_rng(seed)
    n_users, n_items = 30, 60
    heldout, train = [], []
    for u in range(n_users):
        items = rng.choice(n_items, size=12, replace=False)
        heldout += [(u, int(i), int(rng.integers(-1, 5))) for i in items[:6]]
        train += [(u, int(i), int(rng.integers(-1, 5))) for i in items[5:]]  # item 5 in both
    return n_users, n_items, heldout, train


@pytest.mark.parametrize("exclude", ["none", "any"])
def test_perfect_scorer_scores_one(exclude: str) -> None:
    n_users, n_items, heldout, train = dense_case()
    table = torch.zeros(n_users, n_items)
    for u, i, label in heldout:
        table[u, i] = max(label, 0)
    config = EvalConfig(ks=(1, 3, 10), exclude=exclude)
    got = full_ranking_metrics(
        table_scorer(table), n_items, frame(heldout), frame(train), LEVELS, config
    )
    checked = 0
    for key, value in got.items():
        if key.split("@")[0] in ("recall", "ndcg", "hr"):
            assert value == pytest.approx(1.0), key
            checked += 1
    assert checked == 3 * 3 * 5
    assert got["n_users"] == n_users


def test_scorer_ranking_relevant_last_scores_zero() -> None:
    n_users, n_items, heldout, train = dense_case(1)
    table = torch.zeros(n_users, n_items)
    for u, i, label in heldout:
        table[u, i] = -10.0 * label if label >= 1 else 0.0
    got = full_ranking_metrics(
        table_scorer(table), n_items, frame(heldout), frame(train), LEVELS, EvalConfig(ks=(5, 10))
    )
    for key, value in got.items():
        if key.split("@")[0] in ("recall", "ndcg", "hr"):
            assert value == 0.0, key


def test_masked_filler_is_no_hit_and_not_covered() -> None:
    """A list longer than the unmasked items: the masked tail counts nowhere."""
    train = [(0, 0, 4), (0, 1, 4), (1, 0, 1)]  # popularity: item 0 -> 2, item 1 -> 1
    heldout = [(0, 2, 1), (0, 1, 4)]  # item 1 is masked: not relevant, so no "purchase" user
    table = torch.tensor([[9.0, 8.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    got = full_ranking_metrics(
        table_scorer(table), 4, frame(heldout), frame(train), LEVELS, EvalConfig(ks=(1, 4))
    )
    assert got["n_users"] == 1 and got["n_users/purchase"] == 0
    assert "ndcg@4/purchase" not in got
    assert got["hr@1"] == 0.0 and got["recall@4"] == 1.0
    assert got["ndcg@4"] == pytest.approx(1 / math.log2(3))
    assert got["coverage@1"] == 0.25 and got["coverage@4"] == 0.5
    # items 2 and 3 share the lowest popularity: mean rank 1.5 of 4 -> (1.5 - 1) / 3
    assert got["popularity@4"] == pytest.approx(0.5 / 3)


# --------------------------------------------------------------------------------------------
# top-k lists


@pytest.mark.parametrize("exclude", ["none", "any", "min_level"])
def test_topk_items_never_returns_masked_items(exclude: str) -> None:
    for seed in range(6):
        scores, n_items, _, train = random_case(seed)
        n_users = scores.shape[0]
        config = EvalConfig(exclude=exclude, exclude_min_level=3, batch_users=4)
        masked = masked_by_user(train, exclude, 3)
        k = n_items + 2  # forces filler slots for every user
        users = torch.tensor(list(reversed(range(n_users))) + [0])  # any order, repeats
        items, top_scores = topk_items(
            table_scorer(torch.from_numpy(scores)), n_items, users, frame(train), config, k
        )
        assert items.shape == (len(users), k) and items.dtype == torch.long
        assert top_scores.shape == (len(users), k)
        for row, u in enumerate(users.tolist()):
            want = reference_ranking(scores[u].tolist(), masked[u], k)
            listed = items[row].tolist()
            assert listed[: len(want)] == want
            assert listed[len(want) :] == [-1] * (k - len(want))
            assert not set(listed) & masked[u]
            assert torch.isinf(top_scores[row, len(want) :]).all()
            assert torch.isfinite(top_scores[row, : len(want)]).all()


def test_topk_items_small_k_matches_scores() -> None:
    scores, n_items, _, train = random_case(3)
    items, top_scores = topk_items(
        table_scorer(torch.from_numpy(scores).float()),
        n_items,
        np.arange(scores.shape[0]),
        frame(train),
        EvalConfig(exclude="none"),
        2,
    )
    expected = torch.from_numpy(scores).float().gather(1, items)
    assert torch.equal(expected, top_scores)
    assert (top_scores[:, 0] >= top_scores[:, 1]).all()


def test_scores_held_by_the_model_are_not_overwritten() -> None:
    """score() may return a tensor it keeps; masking must work on a copy."""
    table = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    kept = table.clone()
    items, _ = topk_items(
        lambda users: table, 4, [0, 1, 2], frame([(0, 3, 1), (2, 0, 0)]), EvalConfig(), 2
    )
    assert torch.equal(table, kept)
    assert items.tolist() == [[2, 1], [3, 2], [3, 2]]


# --------------------------------------------------------------------------------------------
# batching, configuration, popularity, AUC


def test_batch_size_does_not_change_results() -> None:
    rng = np.random.default_rng(7)
    n_users, n_items = 40, 70
    scores = torch.from_numpy(rng.standard_normal((n_users, n_items))).float()
    train = [(int(u), int(i), int(rng.integers(-1, 5))) for u, i in rng.integers(0, 40, (400, 2))]
    heldout = [(int(u), int(i), int(rng.integers(-1, 5))) for u, i in rng.integers(0, 40, (300, 2))]
    results = []
    for batch in (1, 7, 10_000, None):
        calls: list[torch.Tensor] = []
        config = EvalConfig(ks=(1, 5, 20), batch_users=batch)
        results.append(
            full_ranking_metrics(
                table_scorer(scores, calls), n_items, frame(heldout), frame(train), LEVELS, config
            )
        )
        evaluated = len(torch.cat(calls).unique())
        assert len(calls) == math.ceil(evaluated / (batch or 10**9))  # one call per batch
        assert all(c.dtype == torch.long for c in calls)
    assert all(r == results[0] for r in results[1:])
    assert results[0]["n_users"] > 20


def test_no_evaluable_user_gives_counts_only() -> None:
    heldout = [(0, 1, 0), (1, 2, -1)]
    got = full_ranking_metrics(
        table_scorer(torch.zeros(2, 4)), 4, frame(heldout), frame([]), LEVELS, EvalConfig()
    )
    assert got == {"n_users": 0.0} | {f"n_users/{name}": 0.0 for name in LEVELS.values()}


def test_bad_inputs_are_rejected() -> None:
    with pytest.raises(ValidationError):
        EvalConfig(bogus=1)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        EvalConfig(ks=(0, 10))
    with pytest.raises(ValueError, match="outside"):
        full_ranking_metrics(
            table_scorer(torch.zeros(2, 4)), 4, frame([(0, 4, 1)]), frame([]), LEVELS
        )
    with pytest.raises(ValueError, match="shape"):
        full_ranking_metrics(lambda u: torch.zeros(len(u), 3), 4, frame([(0, 1, 1)]), frame([]), {})


def test_item_popularity_counts_positive_pairs() -> None:
    train = frame([(0, 1, 1), (1, 1, 4), (2, 1, 0), (0, 3, -1), (1, 3, 2), (2, 0, 4)])
    assert item_popularity(train, 5).tolist() == [1, 2, 0, 1, 0]
    assert item_popularity(train, 5, min_label=4).tolist() == [1, 1, 0, 0, 0]


def brute_force_auc(scores: list[float], labels: list[int], t: int) -> float:
    pos = [s for s, label in zip(scores, labels, strict=True) if label >= t]
    neg = [s for s, label in zip(scores, labels, strict=True) if label < t]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_level_auc_matches_pairwise_count(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 200))
    labels = rng.integers(-1, 4, n)  # no label 4: level 4 has no positive side
    scores = np.round(rng.standard_normal(n) + 0.3 * labels, 1)  # rounding makes ties
    got = level_auc(scores, labels, [0, 1, 2, 3, 4])
    for t in (0, 1, 2, 3):
        if (labels >= t).all() or (labels < t).all():
            assert t not in got
        else:
            assert got[t] == pytest.approx(brute_force_auc(scores.tolist(), labels.tolist(), t))
    assert 4 not in got
    assert all(0.0 <= v <= 1.0 for v in got.values())


def test_level_auc_extremes() -> None:
    labels = np.array([-1, 0, 1, 2, 3])
    assert level_auc(labels.astype(float), labels, [1, 3]) == {1: 1.0, 3: 1.0}
    assert level_auc(-labels.astype(float), labels, [2]) == {2: 0.0}
    assert level_auc(np.zeros(5), labels, [2]) == {2: 0.5}


# --------------------------------------------------------------------------------------------
# the per-list metrics shared by evaluation and the promotion gate


def test_ranking_metrics_on_a_hand_computed_example() -> None:
    """Two users, values worked out by hand from the definitions.

    a: list x y z w, relevant {y, w, q} (q never listed, e.g. an item the model does not know)
      k=2: 1 hit (rank 2); recall 1 / min(2, 3); DCG 1/log2(3); ideal 1 + 1/log2(3)
      k=4: 2 hits (ranks 2, 4); recall 2 / min(4, 3); DCG 1/log2(3) + 1/log2(5);
           ideal over 3 slots 1 + 1/log2(3) + 1/2
    b: list p p (a duplicate), relevant {p}: one hit at rank 1, slots past the list are misses
    """
    hits, n_relevant = hit_matrix(
        [["x", "y", "z", "w"], ["p", "p"]], [{"y", "w", "q"}, {"p"}], depth=4
    )
    assert hits.tolist() == [[False, True, False, True], [True, False, False, False]]
    assert n_relevant.tolist() == [3, 1]
    m = ranking_metrics(hits, n_relevant, ks=(2, 4))
    l3, l5 = math.log2(3), math.log2(5)
    assert m["recall"] == pytest.approx(np.array([[1 / 2, 2 / 3], [1.0, 1.0]]))
    assert m["ndcg"] == pytest.approx(
        np.array([[(1 / l3) / (1 + 1 / l3), (1 / l3 + 1 / l5) / (1 + 1 / l3 + 1 / 2)], [1, 1]])
    )
    assert m["hr"].tolist() == [[1.0, 1.0], [1.0, 1.0]]
    # k past the end of the lists: the missing slots are misses, recall still caps at k
    short = ranking_metrics(hits[:, :1], n_relevant, ks=(3,))
    assert short["recall"] == pytest.approx(np.array([[0.0], [1.0]]))


def test_ranking_metrics_rejects_users_without_relevant_items() -> None:
    with pytest.raises(ValueError, match="at least one relevant"):
        ranking_metrics(np.zeros((1, 3), dtype=bool), np.array([0]), ks=(3,))
    with pytest.raises(ValueError, match="more hits"):
        ranking_metrics(np.ones((1, 3), dtype=bool), np.array([2]), ks=(3,))


def write_etl(path, n_users: int, n_items: int, splits: dict[str, list[Pair]]) -> None:
    """The part of an ETL output directory the gate reads: id maps, splits, the signal map."""
    pl.DataFrame({"user_idx": range(n_users), "user_id": [f"u{u}" for u in range(n_users)]}).cast(
        {"user_idx": pl.UInt32}
    ).write_parquet(path / "users.parquet")
    pl.DataFrame({"item_idx": range(n_items), "item_id": [f"i{i}" for i in range(n_items)]}).cast(
        {"item_idx": pl.UInt32}
    ).write_parquet(path / "items.parquet")
    for name, pairs in splits.items():
        frame(pairs).write_parquet(path / f"{name}.parquet")
    # three levels; the deepest (purchase, 3) does not repeat, so it is hidden with -1
    spec = {"levels": [{"name": "view"}, {"name": "cart"}, {"name": "purchase"}], "signals": {}}
    (path / "stats.json").write_text(json.dumps({"signal_map_spec": spec}))


@pytest.mark.parametrize("source", ["vectors", "lists"])
@pytest.mark.parametrize("seed", range(3))
def test_gate_and_evaluation_report_the_same_ndcg_and_recall(tmp_path, seed, source) -> None:
    """The same rankings through `full_ranking_metrics` and the gate's `holdout_metrics` give
    the same ndcg@k and recall@k, on data where the definitions used to differ: users with more
    relevant items than k, holdout positives that are hidden earlier purchases, negatives."""
    from recfb.pipeline.gate import Vectors, holdout_metrics

    rng = np.random.default_rng(seed)
    n_users, n_items, k = 20, 30, 5
    cells = [(u, i) for u in range(n_users) for i in range(n_items)]
    order = rng.permutation(len(cells))
    train = [(*cells[j], int(rng.choice([-1, 1, 2, 3]))) for j in order[:150]]
    valid = [(*cells[j], int(rng.choice([-1, 1, 3]))) for j in order[150:180]]
    fresh = [(*cells[j], int(rng.choice([-1, 1, 2, 3]))) for j in order[180:330]]
    again = [(u, i, 3) for u, i, label in train[:40] if label in (-1, 3)]  # hidden, bought again
    test = fresh + again
    write_etl(tmp_path, n_users, n_items, {"train": train, "valid": valid, "test": test})
    hidden = {(u, i) for u, i, label in train + valid if label in (-1, 3)}
    relevant = defaultdict(set)
    for u, i, label in test:
        if label >= 1 and (u, i) not in hidden:
            relevant[u].add(i)
    assert any(len(r) > k for r in relevant.values())  # the recall cap matters
    assert any(label >= 1 and (u, i) in hidden for u, i, label in test)  # so does the mask

    user_vectors = rng.standard_normal((n_users, 8))
    item_vectors = rng.standard_normal((n_items, 8))
    model = Vectors(
        np.array([f"u{u}" for u in range(n_users)]),
        user_vectors,
        np.array([f"i{i}" for i in range(n_items)]),
        item_vectors,
    )
    if source == "vectors":
        table = torch.from_numpy(user_vectors @ item_vectors.T)
        lists = None
    else:  # another ranking, handed to the gate as id lists (as the two-stage recommender does)
        table = torch.from_numpy(rng.standard_normal((n_users, n_items)))
        lists = {}
        for u in range(n_users):
            allowed = [i for i in range(n_items) if (u, i) not in hidden]
            ranked = sorted(allowed, key=lambda i, u=u: -float(table[u, i]))[:k]
            lists[f"u{u}"] = [f"i{i}" for i in ranked]

    config = EvalConfig(ks=(k,), exclude="signals", hidden_labels=(-1, 3))
    want = full_ranking_metrics(
        table_scorer(table), n_items, frame(test), frame(train + valid), {}, config
    )
    got = holdout_metrics(model, tmp_path, k=k, lists=lists)
    assert got["users"] == want["n_users"] == len(relevant)
    assert got[f"ndcg@{k}"] == pytest.approx(want[f"ndcg@{k}"], rel=1e-12)
    assert got[f"recall@{k}"] == pytest.approx(want[f"recall@{k}"], rel=1e-12)

"""GNOLR's likelihood pieces against their definitions, and learning on real data."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from recfb.config import build_model, read_yaml
from recfb.models.gnolr import GNOLR
from recfb.recommender import train
from recfb.train.config import TrainConfig
from recfb.train.data import Interactions
from recfb.train.fit import evaluate_scorer

from conftest import CONF, RandomScorer, run, shared_file


def _model(**model) -> GNOLR:
    cfg = {"model": {"family": "gnolr", "dim": 4} | model}
    return GNOLR(6, 5, 3, cfg, level_rates=torch.tensor([0.5, 0.2, 0.1]))


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_ordinal_nll_matches_the_definition_and_censoring_drops_the_upper_bound():
    model = _model()
    z = torch.tensor([[1.0, -0.5, -2.0]] * 4)
    labels = torch.tensor([0, 1, 2, 3])
    p_at_least = [1.0] + [_sigmoid(v) for v in (1.0, -0.5, -2.0)] + [0.0]
    expected = [-math.log(p_at_least[y] - p_at_least[y + 1]) for y in range(4)]
    got = model.ordinal_nll(z, labels)
    assert torch.allclose(got, torch.tensor(expected), atol=1e-5)
    # a label that has not matured only says "at least y"
    censored = torch.tensor([False, True, True, True])
    got = model.ordinal_nll(z, labels, censored)
    expected_censored = [expected[0]] + [-math.log(p_at_least[y]) for y in (1, 2, 3)]
    assert torch.allclose(got, torch.tensor(expected_censored), atol=1e-5)


def test_shared_towers_start_with_one_geometry_for_every_level():
    model = _model(level_towers="shared")
    users, items = model.encode()
    t, d = 3, 4
    u = users[:, : t * d].view(-1, t, d)
    i = items[:, : t * d].view(-1, t, d)
    # identity-initialised heads: each level's sub-vector is the same unit vector (x scale)
    assert torch.allclose(i[:, 0], i[:, 2], atol=1e-6)
    assert torch.allclose(i[:, 0].norm(dim=-1), torch.ones(5), atol=1e-6)
    assert torch.allclose(u[:, 0] / 5.0, u[:, 2] / 5.0, atol=1e-6)
    separate = _model(level_towers="separate").encode()[1][:, : t * d].view(-1, t, d)
    assert not torch.allclose(separate[:, 0], separate[:, 2], atol=1e-3)


def test_serve_level_makes_one_inner_product_rank_by_a_shallower_level():
    model = _model(serve_level=2)
    with torch.no_grad():  # give the biases values, so that their columns count too
        model.item_bias.weight.normal_()
    users, items = torch.arange(6).repeat_interleave(5), torch.arange(5).repeat(6)
    q, v = model.vectors()
    inner = (q[users] * v[items]).sum(-1)
    z = model.level_scores(users, items)  # every level, whatever is served
    assert torch.allclose(inner, z[:, 1] + model.thresholds[1], atol=1e-5)
    assert not torch.allclose(inner, z[:, 2] + model.thresholds[2], atol=1e-3)
    with pytest.raises(ValueError, match="serve_level"):
        _model(serve_level=4)


def test_all_level_negatives_push_every_cumulative_logit():
    model = _model(ordinal_negatives="all_levels")
    q, v = (x.detach().requires_grad_(True) for x in model.encode())
    pos, neg = torch.tensor([0]), torch.tensor([[1, 2]])
    loss = model.example_losses(q[pos], v[pos], v[neg], pos, torch.tensor([3]))
    loss.sum().backward()
    # the negatives' deepest sub-vector (level 3) and bias receive gradient
    assert v.grad[1, 8:12].abs().sum() > 0 and v.grad[2, -1].abs() > 0
    model = _model(ordinal_negatives="first_level")
    q, v = (x.detach().requires_grad_(True) for x in model.encode())
    loss = model.example_losses(q[pos], v[pos], v[neg], pos, torch.tensor([3]))
    loss.sum().backward()
    assert v.grad[1, 8:12].abs().sum() == 0


@pytest.fixture(scope="module")
def taobao(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = shared_file("taobao_userbehavior_84k.csv")
    cfg = read_yaml(CONF / "datasets" / "taobao.yaml")
    base = tmp_path_factory.mktemp("taobao")
    run(base, [path], CONF / "signals" / "taobao.yaml", input=cfg["input"], split=cfg["split"])
    return base / "out"


@pytest.mark.slow
def test_gnolr_on_taobao_beats_random_and_popularity(
    taobao: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Real data, few epochs: ranking by P(purchase) must carry the users' taste."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns.db'}")
    monkeypatch.chdir(tmp_path)
    eval_rule = {"ks": [10, 20], "exclude": "min_level", "exclude_min_level": 3}
    data = {
        "data": str(taobao),
        "model": {"family": "gnolr", "dim": 32},
        "trainer": {"max_epochs": 4, "batch_size": 1024, "lr": 0.01, "patience": 4},
        "eval": eval_rule,
    }
    result = train(build_model(TrainConfig, data, "test"), quiet=True)
    interactions = Interactions.load(taobao)
    cfg = build_model(TrainConfig, data, "test")
    random = evaluate_scorer(
        RandomScorer(interactions.n_items), interactions, interactions.test, cfg
    )
    popularity = train(
        build_model(TrainConfig, data | {"model": {"family": "popularity"}}, "test"), quiet=True
    )
    ndcg = result.metrics["test/ndcg@20"]
    assert ndcg > 5 * max(random["ndcg@20"], 1e-4), (ndcg, random["ndcg@20"])
    assert ndcg > 2 * popularity.metrics["test/ndcg@20"], (ndcg, popularity.metrics)

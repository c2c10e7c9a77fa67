"""SNIPS recall (`recfb.evaluate.ips`): hand-computed cases, and its wiring into training."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from recfb.evaluate import EvalConfig
from recfb.evaluate.ips import propensities, snips_recall

# 3 users x 6 items; each user's list is the item order of its score row, best first
SCORES = torch.tensor(
    [
        [6.0, 5.0, 4.0, 3.0, 2.0, 1.0],  # user 0 ranks 0, 1, 2, ...
        [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],  # user 1 ranks 5, 4, 3, ...
        [0.0, 9.0, 0.0, 8.0, 0.0, 7.0],  # user 2 ranks 1, 3, 5, ...
    ]
)


def score(users: torch.Tensor) -> torch.Tensor:
    return SCORES[users]


def _pairs(rows: list[tuple[int, int, int]]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=["user_idx", "item_idx", "label"], orient="row")


HELDOUT = _pairs([(0, 1, 1), (0, 4, 2), (1, 5, 1), (1, 0, 1), (2, 2, 1), (2, 3, 0)])
NO_TRAIN = _pairs([]).cast({"user_idx": pl.Int64, "item_idx": pl.Int64, "label": pl.Int64})
THETA = np.array([1.0, 0.5, 0.25, 1.0, 1.0, 0.1])


def test_snips_recall_weights_each_relevant_item_by_its_inverse_propensity():
    cfg = EvalConfig(ks=(2, 5), exclude="none")
    got = snips_recall(score, 6, HELDOUT, NO_TRAIN, THETA, cfg)
    # user 0: relevant 1 (w 2), 4 (w 1); top-2 = {0, 1}: 2/3; top-5 = {0..4}: 3/3
    # user 1: relevant 5 (w 10), 0 (w 1); top-2 = {5, 4}: 10/11; top-5 lacks 0: 10/11
    # user 2: relevant 2 (w 4) (item 3 is label 0); top-2 = {1, 3}: 0; top-5 has 2: 1
    assert got["n_users"] == 3
    assert got["snips_recall@2"] == pytest.approx((2 / 3 + 10 / 11 + 0) / 3)
    assert got["snips_recall@5"] == pytest.approx((1 + 10 / 11 + 1) / 3)


def test_equal_propensities_give_plain_recall_and_masked_items_are_not_relevant():
    cfg = EvalConfig(ks=(2,), exclude="any")
    train = _pairs([(1, 5, 1)])  # user 1 already has item 5: masked, so not relevant
    got = snips_recall(score, 6, HELDOUT, train, np.ones(6), cfg)
    # user 0: 1 of 2 in top-2; user 1: relevant {0}, top-2 (5 masked) = {4, 3}: 0; user 2: 0
    assert got["snips_recall@2"] == pytest.approx((1 / 2 + 0 + 0) / 3)


def test_propensities_match_the_training_rule():
    from recfb.models.mf import MatrixFactorization
    from recfb.train.config import TrainConfig

    counts = np.array([0.0, 3.0, 30.0, 300.0])
    cfg = TrainConfig.model_validate({"debias": {"ips": True, "eta": 0.5, "clip": 0.2}})
    settings = cfg.embedding_settings().model_dump(mode="json")
    model = MatrixFactorization(1, 4, 1, settings, item_popularity=torch.tensor(counts))
    assert np.allclose(propensities(counts, 0.5, 0.2), model.propensity.numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="positive propensities"):
        snips_recall(score, 6, HELDOUT, NO_TRAIN, np.zeros(6))


def test_training_reports_snips_recall_with_exposure_propensities():
    from test_exposure import SIGNALS, _raw

    import recfb
    from recfb.config import build_model
    from recfb.train.config import TrainConfig
    from recfb.train.loop import fit_model

    data = recfb.etl.run(
        _raw(seed=6, n=8_000), SIGNALS, split={"method": "temporal", "test_frac": 0.3}
    )
    cfg = build_model(
        TrainConfig,
        {
            "model": {"family": "popularity"},
            "eval": {"snips": True},
            "debias": {"propensity": "exposure"},
        },
        "test",
    )
    metrics = fit_model(cfg, data).metrics
    values = [metrics[f"test/snips_recall@{k}"] for k in (10, 20, 50)]
    assert 0 <= values[0] <= values[1] <= values[2] <= 1
    assert values[2] > 0

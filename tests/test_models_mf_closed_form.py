"""MF's closed-form training step must compute the same loss and gradients as autograd on
`batch_loss` (recfb/models/mf.py): it replaces it for speed only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recfb.models.mf import MatrixFactorization

from conftest import random_train_pairs

N_USERS, N_ITEMS, N_CATEGORIES = 60, 40, 5


def _model(**settings) -> MatrixFactorization:
    """An MF model on random pairs with uneven weights, explicit negatives and item codes."""
    rng = np.random.default_rng(0)
    pairs, popularity = random_train_pairs(rng, N_USERS, N_ITEMS)
    codes = {"category": torch.as_tensor(rng.integers(1, N_CATEGORIES + 1, N_ITEMS))}
    torch.manual_seed(1)
    model = MatrixFactorization(
        N_USERS,
        N_ITEMS,
        2,
        {"model": {"family": "mf", "dim": 8, "n_negatives": 3}} | settings,
        train_pairs=pairs,
        item_popularity=popularity,
        item_feature_codes=codes,
    )
    with torch.no_grad():  # feature rows start at zero; give them values so they matter
        for table in model.feature_tables.values():
            table.weight.normal_(std=0.1)
    return model


def _gradients(model: MatrixFactorization) -> dict[str, torch.Tensor]:
    out = {name: p.grad.to_dense().clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out


CASES = [
    {"model": {"loss": "bpr"}},
    {"model": {"loss": "bce"}},
    {"model": {"loss": "bpr"}, "debias": {"ips": True}},
    {"model": {"loss": "bce"}, "debias": {"ips": True}},
    {"model": {"loss": "bce"}, "debias": {"ips": True, "nonnegative": True}},
    {"model": {"loss": "bpr"}, "denoise": {"method": "tce", "warmup_epochs": 0}},
    {"model": {"loss": "bce"}, "denoise": {"method": "tce", "warmup_epochs": 0}},
    {"model": {"loss": "bpr"}, "denoise": {"method": "pld", "warmup_epochs": 0}},
    {"model": {"loss": "bpr", "item_features": ["category"]}},
    {"model": {"loss": "bce", "item_features": ["category"]}, "debias": {"ips": True}},
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: str(c).replace(" ", ""))
def test_closed_form_gradients_equal_autograd(case: dict) -> None:
    settings = {k: v for k, v in case.items() if k != "model"}
    model = _model(**settings, model={"family": "mf", "dim": 8, "n_negatives": 3} | case["model"])
    model.train()
    idx = torch.randperm(len(model.pos_users), generator=torch.Generator().manual_seed(2))[:256]

    torch.manual_seed(5)  # the same negatives (and PLD draws) on both paths
    expected_loss = model.batch_loss(idx)
    expected_loss.backward()
    expected = _gradients(model)

    torch.manual_seed(5)
    loss = model.closed_form_backward(idx)
    assert loss is not None
    got = _gradients(model)

    assert torch.allclose(loss, expected_loss.detach(), rtol=1e-5, atol=1e-7)
    assert set(got) == set(expected)
    for name, grad in expected.items():
        assert grad.abs().sum() > 0, name  # every table takes part in the step
        assert torch.allclose(got[name], grad, rtol=1e-4, atol=1e-7), name


@pytest.mark.parametrize(
    "settings",
    [
        {"model": {"family": "mf", "loss": "softmax"}},
        {"optim": {"weight_decay": 0.01}},  # dense tables: autograd and dense Adam
    ],
)
def test_uncovered_configs_fall_back_to_autograd(settings: dict) -> None:
    model = _model(**settings)
    assert model.closed_form_backward(torch.arange(32)) is None


def test_a_batch_smaller_than_the_catalogue_keeps_autograd() -> None:
    model = _model()  # 40 items, 3 negatives: 4 entries a positive
    assert model.closed_form_backward(torch.arange(9)) is None  # 36 entries < 40 items
    assert model.closed_form_backward(torch.arange(10)) is not None  # 40 entries

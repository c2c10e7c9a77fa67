"""LightGCN topm's closed-form training step must compute the same loss and table gradient
as autograd on `batch_loss` (recfb/models/lightgcn.py): it replaces it for speed only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recfb.models.lightgcn import LightGCN, normalized_adjacency

from conftest import random_train_pairs

N_USERS, N_ITEMS = 60, 40


def _model(**settings) -> LightGCN:
    """A topm LightGCN on random pairs with uneven weights and explicit negatives."""
    rng = np.random.default_rng(0)
    pairs, popularity = random_train_pairs(rng, N_USERS, N_ITEMS)
    model_settings = {"family": "lightgcn", "dim": 8, "n_negatives": 3, "propagation": "topm"}
    model_settings |= {"topm": 4} | settings.pop("model", {})
    users, items = pairs["pos_users"], pairs["pos_items"]
    adjacency = normalized_adjacency(users, items, torch.ones(len(users)), N_USERS, N_ITEMS)
    torch.manual_seed(1)
    model = LightGCN(
        N_USERS,
        N_ITEMS,
        2,
        {"model": model_settings} | settings,
        train_pairs=pairs,
        item_popularity=popularity,
        adjacency=adjacency,
    )
    model.on_fit_start()
    return model


CASES = [
    {"model": {"loss": "bpr"}},
    {"model": {"loss": "bce"}},
    {"model": {"loss": "bpr"}, "debias": {"ips": True}},
    {"model": {"loss": "bce"}, "debias": {"ips": True}},
    {"model": {"loss": "bpr", "layers": 2}, "denoise": {"method": "tce", "warmup_epochs": 0}},
    {"model": {"loss": "bpr"}, "denoise": {"method": "pld", "warmup_epochs": 0}},
]


@pytest.mark.parametrize("batch", [256, 3], ids=["most-items", "few-items"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: str(c).replace(" ", ""))
def test_closed_form_gradient_equals_autograd(case: dict, batch: int) -> None:
    model = _model(**case)
    model.train()
    table = model.embedding.weight
    idx = torch.randperm(len(model.pos_users), generator=torch.Generator().manual_seed(2))
    idx = idx[:batch]

    torch.manual_seed(5)  # the same negatives (and PLD draws) on both paths
    expected_loss = model.batch_loss(idx)
    expected_loss.backward()
    expected = table.grad.clone()
    table.grad = None

    torch.manual_seed(5)
    loss = model.closed_form_backward(idx)
    assert loss is not None
    assert torch.allclose(loss, expected_loss.detach(), rtol=1e-5, atol=1e-7)
    assert expected.abs().sum() > 0
    assert torch.allclose(table.grad, expected, rtol=1e-4, atol=1e-7)
    # a second step before the optimiser clears the gradient accumulates, as autograd's does
    once = table.grad.clone()
    torch.manual_seed(5)
    model.closed_form_backward(idx)
    assert torch.allclose(table.grad, 2 * once, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "settings",
    [
        {"model": {"loss": "softmax"}},
        {"model": {"propagation": "full"}},
        {"optim": {"distributed": True}},  # DDP all-reduces only autograd's gradients
    ],
)
def test_uncovered_configs_fall_back_to_autograd(settings: dict) -> None:
    assert _model(**settings).closed_form_backward(torch.arange(32)) is None


def test_the_step_leaves_deterministic_fill_as_it_was() -> None:
    model = _model()
    flag = torch.utils.deterministic.fill_uninitialized_memory
    model.closed_form_backward(torch.arange(32))
    assert torch.utils.deterministic.fill_uninitialized_memory == flag


def test_sgd_applied_in_the_step_moves_the_table_as_torch_sgd() -> None:
    """With SGD the closed-form step updates the table itself (no gradient left for the
    optimiser): over steps, the same table as autograd and torch's SGD."""
    fast, plain = _model(optim={"optimizer": "sgd", "lr": 2.0}), _model()
    with torch.no_grad():
        plain.embedding.weight.copy_(fast.embedding.weight)
    (sgd,) = fast.configure_optimizers()
    reference = torch.optim.SGD(plain.parameters(), lr=2.0)
    for step in range(3):
        idx = torch.arange(64) + 64 * step
        torch.manual_seed(step)
        sgd.zero_grad()
        assert fast.closed_form_backward(idx) is not None
        assert fast.embedding.weight.grad is None
        sgd.step()
        torch.manual_seed(step)
        reference.zero_grad()
        plain.batch_loss(idx).backward()
        reference.step()
    moved = (fast.embedding.weight - plain.embedding.weight).abs().max()
    assert moved < 1e-5
    assert not torch.allclose(fast.embedding.weight, _model().embedding.weight)

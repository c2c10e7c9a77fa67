"""LightGCN topm lays its table out hot rows first (rows that item bags reach) and Adam moves
cold rows only in steps that reach them (recfb/models/lightgcn.py, `_lay_out`,
`_lazy_adam`); the layout must not show outside the model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recfb.models.lightgcn import (
    LightGCN,
    _drift,
    normalized_adjacency,
    propagation_operator,
)

from conftest import random_train_pairs

N_USERS, N_ITEMS = 60, 40
LR = 0.05


def _model(fit: bool = True) -> LightGCN:
    rng = np.random.default_rng(0)
    pairs, popularity = random_train_pairs(rng, N_USERS, N_ITEMS)
    users, items = pairs["pos_users"], pairs["pos_items"]
    adjacency = normalized_adjacency(users, items, torch.ones(len(users)), N_USERS, N_ITEMS)
    torch.manual_seed(1)
    settings = {"family": "lightgcn", "dim": 8, "n_negatives": 3, "propagation": "topm"}
    model = LightGCN(
        N_USERS,
        N_ITEMS,
        2,
        {"model": settings | {"topm": 2}, "optim": {"lr": LR}},
        train_pairs=pairs,
        item_popularity=popularity,
        adjacency=adjacency,
    )
    if fit:
        model.on_fit_start()
    return model


def test_layout_puts_hot_rows_first_and_keeps_node_order_outside() -> None:
    model, fresh = _model(), _model(fit=False)
    n, hot = N_USERS + N_ITEMS, model._hot_rows
    assert hot is not None and N_ITEMS < hot < n  # some users are cold
    neighbours, weights = model.operator_bags()
    assert int(neighbours[N_USERS:][weights[N_USERS:] > 0].max()) < hot
    # state_dict and encode see nodes: the initial table, P @ E0 in node order
    table = model.state_dict()["embedding.weight"]
    assert torch.equal(table, fresh.embedding.weight.detach())
    operator = propagation_operator(model.adjacency, 1, 2)
    users, items = model.encode()
    expected = operator @ table
    assert torch.allclose(torch.cat([users, items]), expected, atol=1e-6)
    # a node-order state loads into a laid-out model, or into one laid out afterwards
    for other in (_model(), _model(fit=False)):
        with torch.no_grad():
            other.embedding.weight.mul_(0)
        other.load_state_dict(model.state_dict())
        assert torch.equal(other.state_dict()["embedding.weight"], table)
        for got, want in zip(other.encode(), (users, items), strict=True):
            assert torch.allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("last", [3, 1000])
@pytest.mark.parametrize("missed", [5, 50])
def test_drift_is_dense_adams_zero_gradient_steps(last: int, missed: int) -> None:
    torch.manual_seed(0)
    p, m = torch.randn(4, 8), torch.randn(4, 8) * 1e-2
    v = torch.rand(4, 8) * 1e-4
    group = {"betas": (0.9, 0.999), "lr": LR, "eps": 1e-8}
    expected = [p.clone(), m.clone(), v.clone()]
    for step in range(last + 1, last + missed + 1):  # Adam's steps with a zero gradient
        ep, em, ev = expected
        em.mul_(0.9)
        ev.mul_(0.999)
        ep.sub_(LR / (1 - 0.9**step) * em / (ev.sqrt() / (1 - 0.999**step) ** 0.5 + 1e-8))
    _drift(p, m, v, torch.full((4,), last), last + missed, group)
    for got, want in zip((p, m, v), expected, strict=True):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)
    moved = (expected[0] - p).abs().max()
    assert moved < 1e-2 * (p - torch.randn(4, 8)).abs().max()


def test_lazy_adam_moves_cold_rows_when_reached_and_catches_up_to_dense_adam() -> None:
    """Cold rows move only in the steps that reach them; `catch_up` then applies the
    zero-gradient steps they missed: the table is dense Adam's (here every user is in one
    step only, so the stale rows are never read in between)."""
    fast, autograd, plain = _model(), _model(), _model()
    autograd._bag_into_grad = plain._bag_into_grad = False  # gradients from autograd
    hot = fast._hot_rows
    (adam,) = fast.configure_optimizers()
    (adam_autograd,) = autograd.configure_optimizers()
    dense = torch.optim.Adam(plain.parameters(), lr=LR)
    for step in range(3):
        idx = torch.arange(16) + 16 * step  # other users each step: cold rows left out
        torch.manual_seed(step)
        adam.zero_grad()
        assert fast.closed_form_backward(idx) is not None
        adam.step()
        assert fast.embedding.weight.grad is None
        for model, opt in ((autograd, adam_autograd), (plain, dense)):
            torch.manual_seed(step)
            opt.zero_grad()
            model.batch_loss(idx).backward()
            opt.step()
    expected = plain.embedding.weight.detach()
    for model in (fast, autograd):
        table = model.embedding.weight.detach()
        assert torch.allclose(table[:hot], expected[:hot], atol=1e-6)
        assert not torch.allclose(table[hot:], expected[hot:], atol=1e-4)  # lazy till now
        model.catch_up()
        assert torch.allclose(model.embedding.weight, expected, atol=1e-6)

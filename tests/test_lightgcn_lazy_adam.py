"""LightGCN topm lays its table out hot rows first (rows that item bags reach) and Adam moves
cold rows only in steps that reach them (recfb/models/lightgcn.py, `_lay_out`,
`_lazy_adam`); the layout must not show outside the model."""

from __future__ import annotations

import numpy as np
import torch

from recfb.models.lightgcn import LightGCN, normalized_adjacency, propagation_operator

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


def _reference_step(table, grad, state, hot: int) -> None:
    """Adam on the hot rows and on the cold rows with a gradient, by the book."""
    state["t"] += 1
    t = state["t"]
    rows = torch.cat([torch.arange(hot), hot + (grad[hot:] != 0).any(1).nonzero().squeeze(1)])
    m, v, g = state["m"][rows], state["v"][rows], grad[rows]
    m = 0.9 * m + 0.1 * g
    v = 0.999 * v + 0.001 * g * g
    denom = (v / (1 - 0.999**t)).sqrt() + 1e-8
    table[rows] -= LR / (1 - 0.9**t) * m / denom
    state["m"][rows], state["v"][rows] = m, v


def test_lazy_adam_moves_hot_rows_as_adam_and_cold_rows_when_reached() -> None:
    fast, autograd, plain = _model(), _model(), _model()
    autograd._bag_into_grad = plain._bag_into_grad = False  # gradients from autograd
    hot = fast._hot_rows
    start = fast.embedding.weight.detach().clone()
    (adam,) = fast.configure_optimizers()
    (adam_autograd,) = autograd.configure_optimizers()
    state = {"t": 0, "m": torch.zeros_like(start), "v": torch.zeros_like(start)}
    dense = torch.optim.Adam([torch.nn.Parameter(start.clone())], lr=LR)
    for step in range(3):
        idx = torch.arange(16) + 16 * step  # other users each step: cold rows left out
        torch.manual_seed(step)
        adam.zero_grad()
        assert fast.closed_form_backward(idx) is not None
        adam.step()
        assert fast.embedding.weight.grad is None
        for model, opt in ((autograd, adam_autograd), (plain, None)):
            torch.manual_seed(step)
            model.embedding.weight.grad = None
            model.batch_loss(idx).backward()
            if opt is not None:
                opt.step()
        grad = plain.embedding.weight.grad
        with torch.no_grad():
            _reference_step(plain.embedding.weight, grad, state, hot)
        dense.param_groups[0]["params"][0].grad = grad.clone()
        dense.step()
    expected = plain.embedding.weight.detach()
    assert torch.allclose(fast.embedding.weight, expected, atol=1e-5)
    assert torch.allclose(autograd.embedding.weight, expected, atol=1e-5)
    # cold rows reached in one step only keep their vector afterwards; dense Adam moves them
    assert not torch.allclose(dense.param_groups[0]["params"][0], expected, atol=1e-4)
    assert torch.allclose(
        fast.embedding.weight[:hot], dense.param_groups[0]["params"][0][:hot], atol=1e-6
    )

"""RowSparseAdagrad and RowSparseSGD must move embedding rows exactly as torch's Adagrad and
SGD do on the dense equivalent (recfb/models/base.py): both leave rows with a zero gradient
untouched, so the row-sparse forms are the same update, only cheaper."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from recfb.models.base import RowSparseAdagrad, RowSparseSGD


def _train(optimizer_cls: type, sparse: bool, steps: int = 25, **kwargs) -> torch.Tensor:
    torch.manual_seed(0)
    table = nn.Embedding(500, 16, sparse=sparse)
    target = torch.randn(500, 16)
    opt = optimizer_cls(table.parameters(), **kwargs)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        # repeated rows in a batch, as when a popular item is sampled twice
        idx = torch.randint(0, 60, (128,), generator=gen)
        loss = ((table(idx) - target[idx]) ** 2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return table.weight.detach().clone()


@pytest.mark.parametrize(
    ("ours", "reference", "lr"),
    [(RowSparseAdagrad, torch.optim.Adagrad, 0.05), (RowSparseSGD, torch.optim.SGD, 0.002)],
)
def test_matches_torch_on_dense_tables(ours: type, reference: type, lr: float) -> None:
    sparse, dense = _train(ours, True, lr=lr), _train(reference, False, lr=lr)
    start = _train(ours, True, steps=0, lr=lr)
    assert not torch.equal(sparse, start)  # the rows did move
    assert torch.allclose(sparse, dense, atol=1e-5, rtol=1e-5)
    assert torch.equal(sparse[60:], start[60:])  # rows never in a batch stay


@pytest.mark.parametrize("cls", [RowSparseAdagrad, RowSparseSGD])
def test_refuses_dense_gradients(cls: type) -> None:
    table = nn.Embedding(10, 4)
    opt = cls(table.parameters())
    table(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()


@pytest.mark.parametrize("name", ["adam", "adagrad", "sgd"])
def test_config_picks_the_optimizer(name: str) -> None:
    from recfb.models.base import OPTIMIZERS
    from recfb.models.mf import MatrixFactorization

    model = MatrixFactorization(
        5, 4, 2, {"model": {"family": "mf", "dim": 4}, "optim": {"optimizer": name}}
    )
    (opt,) = model.configure_optimizers()
    assert type(opt) is OPTIMIZERS[name][0]

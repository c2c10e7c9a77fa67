"""The row-sparse optimisers must move embedding rows exactly as torch's do (recfb/models/
base.py): RowSparseAdam as SparseAdam, RowSparseAdagrad and RowSparseSGD as Adagrad and SGD
on the dense equivalent (both leave rows with a zero gradient untouched). They replace
torch's for speed only."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from recfb.models.base import RowSparseAdagrad, RowSparseAdam, RowSparseSGD, unique_rows


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
    ("ours", "reference", "reference_sparse", "lr"),
    [
        (RowSparseAdam, torch.optim.SparseAdam, True, 0.05),
        (RowSparseAdagrad, torch.optim.Adagrad, False, 0.05),
        (RowSparseSGD, torch.optim.SGD, False, 0.002),
    ],
)
def test_matches_torch(ours: type, reference: type, reference_sparse: bool, lr: float) -> None:
    sparse, theirs = _train(ours, True, lr=lr), _train(reference, reference_sparse, lr=lr)
    start = _train(ours, True, steps=0, lr=lr)
    assert not torch.equal(sparse, start)  # the rows did move
    assert torch.allclose(sparse, theirs, atol=1e-5, rtol=1e-5)
    # rows never in a batch stay where they were (lazy: no decay of untouched rows)
    assert torch.equal(sparse[60:], start[60:])


def test_unique_rows_sums_repeats() -> None:
    grad = torch.sparse_coo_tensor(
        torch.tensor([[4, 1, 4, 9]]), torch.tensor([[1.0], [2.0], [3.0], [4.0]]), (10, 1)
    )
    rows, summed = unique_rows(grad)
    assert rows.tolist() == [1, 4, 9]
    assert summed.squeeze(1).tolist() == [2.0, 4.0, 4.0]


@pytest.mark.parametrize("cls", [RowSparseAdam, RowSparseAdagrad, RowSparseSGD])
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

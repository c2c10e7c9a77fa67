"""RowSparseAdam must move embedding rows exactly as torch's SparseAdam does: it replaces it
for speed only (recfb/models/base.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from recfb.models.base import RowSparseAdam, unique_rows


def _train(optimizer_cls: type, steps: int = 25) -> torch.Tensor:
    torch.manual_seed(0)
    table = nn.Embedding(500, 16, sparse=True)
    target = torch.randn(500, 16)
    opt = optimizer_cls(table.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        # repeated rows in a batch, as when a popular item is sampled twice
        idx = torch.randint(0, 60, (128,), generator=gen)
        loss = ((table(idx) - target[idx]) ** 2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return table.weight.detach().clone()


def test_matches_torch_sparse_adam() -> None:
    ours, torchs = _train(RowSparseAdam), _train(torch.optim.SparseAdam)
    start = _train(RowSparseAdam, steps=0)
    assert not torch.equal(ours, start)  # the rows did move
    assert torch.allclose(ours, torchs, atol=1e-5, rtol=1e-5)
    # rows never in a batch stay where they were (lazy: no decay of untouched rows)
    assert torch.equal(ours[60:], start[60:])


def test_unique_rows_sums_repeats() -> None:
    grad = torch.sparse_coo_tensor(
        torch.tensor([[4, 1, 4, 9]]), torch.tensor([[1.0], [2.0], [3.0], [4.0]]), (10, 1)
    )
    rows, summed = unique_rows(grad)
    assert rows.tolist() == [1, 4, 9]
    assert summed.squeeze(1).tolist() == [2.0, 4.0, 4.0]


def test_refuses_dense_gradients() -> None:
    table = nn.Embedding(10, 4)
    opt = RowSparseAdam(table.parameters())
    table(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()

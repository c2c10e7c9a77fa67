"""The training loader's batches (recfb/train/fit.py: ShuffledBatches) must be exactly those
of DataLoader(shuffle=True, generator=seeded) epoch after epoch: it changes their cost only."""

from __future__ import annotations

import itertools

import pytest
import torch
from lightning.fabric.utilities.data import _update_dataloader
from torch.utils.data import DataLoader, DistributedSampler

from recfb.train.fit import PairPositions, ShuffledBatches, as_batch, positions_loader


class _Model:
    pos_users = torch.zeros(1003)


class _Cfg:
    seed = 7

    class trainer:  # noqa: N801
        batch_size = 64


def test_same_batches_as_a_shuffled_dataloader() -> None:
    before = DataLoader(
        PairPositions(1003),
        batch_size=64,
        shuffle=True,
        generator=torch.Generator().manual_seed(7),
        collate_fn=as_batch,
    )
    now = positions_loader(_Model(), _Cfg())  # type: ignore[arg-type]
    assert isinstance(now.batch_sampler, ShuffledBatches)
    for _ in range(3):  # epochs: each draws its own order from the shared generator
        old, new = list(before), list(now)
        assert len(old) == len(new) == 16
        assert all(torch.equal(a, b) for a, b in zip(old, new, strict=True))


@pytest.mark.parametrize("n", [1003, 1024])  # a partial last batch, or none
def test_same_batches_when_a_trainer_stops_at_len(n: int) -> None:
    """Lightning takes len(loader) batches an epoch and never asks for one more: the
    sampler's end-of-epoch draw must still happen when RandomSampler's does."""
    before = DataLoader(
        PairPositions(n),
        batch_size=64,
        shuffle=True,
        generator=torch.Generator().manual_seed(7),
        collate_fn=as_batch,
    )
    model = _Model()
    model.pos_users = torch.zeros(n)
    now = positions_loader(model, _Cfg())  # type: ignore[arg-type]
    for _ in range(3):
        old = list(itertools.islice(iter(before), len(before)))
        new = list(itertools.islice(iter(now), len(now)))
        assert all(torch.equal(a, b) for a, b in zip(old, new, strict=True))


def test_other_samplers_batch_as_batch_sampler() -> None:
    loader = positions_loader(_Model(), _Cfg())  # type: ignore[arg-type]
    sampler = DistributedSampler(PairPositions(1003), num_replicas=2, rank=1, seed=3)
    sharded = _update_dataloader(loader, sampler)  # what Lightning does under DDP
    plain = DataLoader(PairPositions(1003), batch_size=64, sampler=sampler, collate_fn=as_batch)
    expected = list(plain)
    got = list(sharded)
    assert sum(len(b) for b in got) == 502
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))

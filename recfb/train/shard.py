"""Data-parallel training where each DDP rank reads only its own users' pairs.

A rank's shard is a range of consecutive user indices, so a user's pairs are all on one rank:
what a model looks up per user (its positives for negative sampling, its explicit negatives,
the train pairs the evaluation masks) is whole there. What sums over every user is not:
item popularity (sampling and the popularity fallback), the level rates GNOLR starts from,
logged exposure, the recency reference. `TrainTotals` carries those from where the whole
table is read once (the driver) to the ranks. The valid split is evaluated by every rank
over its own users and the sums combined (`recfb.evaluate.RankingSums`), so every rank sees
the figure the whole split gives and early stopping agrees.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

import numpy as np
import polars as pl
import torch
from torch.utils.data import Sampler

from recfb.errors import ConfigError

if TYPE_CHECKING:
    from recfb.train.config import TrainConfig
    from recfb.train.data import Interactions


@dataclass(frozen=True)
class TrainTotals:
    """The statistics of the whole train table that a model is built with."""

    popularity: np.ndarray  # (n_items,) train pairs with label >= 1 per item
    exposure: np.ndarray | None  # (n_items,) logged impressions (exposure IPS only)
    level_counts: np.ndarray  # (n_levels,) training positives with label >= t, t = 1..T
    positives: int  # training positives (label >= train_min_label)
    newest: datetime | None  # the newest `last_ts`: recency weighting's "now"

    @classmethod
    def of(cls, data: Interactions, cfg: TrainConfig) -> TrainTotals:
        train = data.train
        labels = train.filter(pl.col("label") >= cfg.train_min_label)["label"].to_numpy()
        exposure = None
        if cfg.debias.ips and cfg.debias.propensity == "exposure":
            exposure = data.item_exposure()
        newest = train["last_ts"].max() if cfg.recency_half_life_days is not None else None
        return cls(
            popularity=data.item_popularity(),
            exposure=exposure,
            level_counts=np.array([(labels >= t).sum() for t in range(1, data.n_levels + 1)]),
            positives=len(labels),
            newest=newest,  # type: ignore[arg-type]
        )


@dataclass(frozen=True)
class UserShard:
    """One rank's users `[start, stop)`, its training positives, and the positions every
    rank draws per epoch (the most any rank has): DDP steps all ranks together, so each must
    take the same number of batches."""

    start: int
    stop: int
    positives: int
    per_epoch: int


def user_shards(train: pl.DataFrame, n_users: int, min_label: int, ranks: int) -> list[UserShard]:
    """`ranks` ranges of consecutive users covering 0..n_users with about equal training
    positives each (each range ends at the first user where its share is reached)."""
    users = train.filter(pl.col("label") >= min_label)["user_idx"].to_numpy()
    counts = np.bincount(users.astype(np.int64), minlength=n_users)
    cumulative = np.cumsum(counts)
    total = int(cumulative[-1]) if n_users else 0
    targets = [total * r / ranks for r in range(1, ranks)]
    cuts = [0, *(int(np.searchsorted(cumulative, t, side="left")) + 1 for t in targets), n_users]
    cuts = np.maximum.accumulate(np.minimum(cuts, n_users))
    positives = [int(counts[a:b].sum()) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
    if min(positives) == 0:
        raise ConfigError(
            f"ray.workers={ranks}: the train pairs have {total} positives over {n_users} users, "
            "too few to give every worker some; use fewer workers"
        )
    most = max(positives)
    return [
        UserShard(int(a), int(b), n, most)
        for a, b, n in zip(cuts[:-1], cuts[1:], positives, strict=True)
    ]


class PaddedBatches(Sampler):
    """Batches of a rank's own positions: each epoch a fresh permutation of its `n`
    positions, then `per_epoch - n` more drawn at random from them (a shorter shard repeats
    a few, as Lightning's DistributedSampler pads), sliced into `batch_size` batches."""

    def __init__(self, n: int, per_epoch: int, batch_size: int, seed: int) -> None:
        if per_epoch < n:
            raise ValueError(f"per_epoch ({per_epoch}) must be at least the positions ({n})")
        self.n, self.per_epoch, self.batch_size = n, per_epoch, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return -(-self.per_epoch // self.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        order = torch.randperm(self.n, generator=self.generator)
        extra = self.per_epoch - self.n
        if extra:
            order = torch.cat([order, torch.randint(self.n, (extra,), generator=self.generator)])
        yield from order.split(self.batch_size)


def all_reduce(array: np.ndarray, op: str) -> np.ndarray:
    """`array` summed ("sum") or its minimum taken ("min") over the ranks of the default
    process group (on the rank's GPU under NCCL); every rank gets the same result."""
    import torch.distributed as dist

    ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN}
    tensor = torch.from_numpy(np.ascontiguousarray(array)).clone()
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor, op=ops[op])
    return tensor.cpu().numpy()

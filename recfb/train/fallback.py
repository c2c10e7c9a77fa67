"""Serve what production serves: users without training positives get the popularity list.

A user who first appears after the train cut (or only ever disliked things) has no learned
vector worth ranking with; every recfb model and baseline is evaluated and served through
this wrapper, so cold users get the documented popularity fallback everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import torch

from recfb.evaluate import item_popularity


def warm_users(train: pl.DataFrame) -> pl.Series:
    """Users with at least one positive train pair: the ones a model has a taste for."""
    return train.filter(pl.col("label") >= 1)["user_idx"].unique()


@dataclass
class PopularityFallback:
    """Wraps `scorer`: rows of cold users are replaced by item popularity scores."""

    scorer: Any
    warm: torch.Tensor  # bool (n_users,)
    popularity: torch.Tensor  # float (n_items,)

    @classmethod
    def from_train(
        cls,
        scorer: Any,
        train: pl.DataFrame,
        n_users: int,
        n_items: int,
        popularity: np.ndarray | None = None,
    ) -> PopularityFallback:
        """`popularity`: every item's, where `train` holds only some users' pairs."""
        warm = np.zeros(n_users, dtype=bool)
        warm[warm_users(train).to_numpy()] = True
        if popularity is None:
            popularity = item_popularity(train, n_items)
        pop = popularity.astype(np.float32)
        return cls(scorer, torch.as_tensor(warm), torch.as_tensor(pop))

    @property
    def n_items(self) -> int:
        return len(self.popularity)

    def is_warm(self, users: torch.Tensor) -> torch.Tensor:
        users = users.cpu()
        inside = users < len(self.warm)
        return inside & self.warm[users.clamp(max=len(self.warm) - 1)]

    @torch.no_grad()
    def score(self, users: torch.Tensor) -> torch.Tensor:
        warm = self.is_warm(users)
        out = self.popularity.unsqueeze(0).repeat(len(users), 1)
        if warm.any():
            scores = self.scorer.score(users[warm.to(users.device)])
            out = out.to(scores.device, scores.dtype)
            out[warm.to(scores.device)] = scores
        return out

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


@dataclass
class PopularityFallback:
    """Wraps `scorer`: rows of cold users are replaced by item popularity scores."""

    scorer: Any
    warm: torch.Tensor  # bool (n_users,)
    popularity: torch.Tensor  # float (n_items,)

    @classmethod
    def from_train(
        cls, scorer: Any, train: pl.DataFrame, n_users: int, n_items: int
    ) -> PopularityFallback:
        positives = train.filter(pl.col("label") >= 1)
        warm = np.zeros(n_users, dtype=bool)
        warm[positives["user_idx"].unique().to_numpy()] = True
        counts = positives.group_by("item_idx").len()
        pop = np.zeros(n_items, dtype=np.float32)
        pop[counts["item_idx"].to_numpy()] = counts["len"].to_numpy()
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

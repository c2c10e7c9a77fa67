"""Matrix factorisation (an ID two-tower): one embedding per user and per item."""

from __future__ import annotations

import torch
from torch import nn

from recfb.models.base import EmbeddingRecommender


class MatrixFactorization(EmbeddingRecommender):
    """score(u, i) = <p_u, q_i>; trained with BPR, sampled softmax or BCE."""

    family = "mf"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        dim = self.cfg.model.dim
        self.user_embedding = nn.Embedding(self.n_users, dim)
        self.item_embedding = nn.Embedding(self.n_items, dim)
        nn.init.normal_(self.user_embedding.weight, std=0.1)
        nn.init.normal_(self.item_embedding.weight, std=0.1)

    def encode(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.user_embedding.weight, self.item_embedding.weight

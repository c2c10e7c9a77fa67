"""Matrix factorisation (an ID two-tower): one embedding per user and per item."""

from __future__ import annotations

import torch

from recfb.models.base import EmbeddingRecommender


class MatrixFactorization(EmbeddingRecommender):
    """score(u, i) = <p_u, q_i>; trained with BPR, sampled softmax or BCE."""

    family = "mf"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        dim = self.cfg.model.dim
        self.user_embedding = self.embedding_table(self.n_users, dim)
        self.item_embedding = self.embedding_table(self.n_items, dim)

    def encode(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.user_embedding.weight, self.item_embedding.weight

    def batch_encoder(self):
        return self.user_embedding, self.item_embedding

"""Matrix factorisation / two-tower: a user tower of IDs, an item tower of IDs + features."""

from __future__ import annotations

import torch
from torch import nn

from recfb.models.base import EmbeddingRecommender


class MatrixFactorization(EmbeddingRecommender):
    """score(u, i) = <p_u, q_i + sum_f e_f[code_f(i)]>; trained with BPR, sampled softmax or BCE.

    Without `model.item_features` this is plain MF. Each named feature is a categorical item
    column passed by the ETL (e.g. `category`); its codes come in `item_feature_codes`
    (0 = unknown), and its embedding is shared by every item with that value."""

    family = "mf"

    def __init__(
        self, *args, item_feature_codes: dict[str, torch.Tensor] | None = None, **kwargs
    ) -> None:
        super().__init__(*args, **kwargs)
        dim = self.cfg.model.dim
        self.user_embedding = self.embedding_table(self.n_users, dim)
        self.item_embedding = self.embedding_table(self.n_items, dim)
        codes = item_feature_codes or {}
        missing = [f for f in self.cfg.model.item_features if f not in codes]
        if missing:
            raise ValueError(f"model.item_features {missing}: no codes passed for them")
        self.feature_names = list(self.cfg.model.item_features)
        self.feature_tables = nn.ModuleDict()
        for name in self.feature_names:
            self.register_buffer(f"codes_{name}", codes[name].long(), persistent=False)
            table = self.embedding_table(int(codes[name].max()) + 1, dim)
            nn.init.zeros_(table.weight)  # start as plain MF; features learn what they add
            self.feature_tables[name] = table

    def _item_vectors(self, rows: torch.Tensor | None) -> torch.Tensor:
        base = self.item_embedding.weight if rows is None else self.item_embedding(rows)
        for name in self.feature_names:
            codes = getattr(self, f"codes_{name}")
            base = base + self.feature_tables[name](codes if rows is None else codes[rows])
        return base

    def encode(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.user_embedding.weight, self._item_vectors(None)

    def batch_encoder(self):
        if not self.feature_names:
            return self.user_embedding, self.item_embedding
        return self.user_embedding, self._item_vectors

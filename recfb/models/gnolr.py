"""GNOLR: nested ordinal logistic regression in one embedding space.

For T positive levels each tower emits T L2-normalised sub-vectors. Level-t logit
l_t = s_t cos(u_t, i_t); nested cumulative score z_t = sum_{j<=t} l_j - a_t with closed-form
thresholds a_t = -log m_t (m_t: share of training examples at level >= t, sampled negatives
included); P(label >= t) = sigmoid(z_t); the loss is the negative log-likelihood of the
ordinal label from P(>= y) - P(>= y+1), clamped positive. Explicit negatives and sampled
items are level 0. Serving uses one inner-product index: query = concat(s_t u_t),
item = concat(i_t), whose inner product is z_T + a_T, monotone in P(deepest level);
`serve_level` k zeroes the query's columns of levels deeper than k, so the same index ranks
by P(label >= k) instead (e.g. "will click" rather than "will buy").

One extension: each item has a bias per level (l_t = s_t cos(u_t, i_t) + b_{i,t}), since cosine
logits alone cannot express that some items are simply more popular. The biases ride in T
extra columns (query side: ones), so the single inner-product index still serves the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from recfb.models.base import EmbeddingRecommender

_EPS = 1e-6


class GNOLR(EmbeddingRecommender):
    family = "gnolr"

    def __init__(self, *args, level_rates: torch.Tensor | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        d, t = self.cfg.model.dim, self.n_levels
        shared = self.cfg.model.level_towers == "shared"
        self.user_embedding = self.embedding_table(self.n_users, d if shared else d * t)
        self.item_embedding = self.embedding_table(self.n_items, d if shared else d * t)
        # towers: one linear head per level over the shared embedding, all starting as the
        # identity, so every level starts with the same geometry and a level with few
        # examples (purchases) departs from it only as far as its data supports
        self.user_heads = self.item_heads = None
        if shared:
            eye = torch.eye(d).repeat(t, 1)  # (T*d, d)
            self.user_heads = nn.Linear(d, d * t, bias=False)
            self.item_heads = nn.Linear(d, d * t, bias=False)
            with torch.no_grad():
                self.user_heads.weight.copy_(eye)
                self.item_heads.weight.copy_(eye)
        # optional bias prior: centred log-popularity x bias_prior (0 by default: the sum over T
        # levels multiplies it, and on long-tail catalogues it swamps the cosines)
        self.item_bias = nn.Embedding(self.n_items, t, sparse=self.sparse_embeddings)
        with torch.no_grad():
            prior = (self.log_q - self.log_q.mean()) * self.cfg.model.bias_prior
            self.item_bias.weight.copy_(prior.unsqueeze(1).expand(-1, t))
        self.log_scale = nn.Parameter(torch.full((t,), float(self.cfg.model.scale_init)).log())
        rates = level_rates if level_rates is not None else torch.full((t,), 0.5)
        self.register_buffer("thresholds", -torch.log(rates.clamp(min=_EPS)))
        level = self.cfg.model.serve_level or t
        if level > t:
            raise ValueError(f"model.serve_level: {level} is deeper than the {t} levels")
        # query columns kept when serving: sum_{j<=level} l_j = z_level + a_level
        keep = (torch.arange(t) < level).float()
        self.register_buffer(
            "serve_mask", torch.cat([keep.repeat_interleave(d), keep]), persistent=False
        )

    def _split(self, x: torch.Tensor, heads: nn.Linear | None) -> torch.Tensor:
        """(..., T, d) L2-normalised sub-vectors from raw embedding rows."""
        if heads is not None:
            x = heads(x)
        return F.normalize(x.view(*x.shape[:-1], self.n_levels, -1), dim=-1)

    def _queries(self, rows: torch.Tensor) -> torch.Tensor:
        """[s_1 u_1 .. s_T u_T, 1 .. 1] from raw user embedding rows."""
        scale = self.log_scale.exp().unsqueeze(-1)
        users = (self._split(rows, self.user_heads) * scale).flatten(-2)
        return torch.cat([users, torch.ones_like(users[..., : self.n_levels])], -1)

    def _items(self, rows: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """[i_1 .. i_T, b_1 .. b_T] from raw item embedding rows and their biases."""
        return torch.cat([self._split(rows, self.item_heads).flatten(-2), bias], -1)

    def encode(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Query = [s_1 u_1 .. s_T u_T, 1 .. 1], item = [i_1 .. i_T, b_1 .. b_T]; the query
        columns of levels deeper than `serve_level` are zero."""
        return (
            self._queries(self.user_embedding.weight) * self.serve_mask,
            self._items(self.item_embedding.weight, self.item_bias.weight),
        )

    def batch_encoder(self):
        return (
            lambda idx: self._queries(self.user_embedding(idx)),
            lambda idx: self._items(self.item_embedding(idx), self.item_bias(idx)),
        )

    def cumulative_logits(self, users_vec: torch.Tensor, items_vec: torch.Tensor) -> torch.Tensor:
        """z (..., T) from query and item vectors of the same leading shape."""
        t = self.n_levels
        product = users_vec * items_vec
        cosines = product[..., :-t].reshape(*product.shape[:-1], t, -1).sum(-1)
        per_level = cosines + product[..., -t:]
        return per_level.cumsum(-1) - self.thresholds

    def ordinal_nll(
        self, z: torch.Tensor, labels: torch.Tensor, censored: torch.Tensor | None = None
    ) -> torch.Tensor:
        """-log P(label) with P(>= t) = sigmoid(z_t); labels in 0..T. A censored label y
        (not matured: it may still go deeper) contributes -log P(>= y) instead."""
        ones = torch.ones_like(z[..., :1])
        zeros = torch.zeros_like(z[..., :1])
        at_least = torch.cat([ones, torch.sigmoid(z), zeros], dim=-1)  # P(>=0..T+1)
        y = labels.clamp(0, self.n_levels).long().unsqueeze(-1)
        deeper = at_least.gather(-1, y + 1)
        if censored is not None:
            deeper = deeper * (~censored).unsqueeze(-1)
        p = at_least.gather(-1, y) - deeper
        return -torch.log(p.squeeze(-1).clamp(min=_EPS))

    def example_losses(self, users_vec, pos_vec, neg_vec, pos, labels, matured=None):
        z_pos = self.cumulative_logits(users_vec, pos_vec)
        z_neg = self.cumulative_logits(users_vec.unsqueeze(1).expand_as(neg_vec), neg_vec)
        censored = ~matured if matured is not None and self.cfg.model.censor_immature else None
        pos_loss = self.ordinal_nll(z_pos, labels, censored)
        if self.cfg.model.ordinal_negatives == "all_levels":
            # P(label=0) = 1 - sigmoid(z_1) leaves z_2..z_T of unseen items free, and since
            # the per-level logits are not forced to decrease, an unseen item can then outrank
            # an engaged one on z_T; every cumulative logit of a level-0 pair is pushed down
            neg_loss = F.softplus(z_neg).sum(-1)
        else:
            neg_loss = self.ordinal_nll(z_neg, torch.zeros(z_neg.shape[:-1], device=z_neg.device))
        loss = pos_loss + neg_loss.sum(1)
        return loss / self.propensity[pos] if self.cfg.debias.ips else loss

    @torch.no_grad()
    def level_scores(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """z_t for given (user, item) pairs: the score of P(label >= t), shape (N, T)."""
        queries = self._queries(self.user_embedding.weight[users])  # every level, unmasked
        _, items_all = self.vectors()
        return self.cumulative_logits(queries, items_all[items])

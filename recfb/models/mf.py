"""Matrix factorisation / two-tower: a user tower of IDs, an item tower of IDs + features."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from recfb.models.base import EmbeddingRecommender, distinct_slots, set_row_gradient

# the closed-form step's batch pattern is a CSR matrix; torch notes CSR's "beta" status
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


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
        self._rows_buffer: torch.Tensor | None = None  # sgd_step's item step, kept

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

    def _closed_form_covered(self) -> bool:
        """The steps the closed forms cover: pairwise losses on sparse float32 CPU tables."""
        return (
            self.cfg.model.loss in ("bpr", "bce")
            and self.sparse_embeddings
            and self._trains_in_float32()
            and self.user_embedding.weight.device.type == "cpu"
        )

    def sgd_step(self, idx: torch.Tensor, lr: float) -> torch.Tensor | None:
        """A plain SGD step of `batch_loss(idx)` in closed form, the update added straight
        into the tables. The batch's scores come from `sampled_addmm` (no gathered copy of
        the item rows); with g = -lr dL/ds (`pairwise_step`) each user row moves by
        sum_n g_n q_n (an embedding bag over the item table, again no gathered copy) and
        each item row by g p_u (written into a buffer kept between steps, since fresh memory
        costs its page faults every step, then `index_add_`, which sums repeated rows). Both
        moves are computed from the rows before the step, as SGD on the closed form's
        gradient does, but with no transposed sparse matrix (a sort), no gradient tensors
        and no optimiser pass over them (profiled: the bulk of a closed-form step). Any
        batch size (its cost follows the batch, not the catalogue); plain MF only (item
        features keep the gradient path)."""
        if self.feature_names or not self._closed_form_covered():
            return None
        with torch.no_grad():
            users = self.pos_users[idx]
            neg = self.sample_negatives(users)
            user_table, item_table = self.user_embedding.weight, self.item_embedding.weight
            uvec = user_table.index_select(0, users)
            idx = self._denoised_index(idx, users, neg, uvec, self._item_vectors)
            pos, weights = self.pos_items[idx], self.pos_weights[idx]
            items = torch.cat([pos.unsqueeze(1), neg], 1)
            flat = items.view(-1)
            crow = torch.arange(0, len(flat) + 1, items.shape[1], device=flat.device)
            pattern = torch.sparse_csr_tensor(
                crow,
                flat,
                torch.zeros(len(flat)),  # read even at beta 0: no uninitialised memory
                (len(users), self.n_items),
                check_invariants=False,
            )
            scores = torch.sparse.sampled_addmm(pattern, uvec, item_table.T, beta=0.0)
            loss, grad = self.pairwise_step(scores.values().view(items.shape), pos, weights)
            step = grad.mul_(-lr)
            user_step = F.embedding_bag(items, item_table, per_sample_weights=step, mode="sum")
            if self._rows_buffer is None:
                self._rows_buffer = torch.empty(0, dtype=item_table.dtype)
            # resize_ keeps the storage when it is large enough
            item_step = self._rows_buffer.resize_(len(flat), item_table.shape[1])
            torch.mul(step.unsqueeze(2), uvec.unsqueeze(1), out=item_step.view(*items.shape, -1))
            item_table.index_add_(0, flat, item_step)
            user_table.index_add_(0, users, user_step)
        return loss

    def closed_form_backward(self, idx: torch.Tensor) -> torch.Tensor | None:
        """BPR and BCE steps without autograd: the same batch as `batch_loss` (negatives,
        PLD, T-CE, IPS) and its loss, with the gradients set in closed form.

        The batch's (user, item) pairs are the pattern of a sparse matrix P (one row per
        positive: its item, then its negatives): the scores are the sampled product
        P o (U I^T) (`sampled_addmm`), and with G = P carrying dL/ds (`pairwise_step`) the
        gradients are G I for the batch's users and G^T U for the items (an item's feature
        rows get its item's gradient). No (B, 1+N, dim) block of item rows is gathered,
        multiplied or scattered (the bulk of an autograd step, profiled). Used where the
        batch's item entries are at least the catalogue (e.g. 4096 x 5 over 3,375 items:
        1.5x faster a step than autograd); over a larger catalogue (4096 x 5 over 33,750
        items) its sparse products cost more than autograd's gathers (profiled: 26 vs 21 CPU
        ms a step), so such a step keeps autograd. CPU tables only (not checked on
        accelerators, which keep autograd)."""
        if (
            not self._closed_form_covered()
            or len(idx) * (1 + self.cfg.model.n_negatives) < self.n_items
        ):
            return None
        with torch.no_grad():
            users = self.pos_users[idx]
            neg = self.sample_negatives(users)
            user_table = self.user_embedding.weight
            uvec = user_table.index_select(0, users)
            idx = self._denoised_index(idx, users, neg, uvec, self._item_vectors)
            pos, weights = self.pos_items[idx], self.pos_weights[idx]
            items = torch.cat([pos.unsqueeze(1), neg], 1)
            width, flat = items.shape[1], items.reshape(-1)
            item_vectors = self._item_vectors(None)
            crow = torch.arange(0, len(flat) + 1, width, device=flat.device)
            shape = (len(users), self.n_items)
            pattern = torch.sparse_csr_tensor(
                crow, flat, torch.zeros(len(flat)), shape, check_invariants=False
            )
            scores = torch.sparse.sampled_addmm(pattern, uvec, item_vectors.T, beta=0.0)
            loss, grad = self.pairwise_step(scores.values().view(items.shape), pos, weights)
            grad_matrix = torch.sparse_csr_tensor(
                crow, flat, grad.reshape(-1), shape, check_invariants=False
            )
            set_row_gradient(user_table, users, grad_matrix @ item_vectors)
            # the items' gradient over the batch's distinct items only (its columns are their
            # slots), so that a small batch does not pay for a catalogue-sized product
            rows, slots = distinct_slots(flat, self.n_items)
            by_slot = torch.sparse_csr_tensor(
                crow, slots, grad.reshape(-1), (len(users), len(rows)), check_invariants=False
            )
            item_grad = by_slot.t() @ uvec
            self.item_embedding.weight.grad = torch.sparse_coo_tensor(
                rows.unsqueeze(0),
                item_grad,
                self.item_embedding.weight.shape,
                is_coalesced=True,
                check_invariants=False,
            )
            for name in self.feature_names:
                codes = getattr(self, f"codes_{name}")[rows]
                set_row_gradient(self.feature_tables[name].weight, codes, item_grad)
        return loss

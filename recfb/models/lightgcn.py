"""LightGCN with torch-geometric: embeddings smoothed over the user-item graph.

Propagation uses PyG's `LGConv` on a symmetric-normalised adjacency held as a torch CSR
tensor (about 10x faster than an edge list on CPU here). Which train pairs form edges is
configurable (`model.edge_min_label`), optionally weighted by level.

The adjacency is symmetric, so the gradient of A x is A g: `SymmetricLGConv` says so to
autograd instead of letting torch transpose the CSR matrix on every backward pass (at 20M
non-zeros: backward 3.0 s -> 0.8 s per layer on 2 cores).

`model.propagation: topm` trades exactness for a step that does not grow with the graph: the
final vectors are P @ E0 with P = mean_k A^k (k = 0..K, the same mean LightGCN takes), each
row of P cut to the node itself plus its `model.topm` largest weights. P is computed once at
fit start (sparse CSR products, pruned after each one so it stays sparse); a step then
propagates only its batch's distinct nodes: their rows of P over their neighbours' layer-0
embeddings (a weighted embedding bag), at most (m + 1) lookups a node. The table stays dense
(dense Adam): a batch's items pull in most users, so a step touches most rows anyway (at 10M
pairs half the table; RowSparseAdam over that half measured 6x slower than fused Adam over all
of it). What made a topm step grow with the table was its dense passes, not its lookups
(profiled at 10M pairs, benchmarks/results/lightgcn_10m.md): each bag's autograd backward
built a fresh table-sized gradient (page faults, a full zero fill, then a sum of two), and
the unfused Adam made about ten passes over the table. The bag's backward now adds into one
kept gradient buffer and Adam is fused (one pass). A batch holding most items (at 10M pairs
~90% of them) propagates all items instead, whose gradient is then one sparse-dense product
with the operator's item rows transposed (kept as CSR), written over the buffer (no zero
fill). The buffer path is left out under DDP, which all-reduces only autograd's gradients.
With BPR or BCE a topm step skips autograd altogether (`closed_form_backward`: scores and
their gradient on the batch's sampled pattern, then sparse products through the bags; 10M
pairs: 49.8 -> 41.4 s an epoch, the same training), and with `optim.optimizer: sgd` it applies
the update itself (28.0 s; benchmarks/results/lightgcn_round2.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.nn import LGConv

from recfb.models.base import EmbeddingRecommender, distinct_slots


def normalized_adjacency(
    users: torch.Tensor, items: torch.Tensor, weights: torch.Tensor, n_users: int, n_items: int
) -> torch.Tensor:
    """D^-1/2 A D^-1/2 of the bipartite graph (users first, then items) as CSR."""
    n = n_users + n_items
    row = torch.cat([users, items + n_users])
    col = torch.cat([items + n_users, users])
    val = torch.cat([weights, weights]).float()
    adj = torch.sparse_coo_tensor(torch.stack([row, col]), val, (n, n)).coalesce()
    row, col = adj.indices()
    val = adj.values()
    degree = torch.zeros(n).index_add_(0, row, val)
    inv_sqrt = degree.clamp(min=1e-12).pow(-0.5)
    val = inv_sqrt[row] * val * inv_sqrt[col]
    return torch.sparse_coo_tensor(torch.stack([row, col]), val, (n, n)).coalesce().to_sparse_csr()


def prune_rows(matrix: torch.Tensor, m: int) -> torch.Tensor:
    """A square CSR matrix with each row cut to its diagonal entry plus its m largest others
    (the values are non-negative propagation weights)."""
    n = matrix.shape[0]
    crow, col, val = matrix.crow_indices(), matrix.col_indices(), matrix.values()
    row = torch.repeat_interleave(torch.arange(n), crow.diff())
    is_self = col == row
    # the diagonal sorts first in its row, then the others by weight, descending
    key = torch.where(is_self, torch.full_like(val, float("inf")), val)
    order = torch.argsort(key, descending=True, stable=True)
    order = order[torch.argsort(row[order], stable=True)]
    rank = torch.arange(len(order)) - crow[row[order]]
    has_self = torch.zeros(n, dtype=torch.long).index_fill_(0, row[is_self], 1)
    keep = order[rank < m + has_self[row[order]]]
    keep = keep[torch.argsort(row[keep] * n + col[keep])]
    counts = torch.bincount(row[keep], minlength=n)
    crow = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    return torch.sparse_csr_tensor(crow, col[keep], val[keep], (n, n))


def propagation_operator(adjacency: torch.Tensor, layers: int, m: int) -> torch.Tensor:
    """P = mean over k = 0..layers of A^k as CSR, every power and the mean pruned to each
    node plus its m largest weights (exact when no row has more than m others)."""
    n = adjacency.shape[0]
    adjacency = adjacency.to_sparse_csr().cpu()
    ids = torch.arange(n)
    eye = torch.sparse_coo_tensor(torch.stack([ids, ids]), torch.ones(n), (n, n))
    power, total = eye.to_sparse_csr(), eye
    for _ in range(layers):
        power = prune_rows(power @ adjacency, m)
        total = total + power.to_sparse_coo()
    total = total.coalesce()
    mean = torch.sparse_coo_tensor(total.indices(), total.values() / (layers + 1), (n, n))
    return prune_rows(mean.coalesce().to_sparse_csr(), m)


def padded_rows(matrix: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(column ids, weights), both (n, width), of a CSR matrix with at most `width` entries a
    row; a short row is padded with its own id at weight 0, so a row is one fixed-size bag."""
    n = matrix.shape[0]
    crow, col, val = matrix.crow_indices(), matrix.col_indices(), matrix.values()
    counts = crow.diff()
    if len(counts) and int(counts.max()) > width:
        raise ValueError(f"a row has {int(counts.max())} entries, more than width={width}")
    row = torch.repeat_interleave(torch.arange(n), counts)
    slot = torch.arange(len(col)) - crow[row]
    neighbours = torch.arange(n).unsqueeze(1).repeat(1, width)
    weights = torch.zeros(n, width, dtype=val.dtype)
    neighbours[row, slot] = col
    weights[row, slot] = val
    return neighbours, weights


class _BagIntoGrad(torch.autograd.Function):
    """Weighted sum bags of table rows whose backward adds straight into the table's `.grad`,
    a buffer kept across steps (the table itself gets no autograd gradient): slot by slot with
    `index_add_`, or, given the bags' operator transposed (`transpose`, CSR), as one product.
    Autograd's own backward allocates a fresh table-sized gradient per bag call and step: at
    10M pairs (a 370k x 64 table) that and its zero fill were the largest part of a step. A
    caller that keeps a reference to `.grad` across steps sees it overwritten."""

    @staticmethod
    def forward(ctx, table, neighbours, weights, transpose, owner):  # type: ignore[override]
        ctx.save_for_backward(neighbours, weights)
        ctx.transpose, ctx.owner = transpose, owner
        return F.embedding_bag(neighbours, table, per_sample_weights=weights, mode="sum")

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        target, fresh = ctx.owner.table_grad(zero=ctx.transpose is None)
        if ctx.transpose is not None:  # the bags' operator transposed, kept as CSR: one SpMM
            # beta=0 on a fresh buffer: the product overwrites it, no zero fill first (the item
            # side, created last in a step, runs its backward first)
            target.addmm_(ctx.transpose, grad.contiguous(), beta=0 if fresh else 1)
            return None, None, None, None, None
        neighbours, weights = ctx.saved_tensors
        _bag_backward(target, neighbours, weights, grad)
        return None, None, None, None, None


@contextmanager
def _no_nan_fill() -> Iterator[None]:
    """Deterministic mode (recfb train's trainer sets it) NaN-fills every fresh tensor, a
    guard against reads of uninitialised memory; the closed-form step writes all that it
    allocates before reading it, so it skips the fill (~3 ms of a step at 10M pairs)."""
    flag = torch.utils.deterministic.fill_uninitialized_memory
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = flag


def _bag_backward(
    target: torch.Tensor, bags: torch.Tensor, weights: torch.Tensor, grad: torch.Tensor
) -> None:
    """Add the gradient of weighted sum bags (rows of `grad`) into their table rows."""
    for slot in range(bags.shape[1]):
        target.index_add_(0, bags[:, slot], grad * weights[:, slot].unsqueeze(1))


class _SymmetricSpMM(torch.autograd.Function):
    """A @ x for a symmetric sparse A, with backward A @ grad (no transpose)."""

    @staticmethod
    def forward(ctx, adjacency: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.adjacency = adjacency
        return adjacency @ x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, torch.Tensor]:  # type: ignore[override]
        return None, ctx.adjacency @ grad


class SymmetricLGConv(LGConv):
    """PyG's LGConv whose sparse aggregation knows the adjacency is symmetric."""

    def message_and_aggregate(self, adj_t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return _SymmetricSpMM.apply(adj_t, x)


class LightGCN(EmbeddingRecommender):
    """Final vectors = mean of the layer-0..K embeddings; score = inner product."""

    family = "lightgcn"

    def __init__(self, *args, adjacency: torch.Tensor | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        dim = self.cfg.model.dim
        self.topm = self.cfg.model.propagation == "topm"
        # a dense table in both modes: with topm a step still touches most rows (every item
        # in the batch pulls in its m users), where RowSparseAdam measured slower than Adam
        self.embedding = nn.Embedding(self.n_users + self.n_items, dim)
        nn.init.normal_(self.embedding.weight, std=0.1)
        self.convs = nn.ModuleList(
            SymmetricLGConv(normalize=False) for _ in range(self.cfg.model.layers)
        )
        if adjacency is None:
            n = self.n_users + self.n_items
            adjacency = torch.sparse_csr_tensor(
                torch.zeros(n + 1, dtype=torch.long),
                torch.zeros(0, dtype=torch.long),
                torch.zeros(0),
                (n, n),
            )
        self.adjacency = adjacency
        # topm: the pruned operator as fixed-size bags (neighbour ids, weights), built once
        self._bags: tuple[torch.Tensor, torch.Tensor] | None = None
        # topm: the table's gradient buffer, reused every step (`_BagIntoGrad`); DDP
        # all-reduces only gradients autograd accumulates, so it keeps the autograd bag
        self._grad_buffer: torch.Tensor | None = None
        self._bag_into_grad = self.topm and not self.cfg.optim.distributed
        # topm: the item rows of the operator transposed, (nodes, items) CSR, built once
        self._item_transpose: torch.Tensor | None = None

    def on_fit_start(self) -> None:
        self.adjacency = self.adjacency.to(self.device)
        if self.topm:
            self._bags = self._item_transpose = None
            self.operator_bags()

    def operator_bags(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The pruned propagation operator as (n, topm + 1) neighbour ids and weights."""
        device = self.embedding.weight.device
        if self._bags is None:
            m = self.cfg.model.topm
            operator = propagation_operator(self.adjacency, self.cfg.model.layers, m)
            self._bags = padded_rows(operator, m + 1)
        if self._bags[0].device != device:
            self._bags = (self._bags[0].to(device), self._bags[1].to(device))
        return self._bags

    def item_transpose(self) -> torch.Tensor:
        """The operator's item rows transposed, (nodes, items) CSR: the gradient of all item
        vectors with respect to the table is one sparse-dense product with it."""
        neighbours, weights = self.operator_bags()
        if self._item_transpose is None:
            bags, bag_weights = neighbours[self.n_users :], weights[self.n_users :]
            items = torch.arange(self.n_items, device=bags.device).repeat_interleave(bags.shape[1])
            keep = bag_weights.reshape(-1) > 0
            index = torch.stack([bags.reshape(-1)[keep], items[keep]])
            shape = (neighbours.shape[0], self.n_items)
            coo = torch.sparse_coo_tensor(index, bag_weights.reshape(-1)[keep], shape)
            self._item_transpose = coo.coalesce().to_sparse_csr()
        if self._item_transpose.device != neighbours.device:
            self._item_transpose = self._item_transpose.to(neighbours.device)
        return self._item_transpose

    def _propagate(self, nodes: torch.Tensor, items: bool = False) -> torch.Tensor:
        """Final vectors of some nodes (item nodes when `items`): their bags' weighted sums
        of layer-0 embeddings."""
        neighbours, weights = self.operator_bags()
        flat = nodes.reshape(-1)
        # each distinct node once (a batch repeats items: 5 lookups per pair)
        distinct, slots = distinct_slots(flat, neighbours.shape[0])
        table = self.embedding.weight
        into_grad = self._bag_into_grad and torch.is_grad_enabled() and table.requires_grad
        if into_grad and items and 2 * len(distinct) >= self.n_items:
            # a batch with most items (at 10M pairs ~90%): all items, whose backward is one
            # product with the kept transpose instead of (m + 1) scatters (6 vs 17 ms)
            start = self.n_users
            bags, bag_weights = neighbours[start:], weights[start:]
            out = _BagIntoGrad.apply(table, bags, bag_weights, self.item_transpose(), self)
            return out.index_select(0, flat - start).reshape(*nodes.shape, out.shape[-1])
        bags, bag_weights = neighbours.index_select(0, distinct), weights.index_select(0, distinct)
        if into_grad:
            out = _BagIntoGrad.apply(table, bags, bag_weights, None, self)
        else:
            out = F.embedding_bag(bags, table, per_sample_weights=bag_weights, mode="sum")
        # index_select: its backward is an index_add_ (indexing's, an accumulating index_put_,
        # measured about twice as slow)
        return out.index_select(0, slots).reshape(*nodes.shape, out.shape[-1])

    def table_grad(self, zero: bool = True) -> tuple[torch.Tensor, bool]:
        """(the embedding table's `.grad`, whether it is fresh): the kept buffer when the
        optimiser has cleared the gradient (set_to_none), zeroed unless the caller will
        overwrite it, else the gradient being accumulated."""
        table = self.embedding.weight
        if table.grad is not None:
            return table.grad, False
        buffer = self._grad_buffer
        if buffer is None or buffer.shape != table.shape or buffer.device != table.device:
            buffer = self._grad_buffer = torch.zeros_like(table)
        elif zero:
            buffer.zero_()
        table.grad = buffer
        return buffer, True

    def closed_form_backward(self, idx: torch.Tensor) -> torch.Tensor | None:
        """topm with BPR or BCE: the same batch as `batch_loss` (negatives, PLD, T-CE, IPS)
        and its loss, with the table's gradient set without autograd.

        Scores, and their gradient G (`pairwise_step`), on the batch's (B, 1 + N) pattern;
        the vectors' gradients are G I (users) and G^T U (items), then through the bags into
        the kept buffer (`_bag_backward`). No (B, 1 + N, dim) products and no autograd graph
        (profiled at 10M pairs: the loss and its autograd backward were ~15 ms of a 72 ms
        step). With `optim.optimizer: sgd` (no weight decay) the update itself is applied
        here, -lr times the gradient added into the table, and `.grad` stays None: the same
        update as torch's SGD without a table-sized gradient written and read back. CPU,
        32-bit, no DDP (which all-reduces only autograd's gradients)."""
        table = self.embedding.weight
        if (
            not self._bag_into_grad
            or self.cfg.model.loss not in ("bpr", "bce")
            or not self._trains_in_float32()
            or table.device.type != "cpu"
            or not table.requires_grad
        ):
            return None
        with torch.no_grad(), _no_nan_fill():
            neighbours, weights = self.operator_bags()
            users = self.pos_users[idx]
            neg = self.sample_negatives(users)
            user_nodes, user_slots = distinct_slots(users, self.n_users)
            user_bags = neighbours.index_select(0, user_nodes)
            user_weights = weights.index_select(0, user_nodes)
            distinct_vec = F.embedding_bag(
                user_bags, table, per_sample_weights=user_weights, mode="sum"
            )
            uvec = distinct_vec.index_select(0, user_slots)
            idx = self._denoised_index(idx, users, neg, uvec, self._item_vectors)
            pos, pair_weights = self.pos_items[idx], self.pos_weights[idx]
            items = torch.cat([pos.unsqueeze(1), neg], 1)
            flat = items.reshape(-1)
            item_nodes, item_slots = distinct_slots(flat, self.n_items)
            all_items = 2 * len(item_nodes) >= self.n_items
            if all_items:  # as `_propagate`: every item, its backward one product
                item_bags, item_weights = neighbours[self.n_users :], weights[self.n_users :]
                columns = flat
            else:
                item_bags = neighbours.index_select(0, item_nodes + self.n_users)
                item_weights = weights.index_select(0, item_nodes + self.n_users)
                columns = item_slots
            ivec = F.embedding_bag(item_bags, table, per_sample_weights=item_weights, mode="sum")
            loss, grad = self._pattern_step(uvec, ivec, columns, items.shape, pos, pair_weights)
            grad_uvec, grad_ivec = grad
            grad_users = torch.zeros_like(distinct_vec).index_add_(0, user_slots, grad_uvec)
            optim = self.cfg.optim
            if optim.optimizer == "sgd" and optim.weight_decay == 0 and table.grad is None:
                # plain SGD applied here: the bags' backward scaled by -lr straight into the
                # table (every vector above is computed already), no gradient buffer written
                # then read again by the optimiser, which finds no gradient and skips it
                target, fresh, scale = table, False, -optim.lr
                grad_ivec.mul_(scale)
                grad_users.mul_(scale)
            else:
                target, fresh = self.table_grad(zero=not all_items)
            if all_items:
                # beta=0 on a fresh buffer: the product overwrites every row, no zero fill
                target.addmm_(self.item_transpose(), grad_ivec, beta=0 if fresh else 1)
            else:
                _bag_backward(target, item_bags, item_weights, grad_ivec)
            _bag_backward(target, user_bags, user_weights, grad_users)
        return loss

    def _pattern_step(
        self,
        uvec: torch.Tensor,
        ivec: torch.Tensor,
        columns: torch.Tensor,
        shape: torch.Size,
        pos: torch.Tensor,
        pair_weights: torch.Tensor,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """The batch loss and the gradients of the pairs' user vectors (B, dim) and of
        `ivec`'s rows, given each pair's (1 + N) item rows of `ivec` (`columns`, flat)."""
        crow = torch.arange(0, len(columns) + 1, shape[1], device=columns.device)
        size = (shape[0], ivec.shape[0])
        pattern = torch.sparse_csr_tensor(
            crow, columns, torch.zeros(len(columns)), size, check_invariants=False
        )
        scores = torch.sparse.sampled_addmm(pattern, uvec, ivec.T, beta=0.0)
        loss, grad = self.pairwise_step(scores.values().view(shape), pos, pair_weights)
        grad_matrix = torch.sparse_csr_tensor(
            crow, columns, grad.reshape(-1), size, check_invariants=False
        )
        return loss, (grad_matrix @ ivec, grad_matrix.t() @ uvec)

    def _item_vectors(self, items: torch.Tensor) -> torch.Tensor:
        """Final vectors of item ids (PLD's pool scores, under no_grad)."""
        return self._propagate(items + self.n_users, items=True)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:  # type: ignore[override]
        """topm: fused Adam, one pass over the table per step (the foreach Adam's ten or so
        passes measured 66 ms a step at 10M pairs, fused 15 ms); full, or another
        `optim.optimizer` than adam: the base's."""
        if not self.topm or self.cfg.optim.optimizer != "adam":
            return super().configure_optimizers()
        optim = self.cfg.optim
        return [
            torch.optim.Adam(
                self.parameters(), lr=optim.lr, weight_decay=optim.weight_decay, fused=True
            )
        ]

    def batch_encoder(self):  # type: ignore[override]
        if not self.topm:
            return super().batch_encoder()
        offset = self.n_users
        return self._propagate, lambda items: self._propagate(items + offset, items=True)

    def encode(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.topm:
            out = self._propagate(torch.arange(self.n_users + self.n_items))
            return out[: self.n_users], out[self.n_users :]
        x = self.embedding.weight
        adj = self.adjacency if self.adjacency.device == x.device else self.adjacency.to(x.device)
        layers = [x]
        for conv in self.convs:
            x = conv(x, adj)
            layers.append(x)
        out = torch.stack(layers).mean(0)
        return out[: self.n_users], out[self.n_users :]

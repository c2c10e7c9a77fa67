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

A topm table is laid out hot rows first (`_lay_out`, once per operator): hot are the items
and every node some item's bag holds, the rows a step that holds most items always reads;
cold are the users no item's bag holds (the heavy users, whom the degree-normalised weights
rank last: at 10M pairs 48% of the table). Adam (a step pre-hook, `_lazy_adam`) moves the
hot rows with one fused pass over them and a cold row only in a step that reaches it (lazy
Adam: in other steps its vector and moments stay as they are; dense Adam would keep moving
it on its momentum). That halves Adam's pass at 10M pairs (benchmarks/results/
lightgcn_round3.md; valid NDCG kept on the four sets). The layout does not show outside:
`state_dict` and `encode` are in node order.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

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
            rows = ctx.transpose.shape[0]  # the rows item bags reach (all, or the hot rows)
            target[:rows].addmm_(ctx.transpose, grad.contiguous(), beta=0 if fresh else 1)
            return None, None, None, None, None
        neighbours, weights = ctx.saved_tensors
        _bag_backward(target, neighbours, weights, grad)
        ctx.owner.note_cold_rows(neighbours)
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


def _table_in_node_order(module: LightGCN, state: dict, prefix: str, _meta: object) -> None:
    """state_dict's table in node order, whatever the rows' layout (`_lay_out`)."""
    key = prefix + "embedding.weight"
    if module._row_of is not None and key in state:
        state[key] = state[key][module._row_of]


def _table_into_layout(module: LightGCN, state: dict, prefix: str, *_: object) -> None:
    """A node-order table loaded into the rows' current layout."""
    key = prefix + "embedding.weight"
    if module._row_of is not None and key in state:
        order = torch.empty_like(module._row_of)
        order[module._row_of] = torch.arange(len(order), device=order.device)
        state[key] = state[key][order]


@lru_cache(maxsize=4)
def _drift_sums(b1: float, b2: float, size: int) -> torch.Tensor:
    """T(l) = sum over j >= 1 of r^j w(l + j) for l = 0 .. size - 1 (float64), r = b1 /
    sqrt(b2), w(s) = sqrt(1 - b2^s) / (1 - b1^s): Adam's step sizes over zero-gradient steps
    (`_drift`). By T(l) = r (w(l + 1) + T(l + 1)), from far enough out that w is 1."""
    r, far = b1 / b2**0.5, size + 20_000
    total, out = r / (1 - r), [0.0] * size
    for step in range(far, 0, -1):  # total = T(step - 1)
        w = (1 - b2**step) ** 0.5 / (1 - b1**step)
        total = r * (w + total)
        if step - 1 < size:
            out[step - 1] = total
    return torch.tensor(out, dtype=torch.float64)


def _drift(
    p: torch.Tensor, m: torch.Tensor, v: torch.Tensor, last: torch.Tensor, now: int, group: dict
) -> None:
    """Rows (p, m, v) moved through Adam's zero-gradient steps last+1 .. now in one go: m
    and v decay by beta^k (k = now - last), p moves by lr * (T(last) - r^k T(now)) * m /
    (sqrt(v) + eps') (`_drift_sums`): dense Adam's own steps, but for eps, which Adam adds
    to each step's bias-corrected sqrt(v) and this adds once, as the first step has it."""
    b1, b2 = group["betas"]
    sums = _drift_sums(b1, b2, -(-(now + 1) // 65_536) * 65_536)
    k = (now - last).to(torch.float64)
    r = b1 / b2**0.5
    total = sums[last] - torch.pow(r, k) * sums[now]
    shift = (group["lr"] * total).to(p.dtype).unsqueeze(1)
    # eps as the first missed step has it: Adam adds it to sqrt(v / (1 - b2^s))
    eps = group["eps"] * (1 - torch.pow(b2, last.to(torch.float64) + 1)).sqrt()
    p.sub_(shift * m / (v.sqrt() + eps.to(p.dtype).unsqueeze(1)))
    m.mul_(torch.pow(b1, k).to(m.dtype).unsqueeze(1))
    v.mul_(torch.pow(b2, k).to(v.dtype).unsqueeze(1))


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
        # topm with Adam: the table's rows laid out hot first (`_lay_out`): the table row of
        # each node, the hot row count, and the cold rows written into the gradient buffer
        # since it was last cleared there
        self._row_of: torch.Tensor | None = None
        self._hot_rows: int | None = None
        self._cold_written: list[torch.Tensor] = []
        self._lazy_state: tuple[dict, dict] | None = None
        self.register_state_dict_post_hook(_table_in_node_order)
        self.register_load_state_dict_pre_hook(_table_into_layout)

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
            neighbours, weights = padded_rows(operator, m + 1)
            self._bags = (self._lay_out(neighbours, weights), weights)
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
            shape = (self._hot_rows or neighbours.shape[0], self.n_items)
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
            self._cold_written = []
        elif zero:
            buffer.zero_()
            self._cold_written = []
        elif self._cold_written:  # the caller overwrites the hot rows only: clear the cold
            buffer.index_fill_(0, torch.cat(self._cold_written), 0.0)
            self._cold_written = []
        table.grad = buffer
        return buffer, True

    def note_cold_rows(self, bags: torch.Tensor) -> None:
        """Record the cold rows among `bags`, whose gradient was just added into the kept
        buffer: the next fresh buffer clears them, and the lazy Adam step updates them."""
        hot = self._hot_rows
        if hot is not None and hot < self.embedding.weight.shape[0]:
            flat = bags.reshape(-1)
            self._cold_written.append(flat[flat >= hot])

    def _lay_out(self, neighbours: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Move the table's rows so the hot ones come first and return the bags relabelled
        to table rows. Hot: every item and every node in an item's bag, rows that every step
        with most items reads; cold: the rest (users no item's bag holds: at 10M pairs 48% of
        the table, the heavy users, whom the degree-normalised weights rank last). Adam moves
        the hot rows densely, one fused pass over them, and a cold row only in a step that
        reaches it (`_lazy_adam`): the dense pass over the whole table was 16 ms of a 63 ms
        step. Node order is kept outside: `state_dict` and `encode` see nodes."""
        n = neighbours.shape[0]
        hot = torch.zeros(n, dtype=torch.bool, device=neighbours.device)
        hot[self.n_users :] = True
        hot[neighbours[self.n_users :][weights[self.n_users :] > 0]] = True
        order = torch.cat([hot.nonzero().squeeze(1), (~hot).nonzero().squeeze(1)])
        row_of = torch.empty_like(order)
        row_of[order] = torch.arange(n, device=order.device)
        with torch.no_grad():
            table = self.embedding.weight
            nodes = table if self._row_of is None else table[self._row_of]
            table.copy_(nodes[order])
        self._row_of, self._hot_rows = row_of, int(hot.sum())
        self._cold_written = []
        self._grad_buffer = None
        return row_of[neighbours]

    def _lazy_adam(self, optimizer: torch.optim.Optimizer, *_: object) -> None:
        """Adam's step pre-hook (topm): the table's hot rows by one fused Adam pass, its
        cold rows only when this step's gradient reaches them, in torch Adam's own state
        (plus each row's last step); the table's gradient is then cleared so that Adam's
        own step skips it. A cold row's zero-gradient steps since it last moved are applied
        then in one go (`_drift`), as dense Adam would have moved it on its momentum."""
        table = self.embedding.weight
        hot, grad = self._hot_rows, table.grad
        if hot is None or grad is None or hot >= len(table) or grad.is_sparse:
            return
        group = next(g for g in optimizer.param_groups if any(p is table for p in g["params"]))
        if group["amsgrad"] or group["maximize"] or table.device.type != "cpu":
            return
        state = optimizer.state[table]
        if not state:  # as torch's fused Adam creates it
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(table, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(table, memory_format=torch.preserve_format)
        if "last_step" not in state:  # the step each row last moved at
            state["last_step"] = torch.full((len(table),), int(state["step"]), dtype=torch.long)
        self._lazy_state = (state, group)
        step, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
        with torch.no_grad(), _no_nan_fill():
            if grad is self._grad_buffer:  # the cold rows this step's bags wrote
                mark = torch.zeros(len(table), dtype=torch.bool)
                for rows in self._cold_written:
                    mark.index_fill_(0, rows, True)
            else:  # a gradient autograd wrote: the cold rows with a gradient
                mark = torch.zeros(len(table), dtype=torch.bool)
                mark[hot:] = (grad[hot:] != 0).any(1)
            cold = mark[hot:].nonzero().squeeze(1) + hot
            step.add_(1)
            kwargs = {
                "amsgrad": False,
                "lr": group["lr"],
                "beta1": group["betas"][0],
                "beta2": group["betas"][1],
                "weight_decay": group["weight_decay"],
                "eps": group["eps"],
                "maximize": False,
            }
            parts = [t[:hot] for t in (table, grad, m, v)]
            torch._fused_adam_(*([t] for t in parts), [], [step], **kwargs)
            if len(cold):
                old = [t.index_select(0, cold) for t in (table, m, v)]
                new = [t.clone() for t in old]
                _drift(*new, state["last_step"][cold], int(step) - 1, group)
                rows_grad = grad.index_select(0, cold)
                torch._fused_adam_(
                    *([t] for t in (new[0], rows_grad, *new[1:])), [], [step], **kwargs
                )
                # written back as differences: index_add_ takes the parallel scatter path
                for target, after, before in zip((table, m, v), new, old, strict=True):
                    target.index_add_(0, cold, after.sub_(before))
                state["last_step"].index_fill_(0, cold, int(step))
        table.grad = None

    def catch_up(self) -> None:
        """Apply every cold row's zero-gradient Adam steps since it last moved (`_drift`),
        so that the table is as dense Adam's would be: before the vectors are read whole
        (`encode`: validation, export)."""
        if self._lazy_state is None or self._hot_rows is None:
            return
        state, group = self._lazy_state
        table, hot, now = self.embedding.weight, self._hot_rows, int(state["step"])
        last = state["last_step"]
        rows = (last[hot:] < now).nonzero().squeeze(1) + hot
        if not len(rows):
            return
        with torch.no_grad(), _no_nan_fill():
            m, v = state["exp_avg"], state["exp_avg_sq"]
            old = [t.index_select(0, rows) for t in (table, m, v)]
            new = [t.clone() for t in old]
            _drift(*new, last[rows], now, group)
            for target, after, before in zip((table, m, v), new, old, strict=True):
                target.index_add_(0, rows, after.sub_(before))
            last.index_fill_(0, rows, now)

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
                # beta=0 on a fresh buffer: the product overwrites every row item bags reach
                # (the hot rows; the cold ones were cleared by `table_grad`), no zero fill
                transpose = self.item_transpose()
                rows = transpose.shape[0]
                target[:rows].addmm_(transpose, grad_ivec, beta=0 if fresh else 1)
            else:
                _bag_backward(target, item_bags, item_weights, grad_ivec)
            _bag_backward(target, user_bags, user_weights, grad_users)
            if target is not table:
                self.note_cold_rows(user_bags)
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
        passes measured 66 ms a step at 10M pairs, fused 15 ms), over the hot rows only with
        the cold ones lazy (`_lazy_adam`, its step pre-hook); full, or another
        `optim.optimizer` than adam: the base's."""
        if not self.topm or self.cfg.optim.optimizer != "adam":
            return super().configure_optimizers()
        optim = self.cfg.optim
        adam = torch.optim.Adam(
            self.parameters(), lr=optim.lr, weight_decay=optim.weight_decay, fused=True
        )
        adam.register_step_pre_hook(self._lazy_adam)
        return [adam]

    def batch_encoder(self):  # type: ignore[override]
        if not self.topm:
            return super().batch_encoder()
        offset = self.n_users
        return self._propagate, lambda items: self._propagate(items + offset, items=True)

    def encode(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.topm:
            self.catch_up()
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

"""LightGCN with torch-geometric: embeddings smoothed over the user-item graph.

Propagation uses PyG's `LGConv` on a symmetric-normalised adjacency held as a torch CSR
tensor (about 10x faster than an edge list on CPU here). Which train pairs form edges is
configurable (`model.edge_min_label`), optionally weighted by level.

The adjacency is symmetric, so the gradient of A x is A g: `SymmetricLGConv` says so to
autograd instead of letting torch transpose the CSR matrix on every backward pass (at 20M
non-zeros: backward 3.0 s -> 0.8 s per layer on 2 cores).
"""

from __future__ import annotations

import torch
from torch import nn
from torch_geometric.nn import LGConv

from recfb.models.base import EmbeddingRecommender


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

    def on_fit_start(self) -> None:
        self.adjacency = self.adjacency.to(self.device)

    def encode(self) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.embedding.weight
        adj = self.adjacency if self.adjacency.device == x.device else self.adjacency.to(x.device)
        layers = [x]
        for conv in self.convs:
            x = conv(x, adj)
            layers.append(x)
        out = torch.stack(layers).mean(0)
        return out[: self.n_users], out[self.n_users :]

"""Cascaded multi-behaviour random walk with restart (CascadingRank, Ko et al. 2025).

Why: behaviours are ordered (view < cart/fav < buy) and every deeper one implies the shallower
ones. A walk on the view graph finds what the user's neighbourhood looks at; re-walking on each
deeper graph, pulled toward the previous level's scores, keeps that breadth while letting the
scarcer deep signal reorder it. No training, a few sparse products per level: a strong candidate
source and a feature for the learned ranker.

Update rule, per level t = lo..T (``lo = min_label``, T = ``n_levels`` or the deepest train label),
with ``A_t`` the user x item graph of the pairs with ``label >= t``,
``Â_t = D_u^-1/2 A_t D_i^-1/2`` (that graph's degrees; a zero degree gives 0) and g = 1 - a - b::

    r_u <- g Â_t   r_i + a q_u   + b p_u
    r_i <- g Â_t^T r_u + a q_i,t + b p_i

``q_u`` is the one-hot query user, ``q_i,t`` the user's row of ``A_t`` over its degree (zero
when the user has no level-t pair). The prior ``p`` is the queries at the first level and the
previous level's final scores after it; the walk starts from the prior. The iteration is
Gauss-Seidel: the fresh ``r_u`` feeds the ``r_i`` of the same step (same fixed point as Jacobi,
about twice as fast; only the start of ``r_i`` matters then). A user's column stops (and is
frozen) once the largest change of its ``r_i`` is at most ``tol`` times the largest ``|r_i|`` of
that column, in this step or in the level's prior (a relative test; the prior keeps it
meaningful where the walk drains a column toward 0, e.g. b = 0 and a user without pairs at that
level), or after ``max_iter`` steps. Freezing per column makes a user's scores independent of
the batch it is in.

The deepest level's ``r_i`` ranks the items; the user's explicit negatives (train rows with
label -1) are then set to the row's minimum minus 1, so they rank last and stay finite.

``level_weights[s - 1]`` multiplies the edge of a pair whose deepest level is s, in every graph
that holds it (a pair deeper than T counts as T). A constant per graph would cancel in the
symmetric normalisation, so the weight follows the pair: e.g. bought pairs weigh more in the
view graph.

Everything is sparse (torch CSR, float32) except the dense (n_users, B) and (n_items, B) score
blocks of a batch of B users.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import polars as pl
import scipy.sparse as sp
import torch
from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator, model_validator

from recfb.models.baselines import Baseline


class CascadeConfig(BaseModel):
    """Walk parameters of :class:`CascadeRank` (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    alpha: float = 0.0
    beta: float = 0.9
    level_weights: list[float] | None = None
    tol: float = 1e-4
    max_iter: int = 50
    batch_users: int = 1024

    @field_validator("alpha", "beta")
    @classmethod
    def _non_negative(cls, value: float, info: ValidationInfo) -> float:
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{info.field_name} must be a finite number >= 0, got {value}")
        return value

    @field_validator("level_weights")
    @classmethod
    def _positive_weights(cls, value: list[float] | None) -> list[float] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("level_weights must hold one weight per level (or be null)")
        bad = [w for w in value if not (math.isfinite(w) and w > 0)]
        if bad:
            raise ValueError(f"level_weights must be finite and > 0, got {bad}")
        return value

    @field_validator("tol")
    @classmethod
    def _tol(cls, value: float) -> float:
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"tol must be a finite number >= 0 (0: always max_iter), got {value}")
        return value

    @field_validator("max_iter", "batch_users")
    @classmethod
    def _at_least_one(cls, value: int, info: ValidationInfo) -> int:
        if value < 1:
            raise ValueError(f"{info.field_name} must be >= 1, got {value}")
        return value

    @model_validator(mode="after")
    def _restart_mass(self) -> CascadeConfig:
        total = self.alpha + self.beta
        if total >= 1:
            raise ValueError(
                f"alpha + beta must be < 1 (the walk keeps g = 1 - alpha - beta > 0 of its mass), "
                f"got alpha={self.alpha} + beta={self.beta} = {total}"
            )
        if total <= 0:
            raise ValueError(
                "alpha + beta must be > 0: with alpha = beta = 0 the walk never restarts and "
                "forgets the query user"
            )
        return self


class _Level:
    """One level's graph: the normalised matrix both ways (torch CSR) and the item queries."""

    def __init__(self, adjacency: sp.csr_matrix) -> None:
        adjacency = sp.csr_matrix(adjacency, dtype=np.float64)
        deg_u = np.asarray(adjacency.sum(axis=1)).ravel()
        deg_i = np.asarray(adjacency.sum(axis=0)).ravel()
        inv_u = _safe_power(deg_u, -1.0)
        norm = sp.diags(_safe_power(deg_u, -0.5)) @ adjacency @ sp.diags(_safe_power(deg_i, -0.5))
        self.forward = _torch_csr(sp.csr_matrix(norm))  # (n_users, n_items)
        self.backward = _torch_csr(sp.csr_matrix(norm.T))  # (n_items, n_users)
        self.queries = sp.csr_matrix(sp.diags(inv_u) @ adjacency, dtype=np.float32)


class CascadeRank(Baseline):
    """Training-free cascaded random walk with restart over the behaviour levels.

    ``fit(train, n_users, n_items)`` builds one sparse graph per level; ``score(users)`` walks
    them for each batch of ``batch_users`` users. ``iterations_used`` holds, per level, the
    iterations the last batch needed (its slowest user).
    """

    def __init__(
        self,
        min_label: int = 1,
        n_levels: int | None = None,
        alpha: float = 0.0,
        beta: float = 0.9,
        level_weights: list[float] | None = None,
        tol: float = 1e-4,
        max_iter: int = 50,
        batch_users: int = 1024,
    ) -> None:
        super().__init__(min_label)
        if self.min_label < 1:
            raise ValueError(f"min_label must be >= 1 (the shallowest level), got {min_label}")
        if n_levels is not None and n_levels < 1:
            raise ValueError(f"n_levels must be >= 1 or None (deepest train label), got {n_levels}")
        self.n_levels = n_levels
        self.config = CascadeConfig(
            alpha=alpha,
            beta=beta,
            level_weights=level_weights,
            tol=tol,
            max_iter=max_iter,
            batch_users=batch_users,
        )
        self.levels: list[int] = []
        self.iterations_used: list[int] = []
        self._graphs: list[_Level] = []
        self._negatives = sp.csr_matrix((0, 0), dtype=np.float32)

    def _fit(self, train: pl.DataFrame) -> None:
        labels = train["label"].cast(pl.Int64)
        deepest = int(labels.max()) if train.height else 0  # type: ignore[arg-type]
        top = self.n_levels if self.n_levels is not None else max(deepest, 0)
        weights = self.config.level_weights
        if weights is not None and len(weights) != top:
            raise ValueError(
                f"level_weights holds {len(weights)} weights but there are {top} levels "
                f"(n_levels={self.n_levels}, deepest train label {deepest})"
            )
        self.levels = list(range(self.min_label, top + 1))
        pairs = (
            train.select(
                pl.col("user_idx").cast(pl.Int64),
                pl.col("item_idx").cast(pl.Int64),
                pl.col("label").cast(pl.Int64),
            )
            .filter(pl.col("label") >= self.min_label)
            .group_by("user_idx", "item_idx")
            .agg(pl.col("label").max().clip(upper_bound=max(top, 1)))
        )
        users = pairs["user_idx"].to_numpy()
        items = pairs["item_idx"].to_numpy()
        depth = pairs["label"].to_numpy()
        if weights is None:
            edge = np.ones(len(depth), dtype=np.float64)
        else:
            edge = np.asarray(weights, dtype=np.float64)[depth - 1]
        shape = (self.n_users, self.n_items)
        self._graphs = []
        for t in self.levels:
            keep = depth >= t
            adjacency = sp.csr_matrix((edge[keep], (users[keep], items[keep])), shape=shape)
            self._graphs.append(_Level(adjacency))
        negative = train.filter(pl.col("label") == -1)
        self._negatives = sp.csr_matrix(
            (
                np.ones(negative.height, dtype=np.float32),
                (negative["user_idx"].to_numpy(), negative["item_idx"].to_numpy()),
            ),
            shape=shape,
        )
        self.iterations_used = []

    def _score(self, users: np.ndarray) -> torch.Tensor:
        step = self.config.batch_users
        if len(users) <= step:
            return self._walk(users)
        out = torch.empty(len(users), self.n_items, dtype=torch.float32)
        for start in range(0, len(users), step):
            chunk = users[start : start + step]
            out[start : start + len(chunk)] = self._walk(chunk)
        return out

    def _walk(self, users: np.ndarray) -> torch.Tensor:
        """Scores (B, n_items) of one batch of users, negatives pushed to the bottom.

        The dense blocks live in preallocated buffers (prior, current, next, scratch and query
        for the items, plus the output: about 6 x n_items x B floats), since fresh tensors of
        that size cost more in page faults than the products themselves.
        """
        a, b = self.config.alpha, self.config.beta
        g = 1.0 - a - b
        n_batch = len(users)
        rows = torch.from_numpy(users.astype(np.int64))
        cols = torch.arange(n_batch)
        cur_u, cur_i = torch.zeros(self.n_users, n_batch), torch.zeros(self.n_items, n_batch)
        self.iterations_used = []
        if not self._graphs:
            return self._push_down_negatives(cur_i.T.contiguous(), users)
        prior_u, next_u = torch.empty_like(cur_u), torch.empty_like(cur_u)
        prior_i, next_i = torch.empty_like(cur_i), torch.empty_like(cur_i)
        scratch = torch.empty_like(cur_i)
        query_i = torch.empty_like(cur_i)
        for k, graph in enumerate(self._graphs):
            if k == 0 or a > 0:
                self._item_queries(graph, users, out=query_i)
            if k == 0:  # the first level's prior is the queries themselves
                cur_u[rows, cols] = 1.0
                cur_i.copy_(query_i)
            prior_u.copy_(cur_u)  # the walk starts from its prior
            prior_i.copy_(cur_i)
            prior_scale = torch.abs(prior_i, out=scratch).amax(dim=0)
            active = torch.ones(n_batch, dtype=torch.bool)
            used = 0
            while used < self.config.max_iter and bool(active.any()):
                used += 1
                # Gauss-Seidel: the r_u of this step feeds its r_i
                torch.addmm(prior_u, graph.forward, cur_i, beta=b, alpha=g, out=next_u)
                if a > 0:
                    next_u[rows, cols] += a
                torch.addmm(prior_i, graph.backward, next_u, beta=b, alpha=g, out=next_i)
                if a > 0:
                    next_i.add_(query_i, alpha=a)
                change = torch.sub(next_i, cur_i, out=scratch).abs_().amax(dim=0)
                scale = torch.abs(next_i, out=scratch).amax(dim=0).maximum(prior_scale)
                frozen = ~active
                if bool(frozen.any()):  # converged users keep the scores they converged to
                    next_u[:, frozen] = cur_u[:, frozen]
                    next_i[:, frozen] = cur_i[:, frozen]
                cur_u, next_u = next_u, cur_u
                cur_i, next_i = next_i, cur_i
                active &= change > self.config.tol * scale
            self.iterations_used.append(used)
        return self._push_down_negatives(cur_i.T.contiguous(), users)

    @staticmethod
    def _item_queries(graph: _Level, users: np.ndarray, out: torch.Tensor) -> None:
        """q_i,t of each user as the columns of ``out`` (n_items, B), written in place."""
        rows = graph.queries[users].tocoo()
        out.zero_()
        out[
            torch.from_numpy(rows.col.astype(np.int64)), torch.from_numpy(rows.row.astype(np.int64))
        ] = torch.from_numpy(rows.data.astype(np.float32))

    def _push_down_negatives(self, scores: torch.Tensor, users: np.ndarray) -> torch.Tensor:
        """Set each user's explicit negatives to the row's minimum minus 1 (in place)."""
        negative = self._negatives[users].tocoo()
        if negative.nnz:
            r = torch.from_numpy(negative.row.astype(np.int64))
            c = torch.from_numpy(negative.col.astype(np.int64))
            floor = scores.amin(dim=1) - 1.0
            scores[r, c] = floor[r]
        return scores


def _safe_power(values: np.ndarray, exponent: float) -> np.ndarray:
    """values ** exponent, with 0 where a value is 0 (an isolated node)."""
    out = np.zeros_like(values, dtype=np.float64)
    nz = values > 0
    out[nz] = values[nz] ** exponent
    return out


def _torch_csr(matrix: sp.csr_matrix) -> torch.Tensor:
    """A float32 torch CSR copy of a scipy CSR matrix (torch's beta notice silenced)."""
    matrix = sp.csr_matrix(matrix)
    matrix.sum_duplicates()  # also sorts the indices
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(
            torch.from_numpy(matrix.indptr.astype(np.int64)),
            torch.from_numpy(matrix.indices.astype(np.int64)),
            torch.from_numpy(matrix.data.astype(np.float32)),
            size=matrix.shape,
            check_invariants=False,
        )

"""Non-neural baselines scored by the same full-catalogue harness as the embedding models.

Each baseline is fitted on the positive pairs of a train table (``label >= min_label``; exposures
and explicit negatives below that are ignored) and answers ``score(users) -> (B, n_items)``
float32 scores, higher = better, like every other recfb scorer. Nothing here masks the user's
train items: the evaluation harness does that.

- ``Popularity``: number of distinct users with a positive pair per item, the same for everyone
  (also the fallback for unknown users).
- ``ItemKNN``: item-item cosine on the binary user-item matrix with shrinkage, top-k pruned.
- ``ImplicitALS`` / ``ImplicitBPR``: thin wrappers around the CPU models of ``implicit`` 0.7.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl
import scipy.sparse as sp
import torch
from threadpoolctl import threadpool_limits

_PAIR_COLUMNS = ("user_idx", "item_idx", "label")
_KNN_CELLS_PER_CHUNK = 2**23  # similarity cells (padded rows x widest row) per item chunk


class Baseline:
    """Shared fit/score plumbing; subclasses build their state in ``_fit``."""

    def __init__(self, min_label: int = 1) -> None:
        self.min_label = int(min_label)
        self.n_users = 0
        self.n_items = 0
        self._fitted = False

    def fit(self, train: pl.DataFrame, n_users: int, n_items: int) -> Baseline:
        """Fit on the pairs of ``train`` with ``label >= min_label``; returns self."""
        _check_train(train, n_users, n_items)
        self.n_users, self.n_items = int(n_users), int(n_items)
        self._fit(train)
        self._fitted = True
        return self

    def score(self, users: torch.Tensor) -> torch.Tensor:
        """Scores of every item for each user: LongTensor (B,) -> float32 (B, n_items)."""
        if not self._fitted:
            raise RuntimeError(f"{type(self).__name__} must be fitted before scoring")
        idx = torch.as_tensor(users).reshape(-1).to("cpu", torch.long)
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= self.n_users):
            raise IndexError(f"user ids must lie in [0, {self.n_users}); got {idx.tolist()[:10]}")
        out = self._score(idx.numpy())
        return out.to(dtype=torch.float32, device=torch.as_tensor(users).device)

    def _fit(self, train: pl.DataFrame) -> None:
        raise NotImplementedError

    def _score(self, users: np.ndarray) -> torch.Tensor:
        raise NotImplementedError

    def _positives(self, train: pl.DataFrame, use_weights: bool = False) -> sp.csr_matrix:
        """User x item CSR of the positive pairs: 1 per pair, or the summed pair weights."""
        return positive_matrix(train, self.n_users, self.n_items, self.min_label, use_weights)


class Popularity(Baseline):
    """Score = number of distinct users with a positive pair on the item, for every user
    (with ``use_weights``: the sum of their pair weights, e.g. recency-decayed: trending)."""

    def __init__(self, min_label: int = 1, use_weights: bool = False) -> None:
        super().__init__(min_label)
        self.use_weights = bool(use_weights)
        self._counts = np.zeros(0, dtype=np.float32)

    def _fit(self, train: pl.DataFrame) -> None:
        x = self._positives(train, self.use_weights)
        self._counts = np.asarray(x.sum(axis=0)).ravel().astype(np.float32)

    def popularity_vector(self) -> np.ndarray:
        """User counts per item (float32, length n_items); a copy, safe to modify."""
        if not self._fitted:
            raise RuntimeError("Popularity must be fitted first")
        return self._counts.copy()

    def _score(self, users: np.ndarray) -> torch.Tensor:
        row = torch.from_numpy(self._counts)
        return row.unsqueeze(0).expand(len(users), -1).clone()


class ItemKNN(Baseline):
    """Item-based k-nearest-neighbours on the binary user-item matrix.

    sim(i, j) = |U_i & U_j| / (|U_i|^0.5 |U_j|^0.5 + shrink), j != i; each item keeps its ``k``
    most similar items (ties broken by the lower item index, so the result is reproducible) and
    score(u) = sum of the similarity rows of u's positive items. ``similarity`` holds the pruned
    item x item matrix (row i = the neighbours of i) after fitting.
    """

    def __init__(self, k: int = 100, shrink: float = 10.0, min_label: int = 1) -> None:
        super().__init__(min_label)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if shrink < 0:
            raise ValueError(f"shrink must be >= 0, got {shrink}")
        self.k, self.shrink = int(k), float(shrink)
        self.similarity = sp.csr_matrix((0, 0), dtype=np.float32)
        self._user_items = sp.csr_matrix((0, 0), dtype=np.float32)

    def _fit(self, train: pl.DataFrame) -> None:
        x = self._positives(train).astype(np.float64)
        self._user_items = x.astype(np.float32)
        self.similarity = knn_similarity(x, self.k, self.shrink)

    def _score(self, users: np.ndarray) -> torch.Tensor:
        scores = (self._user_items[users] @ self.similarity).toarray()
        return torch.from_numpy(np.asarray(scores, dtype=np.float32))


def knn_similarity(user_items: sp.csr_matrix, k: int, shrink: float) -> sp.csr_matrix:
    """Top-k shrunk cosine item-item matrix (float32 CSR) of a binary user x item matrix.

    Computed a chunk of items at a time so that memory stays bounded on large catalogues; the
    similarities are compared in float64 so that ties are exact and the tie rule holds.
    """
    x = sp.csr_matrix(user_items, dtype=np.float64)
    n_items = x.shape[1]
    norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=0)).ravel())
    xt = x.T.tocsr()
    chunk = max(1, _KNN_CELLS_PER_CHUNK // max(n_items, 1))
    rows_out: list[np.ndarray] = []
    cols_out: list[np.ndarray] = []
    vals_out: list[np.ndarray] = []
    for start in range(0, n_items, chunk):
        block = (xt[start : start + chunk] @ x).tocsr()
        if block.nnz == 0:
            continue
        counts = np.diff(block.indptr)
        rows = np.repeat(np.arange(block.shape[0]), counts)
        cols = block.indices
        sim = block.data / (norms[rows + start] * norms[cols] + shrink)
        sim[cols == rows + start] = -np.inf  # an item is not its own neighbour
        keep = _top_k_mask(sim, rows, cols, block.indptr, k) & (sim > 0)
        rows_out.append(rows[keep] + start)
        cols_out.append(cols[keep])
        vals_out.append(sim[keep])
    if not rows_out:
        return sp.csr_matrix((n_items, n_items), dtype=np.float32)
    return sp.csr_matrix(
        (
            np.concatenate(vals_out).astype(np.float32),
            (np.concatenate(rows_out), np.concatenate(cols_out)),
        ),
        shape=(n_items, n_items),
    )


def _top_k_mask(
    values: np.ndarray, rows: np.ndarray, cols: np.ndarray, indptr: np.ndarray, k: int
) -> np.ndarray:
    """Mask of the k largest values of each CSR row; ties go to the lower column.

    The k-th largest value per row comes from one partition of the rows padded to the widest
    row; entries above it are kept, then entries equal to it in column order until the row
    holds k (only those few are sorted, so the row's column order does not matter).
    """
    counts = np.diff(indptr)
    if counts.max() <= k:
        return np.ones(len(values), dtype=bool)
    n_rows = len(counts)
    slot = np.arange(len(values)) - np.repeat(indptr[:-1], counts)
    padded = np.full((n_rows, int(counts.max())), -np.inf)
    padded[rows, slot] = values
    kth = -np.partition(-padded, k - 1, axis=1)[:, k - 1]
    keep = values > kth[rows]
    room = k - np.bincount(rows, weights=keep, minlength=n_rows).astype(np.int64)
    tied = np.flatnonzero(values == kth[rows])
    tied = tied[np.lexsort((cols[tied], rows[tied]))]
    tied_rows = rows[tied]
    first = np.searchsorted(tied_rows, tied_rows)  # position of the row's first tied entry
    rank = np.arange(len(tied)) - first  # 0-based rank among the row's ties, by column
    keep[tied[rank < room[tied_rows]]] = True
    return keep


class _ImplicitFactors(Baseline):
    """Fit an ``implicit`` CPU factor model; score = user_factors @ item_factors.T."""

    def __init__(self, min_label: int, num_threads: int, seed: int) -> None:
        super().__init__(min_label)
        self.num_threads, self.seed = int(num_threads), int(seed)
        self._users = torch.zeros(0, 0)
        self._items = torch.zeros(0, 0)

    def _build(self) -> Any:
        raise NotImplementedError

    def _matrix(self, train: pl.DataFrame) -> sp.csr_matrix:
        raise NotImplementedError

    def _fit(self, train: pl.DataFrame) -> None:
        matrix = self._matrix(train)
        # implicit parallelises itself; a threaded BLAS underneath only oversubscribes the cores
        # (and makes implicit warn), so BLAS stays single-threaded during the fit only
        with threadpool_limits(limits=1, user_api="blas"):
            model = self._build()
            model.fit(matrix, show_progress=False)
        users = np.ascontiguousarray(model.user_factors, dtype=np.float32)
        items = np.ascontiguousarray(model.item_factors, dtype=np.float32)
        self._users, self._items = torch.from_numpy(users), torch.from_numpy(items)

    def user_vectors(self) -> np.ndarray:
        """User factors (n_users, d) float32; score = user_vectors @ item_vectors.T."""
        self._require_fit()
        return self._users.numpy().copy()

    def item_vectors(self) -> np.ndarray:
        """Item factors (n_items, d) float32."""
        self._require_fit()
        return self._items.numpy().copy()

    def _require_fit(self) -> None:
        if not self._fitted:
            raise RuntimeError(f"{type(self).__name__} must be fitted first")

    def _score(self, users: np.ndarray) -> torch.Tensor:
        return self._users[torch.from_numpy(users)] @ self._items.T


class ImplicitALS(_ImplicitFactors):
    """Hu-Koren-Volinsky ALS: confidence 1 + alpha * weight (weight 1 when not use_weights).

    With ``use_weights`` only pairs with a positive weight count: a zero weight carries no
    evidence, and implicit would read a negative one as a dislike.
    """

    def __init__(
        self,
        factors: int = 64,
        regularization: float = 0.01,
        iterations: int = 15,
        alpha: float = 10.0,
        min_label: int = 1,
        use_weights: bool = True,
        seed: int = 0,
        num_threads: int = 0,
    ) -> None:
        super().__init__(min_label, num_threads, seed)
        self.factors, self.regularization = int(factors), float(regularization)
        self.iterations, self.alpha = int(iterations), float(alpha)
        self.use_weights = bool(use_weights)

    def _matrix(self, train: pl.DataFrame) -> sp.csr_matrix:
        return self._positives(train, self.use_weights)

    def _build(self) -> Any:
        from implicit.cpu.als import AlternatingLeastSquares

        # implicit stores C - 1 in the matrix and multiplies it by alpha itself
        return AlternatingLeastSquares(
            factors=self.factors,
            regularization=self.regularization,
            alpha=self.alpha,
            dtype=np.float32,
            iterations=self.iterations,
            num_threads=self.num_threads,
            random_state=self.seed,
        )


class ImplicitBPR(_ImplicitFactors):
    """BPR-MF by SGD on the binary positives (implicit adds an item bias as the last factor).

    Bit-for-bit reproducible only with ``num_threads=1``: implicit's threads update the factors
    without locks, so with several threads the seed fixes only the start.
    """

    def __init__(
        self,
        factors: int = 64,
        learning_rate: float = 0.01,
        regularization: float = 0.01,
        iterations: int = 100,
        min_label: int = 1,
        seed: int = 0,
        num_threads: int = 0,
    ) -> None:
        super().__init__(min_label, num_threads, seed)
        self.factors, self.learning_rate = int(factors), float(learning_rate)
        self.regularization, self.iterations = float(regularization), int(iterations)

    def _matrix(self, train: pl.DataFrame) -> sp.csr_matrix:
        return self._positives(train)

    def _build(self) -> Any:
        from implicit.cpu.bpr import BayesianPersonalizedRanking

        return BayesianPersonalizedRanking(
            factors=self.factors,
            learning_rate=self.learning_rate,
            regularization=self.regularization,
            dtype=np.float32,
            iterations=self.iterations,
            num_threads=self.num_threads,
            random_state=self.seed,
        )


def make_baseline(name: str, **params: Any) -> Baseline:
    """Build a baseline by its family name (`recfb.models.config.FAMILIES`) with its
    constructor parameters."""
    from recfb.models.config import FAMILIES

    spec = FAMILIES.get(name)
    if spec is None or spec.kind != "baseline":
        known = sorted(n for n, f in FAMILIES.items() if f.kind == "baseline")
        raise ValueError(f"unknown baseline '{name}'; known: {known}")
    return spec.load_class()(**params)


def positive_matrix(
    train: pl.DataFrame, n_users: int, n_items: int, min_label: int = 1, use_weights: bool = False
) -> sp.csr_matrix:
    """User x item float32 CSR of the pairs with ``label >= min_label``.

    Values are 1 per (user, item), or the summed ``weight`` of its pairs with ``use_weights``
    (pairs whose weight is not positive are left out).
    """
    if use_weights and "weight" not in train.columns:
        raise ValueError("use_weights needs a 'weight' column in train")
    pos = train.filter(pl.col("label") >= min_label)
    users = pos["user_idx"].to_numpy().astype(np.int64)
    items = pos["item_idx"].to_numpy().astype(np.int64)
    if use_weights:
        values = pos["weight"].to_numpy().astype(np.float32)
        if not np.isfinite(values).all():
            raise ValueError("weight holds NaN or infinite values")
        keep = values > 0
        users, items, values = users[keep], items[keep], values[keep]
    else:
        values = np.ones(len(users), dtype=np.float32)
    matrix = sp.csr_matrix((values, (users, items)), shape=(n_users, n_items), dtype=np.float32)
    matrix.sum_duplicates()
    if not use_weights:
        matrix.data[:] = 1.0
    return matrix


def _check_train(train: pl.DataFrame, n_users: int, n_items: int) -> None:
    """Fail early, with the reason, on a table the baselines cannot index."""
    missing = [c for c in _PAIR_COLUMNS if c not in train.columns]
    if missing:
        raise ValueError(f"train lacks the columns {missing}")
    if n_users < 1 or n_items < 1:
        raise ValueError(f"n_users and n_items must be >= 1, got {n_users}, {n_items}")
    if train.height == 0:
        return
    for column, bound in (("user_idx", n_users), ("item_idx", n_items)):
        low, high = train[column].min(), train[column].max()
        if train[column].null_count() or low < 0 or high >= bound:  # type: ignore[operator]
            raise ValueError(f"{column} must lie in [0, {bound}) without nulls; got {low}..{high}")

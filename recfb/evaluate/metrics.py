"""Full-ranking evaluation of a scorer on held-out pairs, vectorised in torch, batched over users.

Semantics
---------
* Every user is ranked against ALL ``n_items`` items (no sampled negatives): ``score(users)``
  returns a ``(B, n_items)`` matrix, which is the only thing asked of a model. Items a model
  knows nothing about are simply whatever it scores them.
* Masking (``EvalConfig.exclude``): the user's TRAIN pairs are set to ``-inf`` before the top-k,
  because re-recommending what the user already has is not what is measured.
  ``"none"`` masks nothing, ``"any"`` masks every train pair (whatever its label, exposures and
  explicit negatives included), ``"min_level"`` masks train pairs with
  ``label >= exclude_min_level`` (e.g. 4: only bought items), ``"signals"`` masks the train
  pairs whose label is in ``hidden_labels``: the signal map's one exclusion rule (bought and
  not refunded, explicit negatives; what was only viewed or carted stays rankable).
  If a user has fewer than k unmasked items, the tail of the list holds masked items; they are
  never hits and are left out of coverage and popularity.
* Relevance: the overall relevant set of a user is their held-out pairs with
  ``label >= relevant_min_level``, MINUS the items masked for that user (the temporal split lets a
  held-out pair also be a train pair; a masked item cannot be recommended, so it must not count
  as a miss). Per level ``t`` of ``level_names`` the same with ``label >= t`` ("at least this
  deep"; the deepest level alone is e.g. purchases). Duplicate held-out pairs keep their highest
  label. A user whose relevant set is empty is skipped for that group of metrics.
* Metrics at each cut-off k, averaged over the evaluated users of the group, computed by
  `recfb.evaluate.ranking.ranking_metrics` (the one definition the promotion gate uses too):
  ``recall@k = hits / min(k, |relevant|)`` (recall capped at k, so that a perfect list scores 1
  even when a user has more relevant items than k); ``ndcg@k`` with binary gains
  ``1 / log2(rank + 1)`` and an ideal DCG over ``min(k, |relevant|)`` items; ``hr@k`` = 1 when
  the list holds at least one relevant item.
* Keys: ``recall@k``, ``ndcg@k``, ``hr@k`` and ``n_users`` for the overall group;
  ``recall@k/<level>`` etc. and ``n_users/<level>`` per level; ``coverage@k`` (distinct items over
  all top-k lists / n_items) and ``popularity@k`` (mean, over every recommended slot, of the
  item's train popularity percentile in [0, 1], 1 = most popular; a gauge of popularity bias),
  both over the users evaluated overall. A group with no evaluated user reports only its
  ``n_users`` key (0), so that no NaN reaches a tracker.
* Efficiency: one ``score`` call and one ``topk(max k)`` per batch of users; masked pairs are set
  to -inf by index on a copy of the scores; the labels of the top-k slots are found by a sorted
  search of (row, item) keys among the batch's held-out pairs and shared by all groups.
  Per-user values are summed over the batches and divided once at the end (`RankingSums`), so
  the result does not depend on the batch size, and sums over disjoint sets of users (DDP
  ranks that each evaluate their own) combine into the whole's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import polars as pl
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from recfb.evaluate.ranking import METRICS, ranking_metrics

ScoreFn = Callable[[torch.Tensor], torch.Tensor]
"""User indices (LongTensor (B,)) -> scores of every item (float tensor (B, n_items))."""

_TARGET_BATCH_CELLS = 2**25  # floats per score batch when batch_users is not given
_NO_PAIR = -128  # label given to a top-k slot whose item has no usable held-out pair
_UNSEEN = np.iinfo(np.int64).max  # best slot of an item no list holds
_PAIR_COLUMNS = ("user_idx", "item_idx", "label")


class EvalConfig(BaseModel):
    """How the ranking is masked and what counts as relevant (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ks: tuple[int, ...] = (10, 20, 50)
    exclude: Literal["none", "any", "min_level", "signals"] = "any"
    exclude_min_level: int = 1
    hidden_labels: tuple[int, ...] = Field(
        default=(-1,),
        description="exclude='signals': train pairs with these labels are masked (the signal "
        "map's rule, `recfb.etl.signals.exclusion_labels`)",
    )
    relevant_min_level: int = Field(default=1, ge=-1, le=127)
    batch_users: int | None = Field(default=None, ge=1)

    @field_validator("ks")
    @classmethod
    def _sorted_positive(cls, ks: tuple[int, ...]) -> tuple[int, ...]:
        """Sorted and unique, so the key order of the results is stable."""
        if not ks:
            raise ValueError("ks must name at least one cut-off")
        if min(ks) < 1:
            raise ValueError(f"cut-offs must be >= 1, got {ks}")
        return tuple(sorted(set(ks)))


# --------------------------------------------------------------------------------------------
# small public helpers


def item_popularity(train: pl.DataFrame, n_items: int, min_label: int = 1) -> np.ndarray:
    """Number of train pairs with ``label >= min_label`` per item (int64, length n_items)."""
    _check_pairs(train, "train", n_items)
    items = train.filter(pl.col("label") >= min_label)["item_idx"].to_numpy()
    return np.bincount(items.astype(np.int64), minlength=n_items)


def popularity_percentile(popularity: np.ndarray) -> np.ndarray:
    """Percentile of each item's popularity in [0, 1] (1 = most popular, ties share the mean rank).

    The mid-rank keeps the measure symmetric: when all items are equally popular every item
    is at 0.5, not at 0 or 1.
    """
    n = len(popularity)
    if n == 1:
        return np.full(1, 0.5)
    return (_average_ranks(np.asarray(popularity, dtype=np.float64)) - 1.0) / (n - 1)


def level_auc(scores: np.ndarray, labels: np.ndarray, levels: list[int]) -> dict[int, float]:
    """AUC of ``scores`` separating pairs with ``label >= t`` from the rest, for each level t.

    Mann-Whitney U with average ranks for ties; pairs labelled -1 and 0 sit in the lower group.
    A level with no pair on one side is left out rather than reported as NaN.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    if scores.shape != labels.shape:
        raise ValueError(f"scores ({scores.size}) and labels ({labels.size}) differ in length")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    ranks = _average_ranks(scores)
    out: dict[int, float] = {}
    for t in levels:
        above = labels >= t
        n_pos = int(above.sum())
        n_neg = labels.size - n_pos
        if n_pos == 0 or n_neg == 0:
            continue
        u = ranks[above].sum() - n_pos * (n_pos + 1) / 2.0
        out[t] = float(u / (n_pos * n_neg))
    return out


# --------------------------------------------------------------------------------------------
# ranking


def topk_items(
    score: ScoreFn,
    n_items: int,
    users: torch.Tensor | np.ndarray | Sequence[int],
    train: pl.DataFrame,
    config: EvalConfig,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k items per user with the train pairs masked as ``config.exclude`` says.

    Returns ``items`` (LongTensor (U, k)) and ``scores`` (float tensor (U, k)) on the CPU, best
    first, in the order of ``users``. A slot that only a masked item (or no item, when
    k > n_items) could fill holds item -1 and score -inf, so callers can drop non-finite scores.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    _check_pairs(train, "train", n_items)
    user_arr = _as_users(users)
    masked = _masked_pairs(train, config)
    rows = None if masked is None else _UserRows.from_frame(masked)
    batch = _batch_size(config, n_items)
    items_out = torch.full((len(user_arr), k), -1, dtype=torch.long)
    scores_out = torch.full((len(user_arr), k), float("-inf"))
    for start, _, top_idx, top_scores, valid in _ranked_batches(
        score, n_items, user_arr, rows, k, batch
    ):
        stop = start + top_idx.shape[0]
        width = top_idx.shape[1]
        items_out[start:stop, :width] = torch.where(valid, top_idx, -1)
        scores_out[start:stop, :width] = torch.where(valid, top_scores.float(), float("-inf"))
    return items_out, scores_out


def full_ranking_metrics(
    score: ScoreFn,
    n_items: int,
    heldout: pl.DataFrame,
    train: pl.DataFrame,
    level_names: dict[int, str],
    config: EvalConfig = EvalConfig(),
) -> dict[str, float]:
    """Recall, NDCG and hit rate at each k, overall and per level, plus coverage and popularity.

    See the module docstring for the exact semantics of masking, relevance and every key.
    """
    return ranking_sums(score, n_items, heldout, train, level_names, config).metrics()


@dataclass
class RankingSums:
    """What `full_ranking_metrics` adds up over users before it divides: per group (overall,
    then each level) the users evaluated and the sums of their metrics, each item's best slot
    in any list, and the popularity percentiles of the recommended slots. The sums of disjoint
    sets of users add up (best slots take the minimum) to the sums of their union, so ranks
    that each evaluate their own users combine exactly (`combined`)."""

    ks: tuple[int, ...]
    groups: tuple[str, ...]  # key suffixes: "" (overall), "/<level>"
    users: np.ndarray  # (groups,) float64
    sums: np.ndarray  # (groups, len(METRICS), len(ks)) float64
    best_rank: np.ndarray  # (n_items,) int64, _UNSEEN where no list holds the item
    popularity_sum: np.ndarray  # (len(ks),) float64: percentiles of the recommended slots
    slots: np.ndarray  # (len(ks),) float64: recommended (unmasked) slots

    def combined(self, all_reduce: Callable[[np.ndarray, str], np.ndarray]) -> RankingSums:
        """These sums combined with the other ranks' by `all_reduce(array, "sum" | "min")`."""
        return replace(
            self,
            users=all_reduce(self.users, "sum"),
            sums=all_reduce(self.sums, "sum"),
            best_rank=all_reduce(self.best_rank, "min"),
            popularity_sum=all_reduce(self.popularity_sum, "sum"),
            slots=all_reduce(self.slots, "sum"),
        )

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for g, suffix in enumerate(self.groups):
            n = float(self.users[g])
            out[f"n_users{suffix}"] = n
            if n == 0:
                continue
            means = self.sums[g] / n  # (len(METRICS), len(ks))
            for m, metric in enumerate(METRICS):
                for j, k in enumerate(self.ks):
                    out[f"{metric}@{k}{suffix}"] = float(means[m, j])
        if self.users[0] > 0:
            n_items = len(self.best_rank)
            for j, k in enumerate(self.ks):
                out[f"coverage@{k}"] = float((self.best_rank < k).sum()) / n_items
                slots = float(self.slots[j])
                out[f"popularity@{k}"] = float(self.popularity_sum[j]) / slots if slots > 0 else 0.0
        return out


def ranking_sums(
    score: ScoreFn,
    n_items: int,
    heldout: pl.DataFrame,
    train: pl.DataFrame,
    level_names: dict[int, str],
    config: EvalConfig = EvalConfig(),
    popularity: np.ndarray | None = None,
) -> RankingSums:
    """The sums `full_ranking_metrics` divides. `popularity`: every item's train popularity
    where `train` holds only some users' pairs (a rank's shard); by default `train`'s."""
    _check_pairs(heldout, "heldout", n_items)
    _check_pairs(train, "train", n_items)
    groups = [("", config.relevant_min_level)]
    for t, name in sorted(level_names.items()):
        if not -1 <= t <= 127:
            raise ValueError(f"level {t} ({name}) is outside the int8 label range [-1, 127]")
        groups.append((f"/{name}", t))

    masked = _masked_pairs(train, config)
    pairs = heldout.group_by("user_idx", "item_idx").agg(pl.col("label").max())
    if masked is not None:
        pairs = pairs.join(masked, on=["user_idx", "item_idx"], how="anti")
    pairs = pairs.filter(pl.col("label") >= min(t for _, t in groups))
    relevant = _UserRows.from_frame(pairs)
    users = np.unique(pairs["user_idx"].to_numpy()).astype(np.int64)

    ks = config.ks
    depth = min(ks[-1], n_items)  # columns of the top-k matrix
    at_k = np.array([min(k, depth) - 1 for k in ks])  # column of each cut-off
    if popularity is None:
        popularity = item_popularity(train, n_items)
    percentile = popularity_percentile(popularity)
    best_rank = np.full(n_items, _UNSEEN, dtype=np.int64)  # best slot of each item in any list
    # per-user values are kept and summed once at the end: the sums (so the metrics) are then
    # the same whatever the batch size
    per_user: list[list[np.ndarray]] = [[] for _ in groups]  # (n, len(METRICS), len(ks))
    pop_sum: list[np.ndarray] = []
    slots: list[np.ndarray] = []

    # The small (B, k) bookkeeping runs in numpy: per-call overhead of torch dominates there.
    mask_rows = None if masked is None else _UserRows.from_frame(masked)
    batches = _ranked_batches(score, n_items, users, mask_rows, depth, _batch_size(config, n_items))
    for _, batch_users, top_idx, _, valid in batches:
        b = len(batch_users)
        top, ok = top_idx.numpy(), valid.numpy()
        row, items, labels = relevant.gather(batch_users)
        found, at = _lookup(row * n_items + items, _slot_keys(top_idx, n_items))
        top_labels = np.where(found, labels[at], _NO_PAIR)
        for g, (_, t) in enumerate(groups):
            n_rel = np.bincount(row[labels >= t], minlength=b)
            keep = n_rel > 0
            if not keep.any():
                continue
            m = ranking_metrics(top_labels[keep] >= t, n_rel[keep], ks)
            per_user[g].append(np.stack([m[name] for name in METRICS], 1))
            if g == 0:
                kept_top, kept_ok = top[keep], ok[keep]
                ranks = np.where(kept_ok, np.arange(depth), _UNSEEN)
                np.minimum.at(best_rank, kept_top.ravel(), ranks.ravel())
                slot_pct = np.where(kept_ok, percentile[kept_top], 0.0)
                pop_sum.append(np.cumsum(slot_pct, 1)[:, at_k])
                slots.append(np.cumsum(kept_ok, 1, dtype=np.float64)[:, at_k])
    return RankingSums(
        ks=tuple(ks),
        groups=tuple(suffix for suffix, _ in groups),
        users=np.array([sum(len(v) for v in rows) for rows in per_user], dtype=np.float64),
        sums=np.stack([_summed(rows, (len(METRICS), len(ks))) for rows in per_user]),
        best_rank=best_rank,
        popularity_sum=_summed(pop_sum, (len(ks),)),
        slots=_summed(slots, (len(ks),)),
    )


# --------------------------------------------------------------------------------------------
# internals


class _UserRows:
    """Pairs grouped by user (CSR), so that a batch of users gathers its rows without a join."""

    def __init__(self, users: np.ndarray, items: np.ndarray, labels: np.ndarray) -> None:
        order = np.argsort(users, kind="stable")
        self.items = items[order].astype(np.int64)
        self.labels = labels[order].astype(np.int8)
        counts = np.bincount(users.astype(np.int64))
        self.indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    @classmethod
    def from_frame(cls, frame: pl.DataFrame) -> _UserRows:
        labels = frame["label"] if "label" in frame.columns else pl.Series([0] * frame.height)
        return cls(frame["user_idx"].to_numpy(), frame["item_idx"].to_numpy(), labels.to_numpy())

    def gather(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(position of the user in `users`, item, label) of every pair of those users."""
        inside = users < len(self.indptr) - 1  # users past the last row have no pairs
        starts = self.indptr[np.where(inside, users, 0)]
        lengths = self.indptr[np.where(inside, users + 1, 0)] - starts
        row = np.repeat(np.arange(len(users)), lengths)
        offsets = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        index = np.repeat(starts, lengths) + offsets
        return row, self.items[index], self.labels[index]


def _ranked_batches(
    score: ScoreFn,
    n_items: int,
    users: np.ndarray,
    masked: _UserRows | None,
    k: int,
    batch_users: int,
) -> Iterator[tuple[int, np.ndarray, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield (start, users, top indices, top scores, slot is unmasked) per batch, on the CPU.

    Scoring, masking and top-k run on whatever device `score` returns, so a GPU model
    keeps the heavy part on the GPU; only the (B, k) results come back.
    """
    k = min(k, n_items)
    buffer: torch.Tensor | None = None
    for start in range(0, len(users), batch_users):
        batch = users[start : start + batch_users]
        with torch.no_grad():
            scores = score(torch.from_numpy(batch)).detach()
        if tuple(scores.shape) != (len(batch), n_items):
            raise ValueError(
                f"score() returned shape {tuple(scores.shape)}, expected {(len(batch), n_items)}"
            )
        if not scores.is_floating_point():
            scores = scores.float()
        if masked is None:
            top_scores, top_idx = torch.topk(scores, k, dim=1)
            top_idx = top_idx.cpu()
            valid = torch.ones_like(top_idx, dtype=torch.bool)
        else:
            row, items, _ = masked.gather(batch)
            # Masked on a copy, because score() may hand out a tensor it keeps (a cache, a
            # parameter); one reused buffer spares the allocation and page faults per batch.
            if buffer is None or buffer.shape[0] < len(batch) or not _same_kind(buffer, scores):
                buffer = torch.empty_like(scores)
            scores = buffer[: len(batch)].copy_(scores)
            device = scores.device
            index = (torch.from_numpy(row).to(device), torch.from_numpy(items).to(device))
            scores.index_put_(index, torch.tensor(float("-inf"), dtype=scores.dtype, device=device))
            top_scores, top_idx = torch.topk(scores, k, dim=1)
            top_idx = top_idx.cpu()
            is_masked, _ = _lookup(row * n_items + items, _slot_keys(top_idx, n_items))
            valid = torch.from_numpy(~is_masked)
        yield start, batch, top_idx, top_scores.cpu(), valid


def _same_kind(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether `b` can be copied into `a` without a conversion."""
    return a.dtype == b.dtype and a.device == b.device and a.shape[1:] == b.shape[1:]


def _summed(pieces: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """The per-user rows of `pieces` summed (zeros of `shape` when there are none), over one
    C-ordered array: the sum then has the same rounding whatever the batch size (numpy sums C
    and F layouts in different orders)."""
    if not pieces:
        return np.zeros(shape)
    return np.ascontiguousarray(np.concatenate(pieces)).sum(0)


def _slot_keys(top_idx: torch.Tensor, n_items: int) -> np.ndarray:
    """(row in batch) * n_items + item for every top-k slot, shape (B, k)."""
    rows = np.arange(top_idx.shape[0], dtype=np.int64)[:, None]
    return rows * n_items + top_idx.numpy()


def _lookup(keys: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Which queries are among `keys`, and where: a sorted search instead of a dense
    (B, n_items) matrix, so the cost follows the number of pairs and slots, not of items."""
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    if len(ordered) == 0:
        return np.zeros(queries.shape, dtype=bool), np.zeros(queries.shape, dtype=np.int64)
    pos = np.minimum(np.searchsorted(ordered, queries), len(ordered) - 1)
    return ordered[pos] == queries, order[pos]


def _masked_pairs(train: pl.DataFrame, config: EvalConfig) -> pl.DataFrame | None:
    """Unique (user_idx, item_idx) train pairs to mask, or None when nothing is masked."""
    if config.exclude == "none":
        return None
    if config.exclude == "min_level":
        train = train.filter(pl.col("label") >= config.exclude_min_level)
    elif config.exclude == "signals":
        train = train.filter(pl.col("label").is_in(list(config.hidden_labels)))
    return train.select("user_idx", "item_idx").unique()


def _batch_size(config: EvalConfig, n_items: int) -> int:
    """Users per score() call: as configured, else about 2**25 scores per batch."""
    if config.batch_users is not None:
        return config.batch_users
    return max(1, _TARGET_BATCH_CELLS // max(n_items, 1))


def _as_users(users: torch.Tensor | np.ndarray | Sequence[int]) -> np.ndarray:
    """User indices as a 1-d int64 array, checked non-negative."""
    if isinstance(users, torch.Tensor):
        users = users.detach().cpu().numpy()
    arr = np.asarray(users).reshape(-1)
    if arr.size and arr.dtype.kind not in "iu":
        raise ValueError(f"user indices must be integers, got {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.size and arr.min() < 0:
        raise ValueError("user indices must be >= 0")
    return arr


def _check_pairs(frame: pl.DataFrame, what: str, n_items: int) -> None:
    """Fail early, naming the table, on missing columns or items outside [0, n_items)."""
    if n_items < 1:
        raise ValueError(f"n_items must be >= 1, got {n_items}")
    missing = [c for c in _PAIR_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{what}: missing column(s) {missing}; expected {list(_PAIR_COLUMNS)}")
    if frame.height == 0:
        return
    if frame["user_idx"].min() < 0 or frame["item_idx"].min() < 0:
        raise ValueError(f"{what}: negative user_idx or item_idx")
    top = frame["item_idx"].max()
    if top >= n_items:
        raise ValueError(f"{what}: item_idx {top} is outside [0, {n_items})")


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks in ascending order, ties sharing their average rank."""
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    starts_group = np.empty(len(values), dtype=bool)
    starts_group[:1] = True
    starts_group[1:] = ordered[1:] != ordered[:-1]
    group = np.cumsum(starts_group) - 1
    starts = np.flatnonzero(starts_group)
    ends = np.append(starts[1:], len(values))
    mean_rank = (starts + 1 + ends) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = mean_rank[group]
    return ranks

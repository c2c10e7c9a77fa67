"""The promotion gate's evaluation: two models on the same recent holdout, compared by ids.

A candidate and the production model may have different vocabularies (new users and items), so
both are scored through their own id maps against one holdout: the newest split of the
candidate's ETL output. Per holdout user the bundle knows: the top-k items by inner product,
minus the user's earlier pairs (train and valid splits, any label), scored by NDCG@k against the
user's positive holdout pairs. ``negative_share@k`` is the share of recommended (user, item)
pairs the user went on to dislike or refund in the holdout; ``popularity`` is each recommended
item's share of positive training pairs (for the report's distribution plot).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from recfb.errors import InputError


@dataclass(frozen=True)
class Vectors:
    """A model as the gate sees it: ids and inner-product vectors."""

    user_ids: np.ndarray
    user_vectors: np.ndarray
    item_ids: np.ndarray
    item_vectors: np.ndarray

    @classmethod
    def from_bundle(cls, path: str | Path) -> Vectors:
        path = Path(path)
        users = pl.read_parquet(path / "users.parquet").sort("user_idx")
        items = pl.read_parquet(path / "items.parquet").sort("item_idx")
        return cls(
            users["user_id"].to_numpy().astype(str),
            np.load(path / "user_vectors.npy"),
            items["item_id"].to_numpy().astype(str),
            np.load(path / "item_vectors.npy"),
        )


def _pairs(etl: Path, split: str) -> pl.DataFrame:
    users = pl.read_parquet(etl / "users.parquet", columns=["user_idx", "user_id"])
    items = pl.read_parquet(etl / "items.parquet", columns=["item_idx", "item_id"])
    return (
        pl.read_parquet(etl / f"{split}.parquet", columns=["user_idx", "item_idx", "label"])
        .join(users, on="user_idx")
        .join(items, on="item_idx")
        .select(pl.col("user_id").cast(pl.String), pl.col("item_id").cast(pl.String), "label")
    )


def holdout_metrics(
    model: Vectors, etl: str | Path, k: int = 10, split: str = "test", max_users: int = 20_000
) -> dict[str, float]:
    """NDCG@k, recall@k and negative_share@k of ``model`` on ``split`` of ``etl``."""
    etl = Path(etl)
    holdout = _pairs(etl, split)
    if holdout.filter(pl.col("label") >= 1).height == 0:
        raise InputError(f"no positive pairs in the {split} split to gate on", file=str(etl))
    earlier = pl.concat([_pairs(etl, s) for s in ("train", "valid")])
    user_row = {u: i for i, u in enumerate(model.user_ids)}
    item_row = {it: i for i, it in enumerate(model.item_ids)}
    pop = earlier.filter(pl.col("label") >= 1).group_by("item_id").len()
    pop_share = np.zeros(len(model.item_ids))
    for it, n in zip(pop["item_id"], pop["len"], strict=True):
        if it in item_row:
            pop_share[item_row[it]] = n / max(pop["len"].sum(), 1)

    def rows_by_user(df: pl.DataFrame) -> dict[str, np.ndarray]:
        df = df.with_columns(
            pl.col("item_id").replace_strict(item_row, default=-1, return_dtype=pl.Int64)
        ).filter(pl.col("item_id") >= 0)
        grouped = df.group_by("user_id").agg(pl.col("item_id"))
        return {
            u: np.asarray(r) for u, r in zip(grouped["user_id"], grouped["item_id"], strict=True)
        }

    positives = rows_by_user(holdout.filter(pl.col("label") >= 1))
    negatives = rows_by_user(holdout.filter(pl.col("label") < 0))
    seen = rows_by_user(earlier)
    users = sorted(
        u for u in holdout.filter(pl.col("label") >= 1)["user_id"].unique() if u in user_row
    )
    users = users[:max_users]
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    ndcg, recall, neg, n_recs, recommended = [], [], 0, 0, []
    for start in range(0, len(users), 1024):
        chunk = users[start : start + 1024]
        scores = model.user_vectors[[user_row[u] for u in chunk]] @ model.item_vectors.T
        for j, u in enumerate(chunk):
            if u in seen:
                scores[j, seen[u]] = -np.inf
        top = np.argsort(-scores, axis=1)[:, :k]
        for j, u in enumerate(chunk):
            pos = set(positives.get(u, np.empty(0, dtype=np.int64)).tolist())
            hits = np.array([r in pos for r in top[j]], dtype=float)
            ideal = discount[: min(len(pos), k)].sum()
            ndcg.append(float(hits @ discount) / ideal if ideal > 0 else 0.0)
            recall.append(hits.sum() / max(len(pos), 1))
            negs = set(negatives.get(u, np.empty(0, dtype=np.int64)).tolist())
            neg += sum(r in negs for r in top[j])
            n_recs += len(top[j])
            recommended.append(top[j])
    recs = np.concatenate(recommended) if recommended else np.empty(0, dtype=np.int64)
    return {
        f"ndcg@{k}": float(np.mean(ndcg)) if ndcg else 0.0,
        f"recall@{k}": float(np.mean(recall)) if recall else 0.0,
        f"negative_share@{k}": neg / max(n_recs, 1),
        "users": float(len(users)),
        "users_unknown": float(holdout["user_id"].n_unique() - len(users)),
        "rec_popularity_mean": float(pop_share[recs].mean()) if recs.size else 0.0,
        "_rec_popularity": pop_share[recs].tolist(),  # for the report's plot; not a metric
    }

"""The promotion gate's evaluation: two models on the same recent holdout, compared by ids.

A candidate and the production model may have different vocabularies (new users and items), so
both are scored through their own id maps against one holdout: the newest split of the
candidate's ETL output. Every holdout user with a relevant pair counts for both models: the
top-k items by inner product (by popularity for a user the model does not know, as the service
serves them), minus the user's earlier pairs that the signal map hides (train and valid splits:
bought and not refunded, explicit negatives; `recfb.etl.signals.exclusion_labels`), scored by
NDCG@k and recall@k against the user's positive holdout items minus those hidden ones (an item
the model does not know is a miss). The metrics are offline evaluation's own
(`recfb.evaluate.ranking`, e.g. recall@k = hits / min(k, |relevant|)), so a gate figure and an
evaluation figure of the same name mean the same. ``negative_share@k`` is the share of
recommended (user, item) pairs the user went on to dislike or refund in the holdout;
``popularity`` is each recommended item's share of positive training pairs (for the report's
distribution plot).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from recfb.distributed.config import RayConfig
from recfb.errors import InputError
from recfb.etl.signals import exclusion_labels
from recfb.evaluate.ranking import hit_matrix, ranking_metrics


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


CHUNK_USERS = 1024  # users scored at once: a (chunk, items) score matrix


def top_items(
    model: Vectors,
    rows: list[int],
    seen: list[np.ndarray | None],
    pop_share: np.ndarray,
    k: int,
) -> np.ndarray:
    """The top-k item rows of a chunk of users: by inner product for a user the model knows
    (`rows[j]` >= 0), by popularity for one it does not, the user's hidden items (`seen`)
    left out."""
    scores = np.tile(pop_share, (len(rows), 1))
    known = [j for j, r in enumerate(rows) if r >= 0]
    if known:
        scores[known] = model.user_vectors[[rows[j] for j in known]] @ model.item_vectors.T
    for j, hide in enumerate(seen):
        if hide is not None:
            scores[j, hide] = -np.inf
    return np.argsort(-scores, axis=1)[:, :k]


def _top_items_on_ray(
    model: Vectors,
    chunks: list[tuple[list[int], list[np.ndarray | None]]],
    pop_share: np.ndarray,
    k: int,
    cluster: RayConfig,
) -> list[np.ndarray]:
    """`top_items` of every chunk as Ray tasks (the model and popularity put in the object
    store once), in chunk order."""
    from recfb.distributed.cluster import connect

    ray = connect(cluster)
    task = ray.remote(num_cpus=cluster.cpus_per_worker)(top_items)
    shared, pop = ray.put(model), ray.put(pop_share)
    return ray.get([task.remote(shared, rows, seen, pop, k) for rows, seen in chunks])


def holdout_metrics(
    model: Vectors,
    etl: str | Path,
    k: int = 10,
    split: str = "test",
    max_users: int | None = 20_000,
    lists: dict[str, list[str]] | None = None,
    ray: RayConfig | None = None,
) -> dict[str, float]:
    """NDCG@k, recall@k and negative_share@k of ``model`` on ``split`` of ``etl``; with
    ``lists`` (user id -> ranked item ids, e.g. the two-stage recommender's) a listed user's
    top-k comes from there instead of the inner product. ``max_users`` None: every holdout
    user. With ``ray`` the users' lists are scored as Ray tasks: the same lists."""
    etl = Path(etl)
    holdout = _pairs(etl, split)
    if holdout.filter(pl.col("label") >= 1).height == 0:
        raise InputError(f"no positive pairs in the {split} split to gate on", file=str(etl))
    earlier = pl.concat([_pairs(etl, s) for s in ("train", "valid")])
    user_row = {u: i for i, u in enumerate(model.user_ids)}
    item_row = {it: i for i, it in enumerate(model.item_ids)}
    pop = earlier.filter(pl.col("label") >= 1).group_by("item_id").len()
    pop_share = np.zeros(len(model.item_ids))
    total = max(int(pop["len"].sum()), 1)
    for it, n in zip(pop["item_id"], pop["len"], strict=True):
        if it in item_row:
            pop_share[item_row[it]] = n / total

    def ids_by_user(df: pl.DataFrame) -> dict[str, set[str]]:
        grouped = df.group_by("user_id").agg(pl.col("item_id"))
        return {u: set(r) for u, r in zip(grouped["user_id"], grouped["item_id"], strict=True)}

    negatives = ids_by_user(holdout.filter(pl.col("label") < 0))
    hidden = exclusion_labels(json.loads((etl / "stats.json").read_text())["signal_map_spec"])
    hidden_ids = ids_by_user(earlier.filter(pl.col("label").is_in(hidden)))
    seen = {
        u: np.asarray([item_row[i] for i in items if i in item_row], dtype=np.int64)
        for u, items in hidden_ids.items()
    }
    # relevant as in offline evaluation: the positive holdout items minus those hidden from the
    # user (they cannot be recommended, so they are no one's miss); a user left with none is
    # skipped. New items stay relevant: a model that does not know them missed them.
    positives = {
        u: rel
        for u, items in ids_by_user(holdout.filter(pl.col("label") >= 1)).items()
        if (rel := items - hidden_ids.get(u, set()))
    }
    # the same users for every model: those with a relevant holdout item; a user the model
    # does not know gets its popularity list, as the service would serve them
    users = sorted(positives)[:max_users]
    top_lists: list[np.ndarray] = []
    neg, n_recs, recommended = 0, 0, []
    known = sum(u in user_row for u in users)
    starts = range(0, len(users), CHUNK_USERS)
    chunks = [
        (
            [user_row.get(u, -1) for u in users[i : i + CHUNK_USERS]],
            [seen.get(u) for u in users[i : i + CHUNK_USERS]],
        )
        for i in starts
    ]
    if ray is None:
        tops = [top_items(model, rows, hide, pop_share, k) for rows, hide in chunks]
    else:
        tops = _top_items_on_ray(model, chunks, pop_share, k, ray)
    for start, top in zip(starts, tops, strict=True):
        chunk = users[start : start + CHUNK_USERS]
        for j, u in enumerate(chunk):
            negs = negatives.get(u, set())
            top_ids = model.item_ids[top[j]]
            if lists is not None and u in lists:
                top_ids = np.asarray(lists[u][:k], dtype=object)
                top[j, : len(top_ids)] = [item_row.get(i, 0) for i in top_ids]
            top_lists.append(top_ids)
            neg += sum(i in negs for i in top_ids)
            n_recs += len(top_ids)
            recommended.append(top[j])
    hits, n_relevant = hit_matrix(top_lists, [positives[u] for u in users], k)
    per_user = ranking_metrics(hits, n_relevant, (k,))
    ndcg, recall = per_user["ndcg"][:, 0], per_user["recall"][:, 0]
    recs = np.concatenate(recommended) if recommended else np.empty(0, dtype=np.int64)
    return {
        f"ndcg@{k}": float(np.mean(ndcg)) if ndcg.size else 0.0,
        f"recall@{k}": float(np.mean(recall)) if recall.size else 0.0,
        f"negative_share@{k}": neg / max(n_recs, 1),
        "users": float(len(users)),
        "users_unknown": float(len(users) - known),
        "rec_popularity_mean": float(pop_share[recs].mean()) if recs.size else 0.0,
        "_rec_popularity": pop_share[recs].tolist(),  # for the report's plot; not a metric
    }

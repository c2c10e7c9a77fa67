"""Batch top-K recommendations from a trained run (`recfb recommend`).

Users unknown to the run's vocabulary, added after the run was trained, or without any
positive training pair (no learned taste) are served the most popular training items: a
documented fallback, never a crash. Output columns:
`user_id, rank (1..k), item_id, score, source ('model' | 'popularity')`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import torch

from recfb.evaluate import EvalConfig, topk_items
from recfb.train.data import Interactions
from recfb.train.fallback import PopularityFallback
from recfb.train.runs import VectorScorer


def recommend(
    scorer: VectorScorer,
    data: Interactions,
    user_ids: list[str] | None,
    k: int,
    config: EvalConfig,
) -> pl.DataFrame:
    """Top-k per external user id (all users of the vocabulary when `user_ids` is None)."""
    vocab = pl.read_parquet(data.directory / "users.parquet").select("user_idx", "user_id")
    items = pl.read_parquet(data.directory / "items.parquet").select("item_idx", "item_id")
    if user_ids is None:
        wanted = vocab
    else:
        wanted = pl.DataFrame({"user_id": [str(u) for u in user_ids]}).join(
            vocab, on="user_id", how="left", maintain_order="left"
        )
    served = PopularityFallback.from_train(scorer, data.train, data.n_users, data.n_items)
    warm_ids = np.flatnonzero(served.warm.numpy()[: scorer.n_users]).astype(np.uint32)
    known = wanted.filter(pl.col("user_idx").is_in(pl.Series(warm_ids).implode()))
    unknown = wanted.filter(~pl.col("user_id").is_in(known["user_id"].implode()))
    frames = []
    if known.height:
        users = torch.as_tensor(known["user_idx"].to_numpy().astype(np.int64))
        top_items, top_scores = topk_items(
            scorer.score, scorer.n_items, users, data.train, config, k
        )
        frames.append(_long(known["user_id"].to_list(), top_items, top_scores, "model"))
    if unknown.height:
        popularity = served.popularity
        order = torch.argsort(popularity, descending=True)[:k]
        n = unknown.height
        frames.append(
            _long(
                unknown["user_id"].to_list(),
                order.unsqueeze(0).expand(n, -1),
                popularity[order].unsqueeze(0).expand(n, -1),
                "popularity",
            )
        )
    out = pl.concat(frames) if frames else _long([], torch.zeros(0, k), torch.zeros(0, k), "model")
    return (
        out.join(items, on="item_idx", how="left")
        .select("user_id", "rank", "item_id", "score", "source")
        .sort("user_id", "rank")
    )


def _long(
    user_ids: list[str], items: torch.Tensor, scores: torch.Tensor, source: str
) -> pl.DataFrame:
    n, k = items.shape if items.ndim == 2 else (0, 0)
    valid = torch.isfinite(scores).reshape(-1).numpy() if n else np.zeros(0, dtype=bool)
    frame = pl.DataFrame(
        {
            "user_id": np.repeat(np.asarray(user_ids, dtype=object), k).astype(str) if n else [],
            "rank": np.tile(np.arange(1, k + 1, dtype=np.int32), n),
            "item_idx": items.reshape(-1).numpy().astype(np.uint32),
            "score": scores.reshape(-1).numpy().astype(np.float32),
            "source": [source] * (n * k),
        },
        schema={
            "user_id": pl.String,
            "rank": pl.Int32,
            "item_idx": pl.UInt32,
            "score": pl.Float32,
            "source": pl.String,
        },
    )
    return frame.filter(pl.Series(valid)) if n else frame


def write_recommendations(frame: pl.DataFrame, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    frame.write_parquet(tmp)
    tmp.replace(path)
    return path

"""Batch recommendations over many users as a Ray Data job: users in blocks, scored by a pool
of actors that each load the model once (the local `Recommender.recommend`, so the lists are
the local engine's), gathered back in the order asked."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pyarrow as pa

from recfb.distributed.cluster import connect
from recfb.distributed.config import RayConfig

BLOCK_USERS = 2_000  # users per block: a few seconds of one actor's work


class _Scorer:
    """One Ray actor: the model loaded once, one thread (the actors are the parallelism)."""

    def __init__(self, location: str, k: int, exclude: str) -> None:
        from threadpoolctl import threadpool_limits

        from recfb.recommender import Recommender
        from recfb.serving.fetch import resolve

        threadpool_limits(1)
        try:
            import torch

            torch.set_num_threads(1)
        except ModuleNotFoundError:  # a serve-only install scores with numpy and FAISS
            pass
        self.model = Recommender.load(resolve(location))
        self.k, self.exclude = k, exclude

    def __call__(self, batch: pa.Table) -> pa.Table:
        users = batch.column("user_id").to_pylist()
        return self.model.recommend(users, self.k, exclude=self.exclude).to_arrow()


def worker_location(location: str | Path) -> str:
    """What the actors load: a model URI pinned to one immutable version (an alias that moves
    during the job must not mix two models), or the path as given."""
    from recfb.serving.fetch import concrete_uri, is_model_uri

    if is_model_uri(location):
        return concrete_uri(str(location))[0]
    return str(Path(location).resolve())


def recommend_on_ray(
    location: str | Path,
    user_ids: list[str],
    k: int,
    cfg: RayConfig,
    exclude: str = "signals",
) -> pl.DataFrame:
    """`Recommender.load(location).recommend(user_ids, k)`, computed on the cluster."""
    ray = connect(cfg)
    pinned = worker_location(location)
    # each user scored once; the lists go back in the order asked (repeats included) by id,
    # whatever order the blocks come back in
    users = pa.table({"user_id": pa.array(list(dict.fromkeys(user_ids)), pa.string())})
    blocks = [users.slice(i, BLOCK_USERS) for i in range(0, max(users.num_rows, 1), BLOCK_USERS)]
    data = ray.data.from_arrow(blocks).map_batches(
        _Scorer,
        fn_constructor_kwargs={"location": pinned, "k": k, "exclude": exclude},
        batch_size=BLOCK_USERS,
        batch_format="pyarrow",
        concurrency=cfg.workers,
        num_cpus=cfg.cpus_per_worker,
    )
    tables = [ray.get(ref) for ref in data.to_arrow_refs()]
    tables = [t for t in tables if t.num_rows]
    if not tables:
        from recfb.recommender import Recommender
        from recfb.serving.fetch import resolve

        return Recommender.load(resolve(location)).recommend([], k, exclude=exclude)
    lists = pl.from_arrow(pa.concat_tables(tables, promote_options="default"))
    asked = pl.DataFrame({"user_id": user_ids}, schema={"user_id": lists.schema["user_id"]})
    asked = asked.with_row_index("position")
    return asked.join(lists, on="user_id").sort("position", "rank").drop("position")

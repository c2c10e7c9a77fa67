"""Typed configuration of `recfb index` (conf/index.yaml; every key overridable)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class IndexConfig(BaseModel):
    """How a run's item vectors become a FAISS index inside a model bundle.

    The index is chosen from the catalogue size unless `factory` names one: exact search
    (`Flat`) below `exact_below` items, `HNSW{hnsw_m},Flat` above (on a GPU, where FAISS has no
    HNSW, `IVF{nlist},Flat` with nlist ~ 4 sqrt(n)). Every build measures recall@k against
    exact search on the model's own user vectors and refuses to publish below `recall_floor`.
    """

    model_config = ConfigDict(extra="forbid")

    run_id: str | None = Field(None, description="MLflow run whose vectors are indexed")
    models_dir: str = Field("models", description="the model store: one directory per bundle")
    name: str | None = Field(None, description="bundle name (default: <family>-<run>-<time>)")
    factory: str | None = Field(
        None, description="a FAISS index-factory string (e.g. 'HNSW32,Flat', 'IVF1024,Flat')"
    )
    search_params: str | None = Field(
        None, description="FAISS parameter string, e.g. 'efSearch=128' or 'nprobe=16'"
    )
    exact_below: int = Field(50_000, ge=0, description="catalogues smaller than this: exact")
    low_recall: Literal["refuse", "exact"] = Field(
        "refuse",
        description="an index below recall_floor: refuse to publish (the pipeline's index "
        "stage), or fall back to exact search with a warning (a fitted library model: its "
        "lists must not depend on an approximate index the vectors do not suit)",
    )
    hnsw_m: int = Field(32, ge=4)
    ef_construction: int = Field(80, ge=8)
    ef_search: int = Field(128, ge=1)
    mips: Literal["auto", "ip", "l2"] = Field(
        "auto",
        description="HNSW: search raw inner products (ip), or items as [x, sqrt(M^2-|x|^2)] in "
        "an L2 graph (l2, same order); auto: ip, and l2 too when ip misses the recall floor",
    )
    device: Literal["auto", "cpu", "gpu"] = Field(
        "auto", description="auto: the GPU when faiss-gpu and a GPU are present"
    )
    recall_k: int = Field(20, ge=1)
    recall_sample: int = Field(2000, ge=1, description="user vectors used to measure recall")
    recall_floor: float = Field(0.95, ge=0, le=1)
    delays: bool = Field(
        True, description="fit the click->purchase->refund delay models into the bundle"
    )
    rates_horizon_days: float = Field(
        28.0, gt=0, description="days of cascade events the bundle carries for online rates"
    )
    rank_dir: str | None = Field(
        None,
        description="the rank stage's output (ranker.txt, rank.json): the bundle then serves "
        "the two-stage recommender (candidates, features, ranker)",
    )
    seed: int = 0

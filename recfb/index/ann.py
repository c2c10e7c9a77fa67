"""FAISS inner-product indexes: the size rule, GPU at run time, recall against exact search."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import faiss
import numpy as np

from recfb.errors import RecfbError
from recfb.index.config import IndexConfig


def gpu_available() -> bool:
    """faiss-gpu installed (not faiss-cpu, which shares the module name) and a GPU present."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def choose_factory(n_items: int, cfg: IndexConfig, on_gpu: bool) -> tuple[str, str | None]:
    """(factory string, search parameters) by the documented size rule unless configured."""
    if cfg.factory:
        return cfg.factory, cfg.search_params
    if n_items < cfg.exact_below:
        return "Flat", None
    if on_gpu:  # FAISS has no GPU HNSW; IVF is its GPU approximate index
        nlist = max(16, int(4 * math.sqrt(n_items)))
        return f"IVF{nlist},Flat", cfg.search_params or f"nprobe={max(8, nlist // 32)}"
    return f"HNSW{cfg.hnsw_m},Flat", cfg.search_params or f"efSearch={cfg.ef_search}"


@dataclass
class IpIndex:
    """A FAISS index answering maximum-inner-product queries.

    Graph indexes (HNSW) navigate badly on raw inner products when vector norms differ, as
    trained embeddings' do. With `augment` = M (the largest item norm) the items are stored as
    [x, sqrt(M^2 - |x|^2)] in an L2 index and queried as [q, 0]; then
    |q - x'|^2 = |q|^2 + M^2 - 2 q.x, so the L2 order is the inner-product order and the score
    is recovered exactly (the classic MIPS-to-nearest-neighbour reduction)."""

    index: faiss.Index
    augment: float | None = None

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(inner-product scores, item rows), best first; rows are -1 where fewer exist."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if self.augment is None:
            return self.index.search(q, k)
        padded = np.hstack([q, np.zeros((len(q), 1), dtype=np.float32)])
        dist, ids = self.index.search(padded, k)
        q_sq = (q.astype(np.float64) ** 2).sum(1, keepdims=True)
        return ((q_sq + self.augment**2 - dist) / 2).astype(np.float32), ids


def augment_items(vectors: np.ndarray) -> tuple[np.ndarray, float]:
    norms_sq = (vectors.astype(np.float64) ** 2).sum(1)
    m_sq = float(norms_sq.max()) if len(vectors) else 0.0
    extra = np.sqrt(np.maximum(m_sq - norms_sq, 0.0)).astype(np.float32)
    return np.hstack([vectors, extra[:, None]]), float(np.sqrt(m_sq))


@dataclass
class BuiltIndex:
    index: IpIndex  # always a CPU index (what is written to disk)
    factory: str
    search_params: str | None
    build_s: float
    device: str


def build_index(vectors: np.ndarray, cfg: IndexConfig, l2: bool = False) -> BuiltIndex:
    """Train (if needed) and fill an inner-product index over `vectors` (n, d) float32;
    `l2`: an HNSW graph over the augmented vectors (see IpIndex)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    use_gpu = cfg.device == "gpu" or (cfg.device == "auto" and gpu_available())
    if cfg.device == "gpu" and not gpu_available():
        raise RecfbError("index.device=gpu but faiss-gpu or a GPU is missing (install .[gpu])")
    factory, params = choose_factory(len(vectors), cfg, use_gpu)
    started = time.perf_counter()
    augment = None
    if l2 and factory.startswith("HNSW"):
        vectors, augment = augment_items(vectors)
    metric = faiss.METRIC_L2 if augment is not None else faiss.METRIC_INNER_PRODUCT
    try:
        index = faiss.index_factory(vectors.shape[1], factory, metric)
    except RuntimeError as exc:
        raise RecfbError(f"index.factory: FAISS cannot build {factory!r}: {exc}") from exc
    if isinstance(index, faiss.IndexHNSW):
        index.hnsw.efConstruction = cfg.ef_construction
    work = index
    if use_gpu:
        work = faiss.index_cpu_to_all_gpus(index)
    if not work.is_trained:
        rng = np.random.default_rng(cfg.seed)
        sample = vectors[rng.choice(len(vectors), min(len(vectors), 100_000), replace=False)]
        work.train(sample)
    work.add(vectors)
    if use_gpu:
        index = faiss.index_gpu_to_cpu(work)
    apply_search_params(index, params)
    device = "gpu" if use_gpu else "cpu"
    return BuiltIndex(
        IpIndex(index, augment), factory, params, time.perf_counter() - started, device
    )


def build_measured(
    items: np.ndarray, queries: np.ndarray, cfg: IndexConfig
) -> tuple[BuiltIndex, float]:
    """Build by the rule and measure recall@k on `queries` against exact search.

    Which HNSW form navigates better depends on the vectors (raw inner products suit
    clustered vectors of similar norm; the L2 reduction can suit very uneven norms), so with
    `mips: auto` the other form is built too when the first misses the floor, and the better
    one is kept."""
    built = build_index(items, cfg, l2=cfg.mips == "l2")
    recall = recall_at_k(built.index, queries, items, cfg.recall_k)
    if cfg.mips == "auto" and built.factory.startswith("HNSW") and recall < cfg.recall_floor:
        other = build_index(items, cfg, l2=True)
        other_recall = recall_at_k(other.index, queries, items, cfg.recall_k)
        if other_recall > recall:
            return other, other_recall
    return built, recall


def apply_search_params(index: faiss.Index, params: str | None) -> None:
    if params:
        try:
            faiss.ParameterSpace().set_index_parameters(index, params)
        except RuntimeError as exc:
            raise RecfbError(f"index.search_params: {params!r} does not apply: {exc}") from exc


def exact_topk(queries: np.ndarray, items: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k item rows by inner product (the reference the approximate index is held to)."""
    flat = faiss.IndexFlatIP(items.shape[1])
    flat.add(np.ascontiguousarray(items, dtype=np.float32))
    return flat.search(np.ascontiguousarray(queries, dtype=np.float32), k)[1]


def recall_at_k(index: IpIndex, queries: np.ndarray, items: np.ndarray, k: int) -> float:
    """Mean |approx top-k ∩ exact top-k| / k over the queries."""
    k = min(k, len(items))
    truth = exact_topk(queries, items, k)
    got = index.search(queries, k)[1]
    hits = [len(set(a[a >= 0]) & set(b)) for a, b in zip(got, truth, strict=True)]
    return float(np.mean(hits) / k)

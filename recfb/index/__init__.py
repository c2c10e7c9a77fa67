"""Index stage: a run's item vectors -> FAISS index -> a verified, self-contained model bundle."""

from recfb.index.ann import IpIndex, build_index, choose_factory, gpu_available, recall_at_k
from recfb.index.bundle import (
    Bundle,
    BundleError,
    BundleParts,
    BundleResult,
    build_bundle,
    load_bundle,
    verify,
    write_bundle,
)
from recfb.index.config import IndexConfig

__all__ = [
    "Bundle",
    "BundleError",
    "BundleParts",
    "BundleResult",
    "IndexConfig",
    "IpIndex",
    "build_bundle",
    "build_index",
    "choose_factory",
    "gpu_available",
    "load_bundle",
    "recall_at_k",
    "verify",
    "write_bundle",
]

"""Model zoo: embedding recommenders sharing one training loop, plus baselines."""

from recfb.models.base import EmbeddingRecommender
from recfb.models.gnolr import GNOLR
from recfb.models.lightgcn import LightGCN
from recfb.models.mf import MatrixFactorization

MODELS: dict[str, type[EmbeddingRecommender]] = {
    "mf": MatrixFactorization,
    "lightgcn": LightGCN,
    "gnolr": GNOLR,
}

__all__ = ["GNOLR", "MODELS", "EmbeddingRecommender", "LightGCN", "MatrixFactorization"]

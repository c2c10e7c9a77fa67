"""Model zoo: embedding recommenders sharing one training loop, plus baselines.

Families are registered once, in `recfb.models.config.FAMILIES` (config class + model class).
"""

from recfb.models.config import FAMILIES, Family, ModelConfig, family

__all__ = ["FAMILIES", "EmbeddingRecommender", "Family", "ModelConfig", "family"]


def __getattr__(name: str):  # torch is imported only when a model class is asked for
    if name == "EmbeddingRecommender":
        from recfb.models.base import EmbeddingRecommender

        return EmbeddingRecommender
    raise AttributeError(name)

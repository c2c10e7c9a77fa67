"""Reload a trained run from MLflow by id: its config and exported vectors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import torch
import yaml

from recfb import tracking
from recfb.config import apply_overrides, build_model
from recfb.train.config import TrainConfig


@dataclass
class VectorScorer:
    """Inner-product scoring from exported user and item vectors (any embedding family)."""

    user_vectors: torch.Tensor
    item_vectors: torch.Tensor

    @property
    def n_users(self) -> int:
        return self.user_vectors.shape[0]

    @property
    def n_items(self) -> int:
        return self.item_vectors.shape[0]

    @torch.no_grad()
    def score(self, users: torch.Tensor) -> torch.Tensor:
        return self.user_vectors[users] @ self.item_vectors.T


def _vectors(run_id: str, name: str) -> torch.Tensor:
    frame = pl.read_parquet(tracking.download(run_id, f"embeddings/{name}.parquet"))
    matrix = np.stack(frame.sort(frame.columns[0])["vector"].to_numpy())
    return torch.as_tensor(matrix.astype(np.float32))


def load_run(run_id: str, overrides: list[str] | None = None) -> tuple[TrainConfig, VectorScorer]:
    """The run's resolved config (with `key=value` overrides applied, e.g. another exclusion
    rule) and a scorer over its vectors."""
    config = yaml.safe_load(tracking.download(run_id, "config.yaml").read_text())
    apply_overrides(config, overrides)
    cfg = build_model(TrainConfig, config, f"run {run_id}")
    return cfg, VectorScorer(_vectors(run_id, "user_vectors"), _vectors(run_id, "item_vectors"))

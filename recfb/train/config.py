"""Typed training configuration (`conf/models/*.yaml`; every key overridable with --set).

The model section is one family's config (`recfb.models.config`); the rest is how to train
and evaluate it."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from recfb.distributed.config import Engine, RayConfig
from recfb.models.config import (
    DebiasConfig,
    DenoiseConfig,
    EmbeddingSettings,
    MFConfig,
    ModelConfig,
    OptimConfig,
    check_model_keys,
    family,
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrainerConfig(_Strict):
    """Passed to Lightning: DDP or multi-node needs config only (strategy, devices...)."""

    max_epochs: int = Field(20, ge=0)
    batch_size: int = Field(4096, ge=1)
    lr: float = Field(0.005, gt=0)
    optimizer: Literal["adam", "adagrad", "sgd"] = Field(
        "adam",
        description="adam, adagrad or sgd; on sparse embedding tables each updates only the "
        "batch's rows (Adam keeps two state rows per row, Adagrad one, SGD none). With sgd, "
        "`lr` is per example, as implicit's learning_rate (the loss is a batch mean, so a "
        "step moves by lr x batch_size times its gradient): it carries over across batch sizes",
    )
    weight_decay: float = Field(
        0.0, ge=0, description="Adam weight decay; > 0 makes the embedding tables dense"
    )
    sparse_embeddings: bool = Field(
        True,
        description="sparse gradients + a SparseAdam update on embedding tables (a step costs "
        "O(batch), not O(catalogue)); off by itself under DDP strategies and weight decay",
    )
    patience: int = Field(3, ge=1, description="early stopping on the monitored metric")
    monitor: str = Field("ndcg@20", description="validation metric to maximise")
    accelerator: str = "auto"
    devices: int | str = "auto"
    strategy: str = "auto"
    num_nodes: int = 1
    precision: str = "32-true"


class EvalSettings(_Strict):
    """Full-ranking evaluation settings (see recfb.evaluate)."""

    ks: list[int] = Field(default_factory=lambda: [10, 20, 50])
    exclude: Literal["signals", "none", "any", "min_level"] = Field(
        "signals",
        description="which train pairs are masked: `signals` (the signal map's rule: bought "
        "and not refunded plus explicit negatives; levels marked `repeats` stay), `any`, "
        "`min_level` (label >= exclude_min_level), `none`",
    )
    exclude_min_level: int = 1
    relevant_min_level: int = 1
    organic_only: bool = Field(
        False,
        description="evaluate (valid, test, early stopping) only on the held-out pairs users "
        "reached organically: an error when the raw events have no `is_organic` flag "
        "(recfb.etl.exposure.organic_heldout)",
    )
    snips: bool = Field(
        False,
        description="also report test/snips_recall@k: recall with each relevant pair weighted "
        "by 1/theta of its item (self-normalised per user), theta from debias.propensity "
        "(popularity, or the logged exposure) with debias.eta and debias.clip",
    )
    refit: bool = Field(
        False,
        description="before the test, refit on train + valid (embedding models for the "
        "epoch count early stopping chose), as production trains on everything up to now; "
        "on fast-moving catalogues (short video) the valid window holds most test items",
    )


class TrainConfig(_Strict):
    """Everything one training run needs."""

    data: str = Field("data/etl", description="ETL output directory")
    train_min_label: int = Field(1, description="train pairs with label >= this are positives")
    recency_half_life_days: float | None = Field(
        None,
        gt=0,
        description="weight each train pair by 0.5^(age / half-life), age = the newest train "
        "time - the pair's last event (embedding models' loss weights; the popularity "
        "baseline then counts decayed weights: trending). Off by default",
    )
    model: ModelConfig = Field(
        default_factory=MFConfig, description="the model family and its own keys"
    )
    denoise: DenoiseConfig = Field(default_factory=DenoiseConfig)
    debias: DebiasConfig = Field(default_factory=DebiasConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    seed: int = 0
    init_from_run: str | None = Field(
        None,
        description="warm start (MF without item features): copy the user and item vectors "
        "of this MLflow run for every id it knows; new users and items start fresh",
    )
    experiment: str = "recfb"
    run_name: str | None = None
    engine: Engine = Field(
        "local",
        description="local (this process) or ray (Lightning's DDP over Ray Train workers, "
        "`ray.workers` of them, each stepping on its share of every batch)",
    )
    ray: RayConfig = Field(default_factory=RayConfig, description="the cluster of engine: ray")
    checkpoint_dir: str | None = Field(
        None,
        description="keep local checkpoints here; default: a temp dir (the best one is "
        "logged to the MLflow run either way)",
    )

    @field_validator("model", mode="before")
    @classmethod
    def _family_keys(cls, value: object) -> object:
        return check_model_keys(value)

    @property
    def kind(self) -> str:
        """`embedding` (trained by the loop) or `baseline` (fitted)."""
        return family(self.model.family).kind

    def embedding_settings(self) -> EmbeddingSettings:
        """What an embedding model is built from: its family's keys, denoising, debiasing
        and the optimiser (models never see the rest of the training config)."""
        t = self.trainer
        return EmbeddingSettings(
            model=self.model,
            denoise=self.denoise,
            debias=self.debias,
            optim=OptimConfig(
                lr=t.lr * t.batch_size if t.optimizer == "sgd" else t.lr,
                optimizer=t.optimizer,
                weight_decay=t.weight_decay,
                sparse_embeddings=t.sparse_embeddings,
                distributed="ddp" in str(t.strategy),
                step_batch=t.batch_size,
            ),
        )

    @model_validator(mode="after")
    def _monitor_is_measured(self) -> TrainConfig:
        """Early stopping needs its metric: `ndcg@20` only exists when 20 is in eval.ks."""
        name, _, cut = self.trainer.monitor.partition("@")
        if cut and cut.split("/")[0].isdigit() and int(cut.split("/")[0]) not in self.eval.ks:
            raise ValueError(
                f"trainer.monitor={self.trainer.monitor!r} needs {cut.split('/')[0]} in "
                f"eval.ks (got {list(self.eval.ks)})"
            )
        return self


__all__ = [
    "DebiasConfig",
    "DenoiseConfig",
    "EvalSettings",
    "ModelConfig",
    "TrainConfig",
    "TrainerConfig",
]

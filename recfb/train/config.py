"""Typed training configuration (`conf/models/*.yaml`; every key overridable with --set)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Strict):
    """Which model family and its shape."""

    family: Literal[
        "mf", "lightgcn", "gnolr", "popularity", "itemknn", "als", "bpr_implicit", "cascade"
    ] = Field(
        "mf",
        description="a model of recfb.models or a baseline fitted in the same harness "
        "(cascade: the training-free cascaded multi-behaviour walk)",
    )
    dim: int = Field(64, ge=2, description="embedding size (GNOLR: per level)")
    loss: Literal["bpr", "softmax", "bce"] = Field(
        "bpr", description="bpr pairwise; softmax = in-batch + uniform negatives with log-q; bce"
    )
    item_features: list[str] = Field(
        default_factory=list,
        description="MF: categorical item columns the ETL passes (e.g. [category]); each adds an "
        "embedding to the item tower, so rare items share what their category learned",
    )
    n_negatives: int = Field(4, ge=1, description="uniform negatives per positive")
    hard_negative_prob: float = Field(
        0.5, ge=0, le=1, description="chance a user's explicit negative replaces a sampled one"
    )
    temperature: float = Field(0.1, gt=0, description="softmax loss temperature")
    layers: int = Field(
        1,
        ge=1,
        description="LightGCN propagation layers (1 measured best on the sparse temporal "
        "splits of MovieLens and Taobao; 3 over-smooths there)",
    )
    edge_min_label: int = Field(1, description="LightGCN: train pairs with label >= this are edges")
    edge_weight_by_level: bool = Field(False, description="LightGCN: weight edges by level")
    scale_init: float = Field(5.0, gt=0, description="GNOLR: initial per-level logit scale s_t")
    ordinal_negatives: Literal["first_level", "all_levels"] = Field(
        "all_levels",
        description="GNOLR: a level-0 pair's NLL constrains z_1 only (first_level), or every "
        "cumulative logit z_t (all_levels: keeps unseen items below engaged ones on z_T)",
    )
    level_towers: Literal["separate", "shared"] = Field(
        "separate",
        description="GNOLR: one embedding per id and level (separate; measured better on "
        "MovieLens and Taobao), or T identity-initialised linear heads over one shared "
        "embedding per id (shared)",
    )
    censor_immature: bool = Field(
        True,
        description="GNOLR: a pair whose label has not matured (it may still go deeper, e.g. a "
        "recent view) contributes -log P(label >= y), not -log P(label = y)",
    )
    bias_prior: float = Field(
        0.0, ge=0, description="GNOLR: item biases start at this x centred log-popularity"
    )
    serve_level: int | None = Field(
        None,
        ge=1,
        description="GNOLR: the exported vectors rank by P(label >= this level) (default: the "
        "deepest); the deeper levels' query columns are zeroed, so one index still serves it",
    )


class DenoiseConfig(_Strict):
    """PLD resampling or truncated loss; both switchable on any model."""

    method: Literal["none", "pld", "tce"] = "none"
    warmup_epochs: int = Field(
        5,
        ge=0,
        description="plain epochs before PLD resamples or T-CE starts dropping (5 measured "
        "better than 1-2 for both: losses mean little before the model has learnt)",
    )
    pool: int = Field(5, ge=2, description="PLD: positives drawn per user for resampling")
    tau: float = Field(0.1, gt=0, description="PLD: softmax temperature over -loss")
    max_drop: float = Field(0.2, ge=0, lt=1, description="T-CE: final share of positives dropped")
    ramp_epochs: int = Field(5, ge=1, description="T-CE: epochs after warm-up to reach max_drop")


class DebiasConfig(_Strict):
    """Inverse-propensity weighting for missing-not-at-random feedback (Rel-MF)."""

    ips: bool = False
    eta: float = Field(0.5, gt=0, description="propensity theta_i = (pop_i / max pop)^eta")
    clip: float = Field(
        0.5, gt=0, le=1, description="lower bound on theta (0.5 measured better than 0.2)"
    )
    nonnegative: bool = Field(
        False,
        description="BCE: clamp the weight (1 - y/theta) of l(s,0) at 0, so a rare positive's "
        "loss stays bounded below (else its score is pushed up without limit)",
    )


class TrainerConfig(_Strict):
    """Passed to Lightning: DDP or multi-node needs config only (strategy, devices...)."""

    max_epochs: int = Field(20, ge=0)
    batch_size: int = Field(4096, ge=1)
    lr: float = Field(0.005, gt=0)
    weight_decay: float = Field(
        0.0, ge=0, description="Adam weight decay; > 0 makes the embedding tables dense"
    )
    sparse_embeddings: bool = Field(
        True,
        description="sparse gradients + SparseAdam on embedding tables (a step then costs "
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
    model: ModelConfig = Field(default_factory=ModelConfig)
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
    checkpoint_dir: str | None = Field(
        None,
        description="keep local checkpoints here; default: a temp dir (the best one is "
        "logged to the MLflow run either way)",
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

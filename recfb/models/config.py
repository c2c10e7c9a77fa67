"""Per-family model configuration, and the one registry of model families.

Each family declares only its own keys; `ModelConfig` is their union, told apart by `family`
(a key that belongs to another family is an error that names that family). The registry maps
a family name to its config class and, lazily, to the class that fits it, so that reading a
config never imports torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- embedding families (trained by recfb.models.base's loop) ------------------------------
class _Embedding(_Strict):
    dim: int = Field(64, ge=2, description="embedding size (GNOLR: per level)")
    loss: Literal["bpr", "softmax", "bce"] = Field(
        "bpr", description="bpr pairwise; softmax = in-batch + uniform negatives with log-q; bce"
    )
    n_negatives: int = Field(4, ge=1, description="uniform negatives per positive")
    hard_negative_prob: float = Field(
        0.5, ge=0, le=1, description="chance a user's explicit negative replaces a sampled one"
    )
    temperature: float = Field(0.1, gt=0, description="softmax loss temperature")


class MFConfig(_Embedding):
    """Matrix factorisation (a two-tower model with id towers)."""

    family: Literal["mf"] = "mf"
    item_features: list[str] = Field(
        default_factory=list,
        description="categorical item columns the ETL passes (e.g. [category]); each adds an "
        "embedding to the item tower, so rare items share what their category learned",
    )


class LightGCNConfig(_Embedding):
    """LightGCN over the user-item graph (torch-geometric's LGConv)."""

    family: Literal["lightgcn"] = "lightgcn"
    layers: int = Field(
        1,
        ge=1,
        description="propagation layers (1 measured best on the sparse temporal splits of "
        "MovieLens and Taobao; 3 over-smooths there)",
    )
    edge_min_label: int = Field(1, description="train pairs with label >= this are edges")
    edge_weight_by_level: bool = Field(False, description="weight edges by level")
    propagation: Literal["full", "topm"] = Field(
        "full",
        description="full: every step propagates the whole graph; topm: mean_k A^k is "
        "computed once at fit start, pruned to each node's `topm` largest weights (plus the "
        "node), so a step propagates only its batch's distinct nodes",
    )
    topm: int = Field(
        8,
        ge=1,
        description="neighbours kept per node when propagation=topm (8 matched full on valid "
        "MovieLens and Taobao; 16 and 32 lost on Taobao: benchmarks/results/lightgcn_modes.md)",
    )


class GNOLRConfig(_Embedding):
    """GNOLR: ordinal logistic regression over nested per-level sub-vectors."""

    family: Literal["gnolr"] = "gnolr"
    scale_init: float = Field(5.0, gt=0, description="initial per-level logit scale s_t")
    ordinal_negatives: Literal["first_level", "all_levels"] = Field(
        "all_levels",
        description="a level-0 pair's NLL constrains z_1 only (first_level), or every "
        "cumulative logit z_t (all_levels: keeps unseen items below engaged ones on z_T)",
    )
    level_towers: Literal["separate", "shared"] = Field(
        "separate",
        description="one embedding per id and level (separate; measured better on MovieLens "
        "and Taobao), or T identity-initialised linear heads over one shared embedding",
    )
    censor_immature: bool = Field(
        True,
        description="a pair whose label has not matured (it may still go deeper, e.g. a "
        "recent view) contributes -log P(label >= y), not -log P(label = y)",
    )
    bias_prior: float = Field(
        0.0, ge=0, description="item biases start at this x centred log-popularity"
    )
    serve_level: int | None = Field(
        None,
        ge=1,
        description="the exported vectors rank by P(label >= this level) (default: the "
        "deepest); the deeper levels' query columns are zeroed, so one index still serves it",
    )


# --- baselines (fitted, not trained by the loop) -------------------------------------------
class PopularityConfig(_Strict):
    """Most engaged items (trending when the run sets recency_half_life_days)."""

    family: Literal["popularity"] = "popularity"


class ItemKNNConfig(_Strict):
    """Item-item cosine neighbours of the user's positives."""

    family: Literal["itemknn"] = "itemknn"
    k: int = Field(100, ge=1, description="neighbours kept per item")
    shrink: float = Field(10.0, ge=0, description="cosine shrinkage for rarely co-seen items")


class ALSConfig(_Strict):
    """implicit's ALS (confidence-weighted least squares)."""

    family: Literal["als"] = "als"
    dim: int = Field(64, ge=2, description="factors")
    regularization: float = Field(0.01, ge=0)
    iterations: int = Field(15, ge=1)
    alpha: float = Field(10.0, gt=0, description="confidence = 1 + alpha * weight")


class BPRImplicitConfig(_Strict):
    """implicit's BPR (a reference for recfb's own MF-BPR)."""

    family: Literal["bpr_implicit"] = "bpr_implicit"
    dim: int = Field(64, ge=2, description="factors")
    learning_rate: float = Field(0.01, gt=0)
    regularization: float = Field(0.01, ge=0)
    iterations: int = Field(100, ge=1)


class CascadeFamilyConfig(_Strict):
    """The training-free cascaded multi-behaviour walk (CascadingRank)."""

    family: Literal["cascade"] = "cascade"
    alpha: float = Field(0.0, ge=0, lt=1, description="restart weight a")
    beta: float = Field(0.9, ge=0, lt=1, description="pull toward the previous level b")
    tol: float = Field(1e-4, gt=0)
    max_iter: int = Field(50, ge=1)


EMBEDDING_CONFIGS = (MFConfig, LightGCNConfig, GNOLRConfig)
ModelConfig = Annotated[
    Annotated[MFConfig, Tag("mf")]
    | Annotated[LightGCNConfig, Tag("lightgcn")]
    | Annotated[GNOLRConfig, Tag("gnolr")]
    | Annotated[PopularityConfig, Tag("popularity")]
    | Annotated[ItemKNNConfig, Tag("itemknn")]
    | Annotated[ALSConfig, Tag("als")]
    | Annotated[BPRImplicitConfig, Tag("bpr_implicit")]
    | Annotated[CascadeFamilyConfig, Tag("cascade")],
    Discriminator(lambda v: v.get("family", "mf") if isinstance(v, dict) else v.family),
]


# --- what an embedding model needs besides its family's keys -------------------------------
class DenoiseConfig(_Strict):
    """PLD resampling or truncated loss; both switchable on any embedding model."""

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
    propensity: Literal["popularity", "exposure"] = Field(
        "popularity",
        description="what theta_i is computed from: `popularity` (train positives per item, "
        "the proxy) or `exposure` (the logged recommender impressions per item in the train "
        "window: the ETL's n_impressions where the log has is_organic, else impression "
        "signals); same eta and clip either way",
    )
    eta: float = Field(
        0.5, gt=0, description="propensity theta_i = (count_i / max count)^eta, count as chosen"
    )
    clip: float = Field(
        0.5, gt=0, le=1, description="lower bound on theta (0.5 measured better than 0.2)"
    )
    nonnegative: bool = Field(
        False,
        description="BCE: clamp the weight (1 - y/theta) of l(s,0) at 0, so a rare positive's "
        "loss stays bounded below (else its score is pushed up without limit)",
    )


class OptimConfig(_Strict):
    """The optimiser settings a model sets up itself (it optimises manually)."""

    lr: float = Field(0.005, gt=0)
    optimizer: Literal["adam", "adagrad", "sgd"] = "adam"
    weight_decay: float = Field(0.0, ge=0)
    sparse_embeddings: bool = True
    distributed: bool = Field(False, description="a DDP strategy: no sparse gradients")
    step_batch: int | None = Field(
        None,
        ge=1,
        description="positions per optimiser step when a loader batch holds several steps' "
        "(the training loop's batch_size); None: one step per loader batch",
    )


class EmbeddingSettings(_Strict):
    """Everything an embedding model is built from (what the training loop hands it)."""

    model: Annotated[MFConfig | LightGCNConfig | GNOLRConfig, Field(discriminator="family")] = (
        Field(default_factory=MFConfig)
    )
    denoise: DenoiseConfig = Field(default_factory=DenoiseConfig)
    debias: DebiasConfig = Field(default_factory=DebiasConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)


# --- the registry --------------------------------------------------------------------------
@dataclass(frozen=True)
class Family:
    """A model family: its config class, how it is fitted, and where its class lives."""

    name: str
    config: type[BaseModel]
    kind: Literal["embedding", "baseline"]
    target: str  # "module:Class", imported only when the family is fitted

    def load_class(self) -> Any:
        module, _, name = self.target.partition(":")
        return getattr(importlib.import_module(module), name)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("mf", MFConfig, "embedding", "recfb.models.mf:MatrixFactorization"),
        Family("lightgcn", LightGCNConfig, "embedding", "recfb.models.lightgcn:LightGCN"),
        Family("gnolr", GNOLRConfig, "embedding", "recfb.models.gnolr:GNOLR"),
        Family("popularity", PopularityConfig, "baseline", "recfb.models.baselines:Popularity"),
        Family("itemknn", ItemKNNConfig, "baseline", "recfb.models.baselines:ItemKNN"),
        Family("als", ALSConfig, "baseline", "recfb.models.baselines:ImplicitALS"),
        Family("bpr_implicit", BPRImplicitConfig, "baseline", "recfb.models.baselines:ImplicitBPR"),
        Family("cascade", CascadeFamilyConfig, "baseline", "recfb.models.cascade:CascadeRank"),
    )
}


def family(name: str) -> Family:
    """The registered family `name`, or an error listing the known ones."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {sorted(FAMILIES)}") from None


def owner_of(key: str, this: str) -> list[str]:
    """Families other than `this` that declare `key` (for a helpful error)."""
    return [n for n, f in FAMILIES.items() if n != this and key in f.config.model_fields]


def check_model_keys(data: Any) -> Any:
    """Before validation: a key of another family is an error naming that family."""
    if not isinstance(data, dict):
        return data
    name = data.get("family", "mf")
    if name not in FAMILIES:
        raise ValueError(f"model.family={name!r} is not a known family: {sorted(FAMILIES)}")
    own = FAMILIES[name].config.model_fields
    for key in data:
        if key not in own:
            others = owner_of(key, name)
            where = f"it belongs to {', '.join(others)}" if others else "no family has it"
            raise ValueError(f"model.{key} is not a key of family {name!r} ({where})")
    return data

"""`recfb train`: fit a model on an ETL output, evaluate it, record everything in MLflow."""

from __future__ import annotations

import tempfile
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import polars as pl
import torch
import yaml

from recfb import tracking
from recfb.evaluate import full_ranking_metrics, level_auc
from recfb.models import EmbeddingRecommender
from recfb.models.config import family
from recfb.models.gnolr import GNOLR
from recfb.train.config import TrainConfig
from recfb.train.data import Interactions, recency_weighted
from recfb.train.fallback import PopularityFallback, warm_users
from recfb.train.fit import (
    build_model,
    early_stopping,
    eval_config,
    evaluate_scorer,
    finish_fit,
    heldout_of,
    lightning_quiet,
    lightning_trainer,
    train_loader,
    warm_start,
)


def snips_metrics(
    scorer: Any, data: Interactions, heldout: pl.DataFrame, cfg: TrainConfig
) -> dict[str, float]:
    """`recfb.evaluate.ips.snips_recall` of the served scorer (popularity fallback included),
    propensities from the train window as `debias` says (the logged exposure or popularity)."""
    from recfb.evaluate.ips import propensities, snips_recall

    d = cfg.debias
    counts = data.item_exposure() if d.propensity == "exposure" else data.item_popularity()
    served = PopularityFallback.from_train(scorer, data.train, data.n_users, data.n_items)
    theta = propensities(counts, d.eta, d.clip)
    out = snips_recall(
        served.score, data.n_items, heldout, data.train, theta, eval_config(cfg, data)
    )
    return {k: v for k, v in out.items() if k != "n_users"}


def gnolr_level_auc(
    model: GNOLR, heldout: pl.DataFrame, levels: dict[int, str]
) -> dict[str, float]:
    """AUC of z_t separating held-out pairs with label >= t from the rest, per level."""
    if heldout.height == 0:
        return {}
    users = torch.as_tensor(heldout["user_idx"].to_numpy().astype(np.int64))
    items = torch.as_tensor(heldout["item_idx"].to_numpy().astype(np.int64))
    z = model.level_scores(users, items).cpu().numpy()
    labels = heldout["label"].to_numpy()
    out = {}
    for t, name in levels.items():
        auc = level_auc(z[:, t - 1], labels, [t])
        if t in auc:
            out[f"auc/{name}"] = float(auc[t])
    return out


def _fit_baseline(cfg: TrainConfig, data: Interactions) -> Any:
    return fit_baseline(cfg, data.train, data.n_users, data.n_items, data.n_levels)


def fit_baseline(
    cfg: TrainConfig, train: pl.DataFrame, n_users: int, n_items: int, n_levels: int
) -> Any:
    """A baseline built from its family's config keys and fitted on the train pairs."""
    params: dict[str, Any] = cfg.model.model_dump(exclude={"family"})
    params["min_label"] = cfg.train_min_label
    if "dim" in params:  # implicit's factor models call it `factors`
        params["factors"] = params.pop("dim")
    if cfg.model.family == "cascade":
        params["n_levels"] = n_levels
    if cfg.model.family == "popularity" and cfg.recency_half_life_days:
        params["use_weights"] = True  # trending: decayed weights, not all-time counts
    if cfg.model.family in ("als", "bpr_implicit"):
        params["seed"] = cfg.seed
    train = recency_weighted(train, cfg.recency_half_life_days)
    model = family(cfg.model.family).load_class()(**params)
    return model.fit(train, n_users, n_items)


@dataclass
class Fitted:
    """A fitted model with its evaluation and the pairs it was fitted on (train, or train +
    valid after a refit: what its exclusions and popularity fallback use)."""

    model: Any
    data: Interactions
    metrics: dict[str, float]
    history: list[dict[str, float]]
    run_id: str | None = None


def fit_model(
    cfg: TrainConfig, data: Interactions, *, quiet: bool = True, tracker: Any = None
) -> Fitted:
    """Train (or fit a baseline) and evaluate on valid and test. With a `tracker`
    (`recfb.tracking.MlflowTracker`) everything is recorded in one run; without one nothing
    touches MLflow."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    tags = {
        "model_family": cfg.model.family,
        "data_fingerprint": data.fingerprint(),
        "data": str(data.directory or "memory"),
    }
    # what the evaluation needs from the data fails before training, not after
    heldout_of(data, "test", cfg)
    if cfg.eval.snips and cfg.debias.propensity == "exposure":
        data.item_exposure()
    with tracker.run(tags) if tracker is not None else nullcontext(None) as run_id:
        tracking.log_params(cfg.model_dump(mode="json"))
        tracking.log_text(yaml.safe_dump(cfg.model_dump(mode="json")), "config.yaml")
        tracking.log_json(data.stats, "dataset_stats.json")
        if cfg.kind == "baseline":
            model: Any = _fit_baseline(cfg, data)
            history: list[dict[str, float]] = []
        else:
            model, history = _fit_embedding(cfg, data, quiet)
        valid = evaluate_scorer(model, data, heldout_of(data, "valid", cfg), cfg)
        metrics = {f"valid/{k}": v for k, v in valid.items()}
        if cfg.eval.refit and data.valid.height:
            model, data, epochs = _refit(cfg, data, history, quiet)
            metrics["refit_epochs"] = float(epochs)
        test = heldout_of(data, "test", cfg)
        metrics |= {f"test/{k}": v for k, v in evaluate_scorer(model, data, test, cfg).items()}
        # the same test on the users the model has a taste for (no popularity fallback)
        warm_test = test.filter(pl.col("user_idx").is_in(warm_users(data.train).implode()))
        if warm_test.height:
            warm = full_ranking_metrics(
                model.score,
                data.n_items,
                warm_test,
                data.train,
                data.level_names,
                eval_config(cfg, data),
            )
            metrics |= {f"test/warm/{k}": v for k, v in warm.items() if "/" not in k}
        if cfg.eval.snips and test.height:
            metrics |= {f"test/{k}": v for k, v in snips_metrics(model, data, test, cfg).items()}
        if isinstance(model, GNOLR):
            metrics |= {
                f"test/{k}": v for k, v in gnolr_level_auc(model, test, data.level_names).items()
            }
        tracking.log_metrics(metrics)
        if isinstance(model, EmbeddingRecommender):
            _log_model_artifacts(model, data, cfg, history, metrics)
    return Fitted(model=model, data=data, metrics=metrics, history=history, run_id=run_id)


def fit_baseline_pairs(
    cfg: TrainConfig, pairs: pl.DataFrame, n_users: int, n_items: int, signals: dict
) -> Any:
    """A training-free baseline refitted from its saved pairs (`recfb.Recommender.load`)."""
    return fit_baseline(cfg, pairs, n_users, n_items, len(signals["levels"]))


def fitted_data(cfg: TrainConfig) -> Interactions:
    """The pairs a run's final model was fitted on: train, or train + valid after a refit
    (what its exclusions and popularity fallback must use)."""
    data = Interactions.load(cfg.data)
    return data.with_valid_in_train() if cfg.eval.refit else data


def _refit(
    cfg: TrainConfig, data: Interactions, history: list[dict[str, float]], quiet: bool
) -> tuple[Any, Interactions, int]:
    """The same model refitted on train + valid: baselines as they are, embedding models for
    the epoch count of the best validation epoch (seed unchanged). Returns it with the data
    it saw (so the test masks and falls back on everything before the test window) and the
    epochs it trained."""
    merged = data.with_valid_in_train()
    if cfg.kind == "baseline":
        return _fit_baseline(cfg, merged), merged, 0
    monitor = f"valid/{cfg.trainer.monitor}"
    scored = [row for row in history if monitor in row]
    best = max(scored, key=lambda row: row[monitor]) if scored else None
    epochs = int(best["epoch"]) + 1 if best else cfg.trainer.max_epochs
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    refit_cfg = cfg.model_copy(
        update={"trainer": cfg.trainer.model_copy(update={"max_epochs": epochs})}
    )
    model, _ = _fit_embedding(refit_cfg, merged, quiet, log_history=False)
    with tempfile.TemporaryDirectory() as tmp:  # beside the pre-refit best checkpoint
        path = Path(tmp) / "refit.ckpt"
        torch.save({"state_dict": model.state_dict(), "epochs": epochs}, path)
        tracking.log_file(path, "checkpoint")
    return model, merged, epochs


def _fit_embedding(
    cfg: TrainConfig, data: Interactions, quiet: bool, log_history: bool = True
) -> tuple[EmbeddingRecommender, list[dict[str, float]]]:
    if cfg.engine == "ray":
        from recfb.train.on_ray import fit_on_ray

        return fit_on_ray(cfg, data, quiet, log_history)
    model = build_model(cfg, data)
    if cfg.init_from_run:
        warm_start(model, cfg, data)
    callbacks, checkpoint = early_stopping(model, cfg, data)
    t = cfg.trainer
    with lightning_quiet(quiet):
        trainer = lightning_trainer(cfg, callbacks, checkpoint, quiet)
        if t.max_epochs > 0:
            trainer.fit(model, train_loader(model, cfg))
    return finish_fit(model, cfg, checkpoint, log_history)


def _log_model_artifacts(
    model: EmbeddingRecommender,
    data: Interactions,
    cfg: TrainConfig,
    history: list[dict[str, float]],
    metrics: dict[str, float],
) -> None:
    from recfb.tracking import plots

    users, items = (t.cpu().numpy().astype(np.float32) for t in model.vectors())
    tracking.log_frame(
        pl.DataFrame({"user_idx": np.arange(len(users), dtype=np.uint32), "vector": users}),
        "user_vectors.parquet",
        "embeddings",
    )
    tracking.log_frame(
        pl.DataFrame({"item_idx": np.arange(len(items), dtype=np.uint32), "vector": items}),
        "item_vectors.parquet",
        "embeddings",
    )
    if history:
        tracking.log_figure(
            plots.learning_curves(history, cfg.trainer.monitor), "learning_curves.png"
        )
    k = cfg.eval.ks[0]
    test_metrics = {k_[5:]: v for k_, v in metrics.items() if k_.startswith("test/")}
    tracking.log_figure(
        plots.metrics_by_level(test_metrics, list(data.level_names.values()), k),
        "metrics_by_level.png",
    )

"""`recfb evaluate`: re-evaluate a trained run's vectors, logged as a new MLflow run."""

from __future__ import annotations

from recfb import tracking
from recfb.errors import ConfigError
from recfb.train.fit import evaluate_scorer, heldout_of
from recfb.train.loop import fitted_data
from recfb.train.runs import load_run


def evaluate_run(run_id: str, split: str, overrides: list[str]) -> tuple[str, dict[str, float]]:
    if split not in ("valid", "test"):
        raise ConfigError(f"--split: expected valid or test, got '{split}'")
    cfg, scorer = load_run(run_id, overrides)
    if cfg.eval.refit and split == "valid":
        raise ConfigError(f"run {run_id} was refitted on valid (eval.refit); evaluate it on test")
    data = fitted_data(cfg)
    metrics = evaluate_scorer(scorer, data, heldout_of(data, split, cfg), cfg)
    tags = {
        "model_family": cfg.model.family,
        "source_run_id": run_id,
        "data_fingerprint": data.fingerprint(),
        "stage": "evaluate",
    }
    with tracking.run(cfg.experiment, f"evaluate-{run_id[:8]}", tags) as new_run:
        tracking.log_params(cfg.model_dump(mode="json"))
        tracking.log_metrics(metrics, prefix=f"{split}/")
    return new_run, {f"{split}/{k}": v for k, v in metrics.items()}

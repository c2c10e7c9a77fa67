"""MLflow as the system of record: one place for the store, params, metrics and artifacts.

The embedded default is a SQLite store in the working directory (`sqlite:///mlruns.db`,
artifacts under `./mlruns/`); `MLFLOW_TRACKING_URI` points the same code at a server.

Tracking is optional: the `log_*` functions record into the active run and do nothing when
there is none, so a model fitted without a tracker never touches MLflow. `MlflowTracker` is
what a caller passes to record a fit (`Recommender.fit(data, tracker=...)`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import polars as pl

DEFAULT_URI = "sqlite:///mlruns.db"
_BAD_KEY = re.compile(r"[^\w\-./ :]")


# experiments are created as model-training experiments: `mlflow ui` opens on their runs and
# plots, not on the GenAI traces page
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def configure() -> str:
    """Point mlflow at MLFLOW_TRACKING_URI or the embedded SQLite store; returns the URI."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_URI)
    mlflow.set_tracking_uri(uri)
    return uri


def metric_key(name: str) -> str:
    """MLflow accepts letters, digits, _ - . / space and colon: `ndcg@10` -> `ndcg_at_10`."""
    return _BAD_KEY.sub("_", name.replace("@", "_at_"))


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"model.dim": "64", ...} for mlflow params."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= flatten(value, f"{name}.")
        else:
            out[name] = json.dumps(value) if isinstance(value, list | tuple) else str(value)
    return out


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


@contextmanager
def run(experiment: str, run_name: str | None, tags: dict[str, str]) -> Iterator[str]:
    """Start an MLflow run (yields its id); tags always include the git commit."""
    configure()
    set_experiment(experiment)
    commit = git_commit()
    all_tags = tags | ({"git_commit": commit} if commit else {})
    with mlflow.start_run(run_name=run_name, tags=all_tags) as active:
        yield active.info.run_id


def set_experiment(name: str) -> None:
    """Make `name` the active experiment, created as a model-training experiment."""
    client = mlflow.MlflowClient()
    existing = client.get_experiment_by_name(name)
    if existing is None:
        client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    elif existing.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        client.set_experiment_tag(existing.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    mlflow.set_experiment(name)


class MlflowTracker:
    """Records a fit as one MLflow run (params, metrics, plots, the model as an MLflow
    model). `tracking_uri` defaults to MLFLOW_TRACKING_URI or the embedded SQLite store."""

    def __init__(
        self,
        experiment: str = "recfb",
        run_name: str | None = None,
        tracking_uri: str | None = None,
        registered_model_name: str | None = None,
    ) -> None:
        self.experiment, self.run_name = experiment, run_name
        self.tracking_uri = tracking_uri
        self.registered_model_name = registered_model_name
        self.model_uri: str | None = None

    def run(self, tags: dict[str, str]) -> Any:
        if self.tracking_uri:
            os.environ["MLFLOW_TRACKING_URI"] = self.tracking_uri
        return run(self.experiment, self.run_name, tags)

    def log_model(self, model: Any, run_id: str) -> str:
        """Log the fitted model's bundle to the run as a pyfunc model; returns its URI."""
        from recfb.tracking.pyfunc import log_recommender

        configure()
        with mlflow.start_run(run_id=run_id):
            info = log_recommender(model, self.registered_model_name)
        self.model_uri = info.model_uri
        return info.model_uri


def active() -> bool:
    """Whether an MLflow run is active (the log functions record only into one)."""
    return mlflow.active_run() is not None


def log_params(config: dict[str, Any]) -> None:
    if not active():
        return
    params = flatten(config)
    items = list(params.items())
    for start in range(0, len(items), 100):  # the API takes at most 100 params per call
        mlflow.log_params(dict(items[start : start + 100]))


def log_metrics(metrics: dict[str, float], step: int | None = None, prefix: str = "") -> None:
    if not active():
        return
    clean = {
        metric_key(f"{prefix}{k}"): float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float) and v == v  # drop NaN
    }
    if clean:
        mlflow.log_metrics(clean, step=step)


def log_json(data: Any, name: str) -> None:
    if not active():
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(json.dumps(data, indent=2, default=str))
        mlflow.log_artifact(str(path))


def log_text(text: str, name: str) -> None:
    if not active():
        return
    mlflow.log_text(text, name)


def log_frame(frame: pl.DataFrame, name: str, artifact_path: str | None = None) -> None:
    if not active():
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        frame.write_parquet(path)
        mlflow.log_artifact(str(path), artifact_path=artifact_path)


def log_file(path: str | Path, artifact_path: str | None = None) -> None:
    if not active():
        return
    mlflow.log_artifact(str(path), artifact_path=artifact_path)


def log_figure(figure: Any, name: str) -> None:
    """Log a matplotlib figure as a PNG artifact, then close it (pyplot keeps it otherwise)."""
    import matplotlib.pyplot as plt

    if active():
        mlflow.log_figure(figure, name)
    plt.close(figure)


def download(run_id: str, artifact: str) -> Path:
    """A run's artifact as a local path (downloaded when the store is remote)."""
    configure()
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact))

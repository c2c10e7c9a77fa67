"""The MLflow model flavour of a fitted recfb model: a pyfunc whose artifact is the bundle.

    model = mlflow.pyfunc.load_model("models:/recfb@production")
    model.predict(pd.DataFrame({"user_id": ["u1", "u2"]}), params={"k": 10})

`predict` returns the recommendations frame (`user_id, rank, item_id, score`) of
`recfb.Recommender.recommend`. The bundle inside the model (`artifacts/<bundle name>/`) is what
`recfb serve --bundle models:/NAME@ALIAS` downloads, verifies and serves.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
from mlflow.models import ModelSignature
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

BUNDLE_ARTIFACT = "bundle"
MODEL_NAME = "model"  # the logged model's name inside its run (`runs:/<id>/model`)

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "user_id")]),
    outputs=Schema(
        [
            ColSpec("string", "user_id"),
            ColSpec("integer", "rank"),
            ColSpec("string", "item_id"),
            ColSpec("double", "score"),
        ]
    ),
    params=ParamSchema([ParamSpec("k", "long", 10)]),
)


Loader = Callable[[str], Any]  # bundle directory -> a model with `recommend(users, k)`


class RecommenderModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: loads the bundle with the loader it was logged with.

    The loader (`recfb.Recommender.load`) is handed in by whoever logs the model and is
    pickled by reference, so this module, which the low-level tracking code uses, never
    imports the recommender that sits above it."""

    def __init__(self, load: Loader) -> None:
        self.load = load

    def load_context(self, context: Any) -> None:
        load = getattr(self, "load", None)
        if load is None:  # an instance pickled before the loader was stored in it
            raise RuntimeError(
                "recfb pyfunc model: logged by an older recfb without its loader; load it "
                "with the recfb version its requirements pin, or serve its bundle with "
                "`recfb serve --bundle models:/NAME@ALIAS`"
            )
        self.model = load(context.artifacts[BUNDLE_ARTIFACT])

    def predict(self, context, model_input, params=None):  # noqa: ANN001 (mlflow reads hints)
        if hasattr(model_input, "columns"):
            if "user_id" not in model_input.columns:
                raise ValueError("recfb model input: a frame with a `user_id` column")
            column = list(model_input["user_id"])
        else:
            column = list(model_input)
        users = []  # a dict of lists arrives as one row holding the list
        for value in column:
            many = isinstance(value, list | tuple) or hasattr(value, "tolist")
            users += [str(u) for u in (list(value) if many else [value])]
        k = int((params or {}).get("k", 10))
        return self.model.recommend(users, k).to_pandas()


def log_recommender(model: Any, registered_model_name: str | None = None) -> Any:
    """Log a fitted `recfb.Recommender`'s bundle into the active run as an MLflow model,
    loaded back by the model's own `load`; returns the ModelInfo."""
    return _log(model.path, model.load, registered_model_name)


def log_bundle(path: str | Path, run_id: str, load: Loader) -> str:
    """Log a published bundle directory as an MLflow model of run `run_id`, loaded back by
    `load` (`recfb.Recommender.load`); returns the model URI (`models:/m-<id>`), what a
    registry version's source names."""
    from recfb.tracking import configure

    configure()
    with mlflow.start_run(run_id=run_id):
        return _log(path, load, None).model_uri


def _log(bundle: str | Path, load: Loader, registered_model_name: str | None) -> Any:
    from recfb import __version__

    return mlflow.pyfunc.log_model(
        name=MODEL_NAME,
        python_model=RecommenderModel(load),
        artifacts={BUNDLE_ARTIFACT: str(bundle)},
        signature=SIGNATURE,
        pip_requirements=[f"recfb=={__version__}"],
        registered_model_name=registered_model_name,
    )

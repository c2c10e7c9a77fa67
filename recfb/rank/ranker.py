"""The learned ranker: LightGBM LambdaRank over candidate features, graded next-window labels.

Rows are grouped by user (one query per user, rows contiguous); labels are the deepest level
the pair reached in the next window (0 for none, a refund or a dislike). Early stopping watches
NDCG@k on a share of the users held out by a hash of their index, so the split does not move
when other users come and go.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

import lightgbm as lgb
import numpy as np

from recfb.rank.config import RankerParams

log = logging.getLogger(__name__)


def group_sizes(users: np.ndarray) -> np.ndarray:
    """Run lengths of a sorted user column: LightGBM's query groups."""
    if len(users) == 0:
        return np.zeros(0, dtype=np.int64)
    change = np.flatnonzero(np.diff(users)) + 1
    return np.diff(np.concatenate([[0], change, [len(users)]]))


class Ranker:
    """A fitted LambdaRank booster with the feature columns it expects, in order."""

    def __init__(self, booster: lgb.Booster, columns: list[str], best_iteration: int) -> None:
        self.booster = booster
        self.columns = list(columns)
        self.best_iteration = int(best_iteration)

    @classmethod
    def fit(
        cls,
        x: np.ndarray,
        labels: np.ndarray,
        users: np.ndarray,
        columns: list[str],
        params: RankerParams,
        queries: np.ndarray | None = None,
    ) -> Ranker:
        """Fit on rows grouped by query (`queries`, default the user: rows of one query
        contiguous); users whose hash falls in the held-out share early-stop."""
        labels = np.clip(labels.astype(np.int64), 0, 30)
        queries = users if queries is None else queries
        # a query without a positive label gives LambdaRank no gradient (and scores NDCG 1 in
        # early stopping): leave it out, which on sparse next-window labels is most rows
        starts = np.concatenate([[0], np.flatnonzero(np.diff(queries)) + 1])
        best = np.maximum.reduceat(labels, starts) if len(labels) else labels
        informative = np.repeat(best > 0, group_sizes(queries))
        n_informative = int((best > 0).sum())
        if n_informative > params.max_queries:  # a hash sample of the queries, stable per run
            share = params.max_queries / n_informative
            informative &= (queries.astype(np.int64) * 40503 % 10007) < share * 10007
        held = (users.astype(np.int64) * 2654435761 % 1000) < params.early_stopping_share * 1000
        fit_rows, stop_rows = ~held & informative, held & informative
        booster_params = {
            "objective": "lambdarank",
            "lambdarank_truncation_level": params.truncation_level,
            "metric": "ndcg",
            "eval_at": [params.eval_at],
            "learning_rate": params.learning_rate,
            "num_leaves": params.num_leaves,
            "min_child_samples": params.min_child_samples,
            "feature_fraction": params.feature_fraction,
            "seed": params.seed,
            "deterministic": True,
            "force_col_wise": True,
            "verbose": -1,
        }
        if params.num_threads:
            booster_params["num_threads"] = params.num_threads
        train = lgb.Dataset(
            x[fit_rows],
            labels[fit_rows],
            group=group_sizes(queries[fit_rows]),
            feature_name=columns,
            free_raw_data=False,
        )
        callbacks = [lgb.log_evaluation(0)]
        valid_sets = []
        if stop_rows.any() and labels[stop_rows].any():
            valid = lgb.Dataset(
                x[stop_rows],
                labels[stop_rows],
                group=group_sizes(queries[stop_rows]),
                reference=train,
            )
            valid_sets = [valid]
            callbacks.append(lgb.early_stopping(params.early_stopping_rounds, verbose=False))
        booster = lgb.train(
            booster_params,
            train,
            num_boost_round=params.n_estimators,
            valid_sets=valid_sets,
            callbacks=callbacks,
        )
        best = booster.best_iteration or booster.current_iteration()
        return cls(booster, columns, best)

    def predict(self, x: np.ndarray, num_threads: int = 0) -> np.ndarray:
        """Scores (higher first). One request's few hundred rows: pass num_threads=1
        (LightGBM's threads cost far more than they save on a small matrix)."""
        if len(x) == 0:
            return np.zeros(0)
        return self.booster.predict(x, num_iteration=self.best_iteration, num_threads=num_threads)

    def importances(self) -> dict[str, float]:
        """Total gain per feature."""
        gain = self.booster.feature_importance("gain", iteration=self.best_iteration)
        return {c: float(g) for c, g in zip(self.columns, gain, strict=True)}

    def save(self, path: Path) -> None:
        self.booster.save_model(str(path), num_iteration=self.best_iteration)

    @classmethod
    def load(cls, path: Path, columns: list[str]) -> Ranker:
        booster = lgb.Booster(model_file=str(path))
        return cls(booster, columns, booster.current_iteration())


def compiled_predictor(model_file: Path, ranker: Ranker) -> Callable[[np.ndarray], np.ndarray]:
    """The saved ranker's trees compiled to native code (`lleaves`, LLVM): the same scores as
    LightGBM's predict, about ten times faster on a request's few hundred rows, which is
    what keeps a 250-tree ranker inside the service's latency budget. Compiling takes seconds
    per hundred trees, so the object file is cached under ``$RECFB_CACHE_DIR`` (default
    ``~/.cache/recfb``) by the model file's sha256. Falls back to LightGBM's predict (one
    thread) where lleaves is missing or cannot compile."""

    def fallback(x: np.ndarray) -> np.ndarray:
        return ranker.predict(x, num_threads=1)

    try:
        import lleaves
    except ImportError:
        log.warning("lleaves is not installed: the ranker predicts with LightGBM")
        return fallback
    digest = hashlib.sha256(Path(model_file).read_bytes()).hexdigest()
    cache = Path(os.environ.get("RECFB_CACHE_DIR", Path.home() / ".cache" / "recfb"))
    try:
        cache.mkdir(parents=True, exist_ok=True)
        model = lleaves.Model(model_file=str(model_file))
        model.compile(cache=str(cache / f"ranker-{digest}.o"))
    except Exception as exc:  # a broken toolchain must not take the service down
        log.warning("compiling the ranker failed (%s): it predicts with LightGBM", exc)
        return fallback

    def predict(x: np.ndarray) -> np.ndarray:
        if len(x) == 0:
            return np.zeros(0)
        return model.predict(np.asarray(x, dtype=np.float64), n_jobs=1)

    return predict

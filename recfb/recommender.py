"""`recfb.Recommender`: the one interface every model family implements.

    model = recfb.Recommender.create("two_stage")      # or "mf", "als", "itemknn", ...
    model.fit(data)                                     # data: recfb.Interactions
    model.recommend(["u1", "u2"], k=10)                 # polars: user_id, rank, item_id, score
    model.similar_items(["i9"], k=5)
    model.recalculate_user(events)                      # fold in new events, as the service does
    model.save("model/");  recfb.Recommender.load("model/")

A fitted model *is* its bundle: `fit` writes the bundle (vocabularies, vectors, index, ranker,
signal map, delay models, seen pairs, `recommender.json`) into a private directory and answers
from it through the service's own code (`recfb.serving`), so a saved, loaded or served model
gives the same lists as the one just fitted. `save` copies that directory; nothing else (no
ETL output, no MLflow) is needed to load or serve it. Training-free families (popularity,
itemknn, cascade) keep their fitted pairs instead of vectors and refit them at load.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import polars as pl

from recfb.errors import RecfbError

if TYPE_CHECKING:
    from recfb.train.config import TrainConfig

RECOMMENDER_FILE = "recommender.json"
LIST_SCHEMA = {
    "user_id": pl.String,
    "rank": pl.Int32,
    "item_id": pl.String,
    "score": pl.Float64,
    "source": pl.String,  # model | two_stage | session (folded-in events) | popularity
}
SIMILAR_SCHEMA = {
    "item_id": pl.String,
    "rank": pl.Int32,
    "similar_item_id": pl.String,
    "score": pl.Float64,
}


class NotFittedError(RecfbError):
    """The model was asked for recommendations before `fit` or `load`."""


class Recommender:
    """Base class: fit on `Interactions`, answer by external ids, save and load as a bundle."""

    family: str = "base"
    _registry: ClassVar[dict[str, type[Recommender]]] = {}

    def __init__(self, config: Any = None, **keys: Any) -> None:
        self.config = self._make_config(config, keys)
        self.path: Path | None = None  # the bundle directory the model answers from
        self.metrics: dict[str, float] = {}
        self._online: dict[str, list] = {}  # user id -> events folded in by recalculate_user
        self.fitted: Any = None  # the in-memory model and its evaluation, after fit()

    # --- construction ------------------------------------------------------------------
    @classmethod
    def create(cls, family: str = "mf", config: Any = None, **keys: Any) -> Recommender:
        """A model of `family` with its config (a dict or config object) and/or keys."""
        from recfb.models.config import FAMILIES

        if family in cls._registry:
            return cls._registry[family](config, **keys)
        spec = FAMILIES.get(family)
        if spec is None:
            known = sorted({*FAMILIES, *cls._registry})
            raise ValueError(f"unknown model family {family!r}; known: {known}")
        target = PairsRecommender if family in PAIRS_FAMILIES else VectorRecommender
        return target(config, family=family, **keys)

    @staticmethod
    def _make_config(config: Any, keys: dict[str, Any]) -> Any:
        """A TrainConfig from a config object or dict plus model keys (`dim=32`, ...)."""
        from recfb.train.config import TrainConfig

        if isinstance(config, TrainConfig):
            data = config.model_dump(mode="json")
        else:
            data = dict(config or {})
        model = dict(data.get("model") or {})
        family = keys.pop("family", None)
        if family is not None:
            model["family"] = family
        trainer_keys = {k: keys.pop(k) for k in list(keys) if k in TrainConfig.model_fields}
        model |= keys
        data = data | trainer_keys | {"model": model}
        return TrainConfig.model_validate(data)

    # --- the interface -------------------------------------------------------------------
    def fit(self, data: Any, *, tracker: Any = None, quiet: bool = True) -> Recommender:
        """Fit on `data` (`recfb.Interactions`, or an ETL output directory). With a
        `tracker` (`recfb.tracking.MlflowTracker`) the run is recorded; without one nothing
        touches MLflow."""
        raise NotImplementedError

    def recommend(
        self,
        user_ids: Iterable[str] | str,
        k: int = 10,
        *,
        exclude: str | Iterable[str] = "signals",
        filter: Iterable[str] | None = None,
    ) -> pl.DataFrame:
        """Top-k per user: `user_id, rank, item_id, score, source` (in the order asked).

        `exclude`: `signals` (the signal map's rule: bought and not refunded, explicit
        negatives), `purchased`, `any` (everything the user engaged with), `none` (no level;
        explicit negatives stay hidden under every rule, as in the service), or item ids
        hidden from every listed user (on top of the signal map's rule).
        `filter`: only these item ids may be recommended. Unknown users get the
        popularity list, never an error."""
        raise NotImplementedError

    def similar_items(self, item_ids: Iterable[str] | str, k: int = 10) -> pl.DataFrame:
        """Items most similar to each item: `item_id, rank, similar_item_id, score`."""
        raise NotImplementedError

    def recalculate_user(self, events: Any) -> None:
        """Fold new events (`user_id, item_id, event, ts[, value]`) into their users, as the
        service folds its logged events in; unknown users become known to later calls."""
        frame = _events_frame(events)
        from recfb.serving.eventlog import LoggedEvent

        cols = ["user_id", "item_id", "event", "ts", "value", "order_id"]
        for user, item, event, ts, value, order in frame.select(cols).iter_rows():
            logged = LoggedEvent(item, event, int(ts), value, order)
            self._online.setdefault(user, []).append(logged)
        for user in frame["user_id"].unique().to_list():
            self._online[user].sort(key=lambda e: e.ts)
        self._refresh_online(frame["user_id"].unique().to_list())

    def _refresh_online(self, users: list[str]) -> None:
        """Hook: families that precompute per-user state update it here."""

    def user_ids(self) -> list[str]:
        """Every user the fitted model knows (its vocabulary)."""
        raise NotImplementedError

    def save(self, path: str | Path) -> Path:
        """Copy the fitted bundle to `path` (a new directory); returns it."""
        source = self._require_fitted()
        target = Path(path)
        if target.exists() and any(target.iterdir()):
            raise RecfbError(f"save: {target} exists and is not empty; choose a new directory")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(source, target, dirs_exist_ok=True)
        return target

    @classmethod
    def load(cls, path: str | Path) -> Recommender:
        """A model from a bundle directory written by `save` (or published by a pipeline).
        Every file is checked against the manifest's checksums."""
        path = Path(path)
        meta_path = path / RECOMMENDER_FILE
        if not meta_path.is_file():
            raise RecfbError(f"{path}: no {RECOMMENDER_FILE}; not a saved recfb model")
        meta = json.loads(meta_path.read_text())
        model = cls.create(meta["family"], meta.get("config"))
        model._attach(path)
        model.metrics = meta.get("metrics", {})
        return model

    # --- shared machinery ----------------------------------------------------------------
    def _attach(self, path: Path) -> None:
        """Answer from the bundle at `path` (a fit's private copy is removed with the model,
        by the finaliser `fit` registers)."""
        self.path = Path(path)

    def _require_fitted(self) -> Path:
        if self.path is None:
            raise NotFittedError(f"{type(self).__name__}: call fit() or Recommender.load() first")
        return self.path

    def _meta(self) -> dict[str, Any]:
        from recfb import __version__

        config = self.config.model_dump(mode="json") if self.config is not None else None
        return {
            "family": self.family_name,
            "config": config,
            "recfb_version": __version__,
            "metrics": self.metrics,
        }

    @property
    def family_name(self) -> str:
        return self.config.model.family

    def __repr__(self) -> str:
        state = f"bundle={self.path}" if self.path else "not fitted"
        return f"{type(self).__name__}({self.family_name!r}, {state})"


# --- vector families: embedding models, ALS, BPR ------------------------------------------
class VectorRecommender(Recommender):
    """Families with user and item vectors: served by inner product through the bundle's
    FAISS index, with the service's fold-in for new events."""

    def fit(self, data: Any, *, tracker: Any = None, quiet: bool = True) -> Recommender:
        from recfb.train.loop import fit_model

        data = _interactions(data)
        self.fitted = fitted = fit_model(self.config, data, quiet=quiet, tracker=tracker)
        self.metrics = dict(fitted.metrics)
        users, items = vectors_of(fitted.model)
        self._publish(data, users, items, fitted.data)
        _log_model(self, tracker, fitted.run_id)
        return self

    def _publish(self, data: Any, users: np.ndarray, items: np.ndarray, fitted: Any) -> None:
        from recfb.index.bundle import BundleParts, catalog_parts, delay_parts, write_bundle
        from recfb.index.config import IndexConfig

        parts = BundleParts(
            **catalog_parts(data),
            item_vectors=items,
            user_vectors=users,
            family=self.family_name,
            recommender=self._meta(),
        )
        tmp = Path(tempfile.mkdtemp(prefix="recfb-model-"))
        index = IndexConfig(models_dir=str(tmp), name="bundle", low_recall="exact")
        if index.delays:  # the delay models the service's online rates start from
            parts.delays, parts.cascade_events = delay_parts(data, index.rates_horizon_days)
        self._extend_parts(parts, data)
        result = write_bundle(parts, index)
        self._attach(result.path)
        weakref.finalize(self, shutil.rmtree, str(tmp), True)

    def _extend_parts(self, parts: Any, data: Any) -> None:
        """Hook: add family files (the two-stage ranker) to the bundle before it is written."""

    def _attach(self, path: Path) -> None:
        from recfb.index.bundle import load_bundle
        from recfb.serving.config import ServeConfig
        from recfb.serving.retrieval import ServingBundle

        super()._attach(path)
        self._served = ServingBundle(load_bundle(path, device="cpu"), ServeConfig())

    def _now_ms(self) -> int:
        """The bundle's clock: the end of its log (lists are reproducible, not wall-clock)."""
        online = self._served.online
        if online is not None:
            return int(online.snap.now_ms)
        return int(self._served.bundle.manifest.get("data_end_ms") or 0)

    def recommend(self, user_ids, k=10, *, exclude="signals", filter=None) -> pl.DataFrame:
        from recfb.serving.lists import served_list

        self._require_fitted()
        served = self._served
        extra, rule = _exclusion(exclude)
        allowed = None
        if filter is not None:
            allowed = np.asarray(
                sorted({served.item_row[i] for i in filter if i in served.item_row}), np.int64
            )
        rows = []
        for user in _ids(user_ids):
            items, scores, source = served_list(
                served,
                user,
                self._online.get(user, []),
                k,
                extra,
                allowed,
                self._now_ms(),
                seen_rule=rule,
            )
            pairs = enumerate(zip(items, scores, strict=True))
            rows += [(user, r + 1, it, s, source) for r, (it, s) in pairs]
        return pl.DataFrame(rows, schema=LIST_SCHEMA, orient="row")

    def user_ids(self) -> list[str]:
        self._require_fitted()
        return self._served.bundle.users["user_id"].cast(pl.String).to_list()

    def similar_items(self, item_ids, k=10) -> pl.DataFrame:
        self._require_fitted()
        served = self._served
        vectors = served.bundle.item_vectors
        norms = np.linalg.norm(vectors, axis=1)
        unit = vectors / np.maximum(norms, 1e-12)[:, None]
        return _similar_by_matrix(_ids(item_ids), served.item_ids, served.item_row, unit, k)

    def query_vectors(self, user_ids: Iterable[str] | str) -> np.ndarray:
        """The users' query vectors after folding in their recalculated events (the bundle
        vector where there is nothing new; zeros for a user with neither)."""
        served = self._served
        out = []
        for user in _ids(user_ids):
            targets, _ = served.session_state(self._online.get(user, []), self._now_ms())
            q = served.query_vector(served.user_row.get(user), targets)
            out.append(
                np.zeros(served.bundle.item_vectors.shape[1], np.float32) if q is None else q
            )
        return np.stack(out) if out else np.zeros((0, served.bundle.item_vectors.shape[1]))


class TwoStageRecommender(VectorRecommender):
    """Candidates from several sources (history, cascade walk, embedding, trending) ranked
    by LambdaRank over every signal; the embedding family is trained first."""

    family = "two_stage"

    def __init__(self, config: Any = None, **keys: Any) -> None:
        from recfb.rank.config import RankConfig

        config = dict(config or {})
        embedding = keys.pop("embedding", None) or config.get("embedding") or {}
        rank = keys.pop("rank", None) or config.get("rank") or {}
        super().__init__(embedding, **keys)
        self.rank_config = RankConfig.model_validate(
            {"embedding": "run", "delay_corrected_rates": True} | dict(rank)
        )

    @property
    def family_name(self) -> str:
        return "two_stage"

    def _meta(self) -> dict[str, Any]:
        meta = super()._meta()
        meta["config"] = {
            "embedding": self.config.model_dump(mode="json"),
            "rank": self.rank_config.model_dump(mode="json"),
        }
        return meta

    def _extend_parts(self, parts: Any, data: Any) -> None:
        from recfb.rank.publish import save_ranker
        from recfb.rank.twostage import fit_two_stage

        scorer = _VectorScorer(parts.user_vectors, parts.item_vectors)
        result = fit_two_stage(self.rank_config, scorer, scorer, data=data)
        self.metrics |= {f"two_stage/{k}": v for k, v in result.metrics["two_stage"].items()}
        parts.rank_dir = save_ranker(
            result, self.rank_config, Path(tempfile.mkdtemp(prefix="recfb-rank-"))
        )
        parts.rank_data = data
        parts.recommender = self._meta()


Recommender._registry["two_stage"] = TwoStageRecommender


# --- training-free families: their state is their fitted pairs ----------------------------
PAIRS_FAMILIES = ("popularity", "itemknn", "cascade")


class PairsRecommender(Recommender):
    """Popularity, item-kNN and the cascade walk: fitted in seconds from the pairs, so the
    bundle keeps the pairs and `load` refits (no vectors, so the HTTP service does not serve
    them; the library and `recfb recommend` do)."""

    def fit(self, data: Any, *, tracker: Any = None, quiet: bool = True) -> Recommender:
        from recfb.index.bundle import catalog_parts, write_pairs_bundle
        from recfb.train.loop import fit_model

        data = _interactions(data)
        self.fitted = fitted = fit_model(self.config, data, quiet=quiet, tracker=tracker)
        self.metrics = dict(fitted.metrics)
        pairs = fitted.data.train.select("user_idx", "item_idx", "label", "weight", "last_ts")
        tmp = Path(tempfile.mkdtemp(prefix="recfb-model-"))
        path = write_pairs_bundle(catalog_parts(data), pairs, self._meta(), tmp / "bundle")
        self._attach(path)
        weakref.finalize(self, shutil.rmtree, str(tmp), True)
        _log_model(self, tracker, fitted.run_id)
        return self

    def _attach(self, path: Path) -> None:
        from recfb.index.bundle import read_pairs_bundle

        super()._attach(path)
        bundle = read_pairs_bundle(path)
        self._items: pl.DataFrame = bundle["items"]
        self._users: pl.DataFrame = bundle["users"]
        self._signals: dict = bundle["signals"]
        self._pairs: pl.DataFrame = bundle["pairs"]
        self._seen: pl.DataFrame = bundle["seen"]
        self._item_ids = self._items["item_id"].to_numpy().astype(object)
        self._item_row = {iid: i for i, iid in enumerate(self._item_ids)}
        self._user_row = {u: i for i, u in enumerate(self._users["user_id"].to_list())}
        self._model = self._refit(self._pairs, len(self._user_row))

    def _refit(self, pairs: pl.DataFrame, n_users: int) -> Any:
        from recfb.train.loop import fit_baseline_pairs

        return fit_baseline_pairs(self.config, pairs, n_users, len(self._item_ids), self._signals)

    def _refresh_online(self, users: list[str]) -> None:
        """A training-free model recalculates a user by refitting with the folded pairs
        (the same fold as the ETL's: `recfb.signals.SignalFold`)."""
        from recfb.signals.fold import SignalFold

        fold = SignalFold(self._signals)
        rows = []
        for user in users:
            if user not in self._user_row:
                self._user_row[user] = len(self._user_row)
            events = self._online[user]
            folded = fold.fold((e.item_id, e.event, e.ts, e.value, e.order_id) for e in events)
            for item, state in folded.items():
                if item in self._item_row and state.label != 0:
                    rows.append(
                        (self._user_row[user], self._item_row[item], state.label, state.last_ts)
                    )
        if not rows:
            return
        new = pl.DataFrame(
            rows, schema=["user_idx", "item_idx", "label", "last_ts"], orient="row"
        ).with_columns(pl.lit(1.0).alias("weight"))
        touched = new.select("user_idx", "item_idx")
        base = self._pairs.join(touched, on=["user_idx", "item_idx"], how="anti")
        self._pairs = pl.concat([base, new.select(base.columns)], how="vertical_relaxed")
        seen = new.select("user_idx", "item_idx", "label")
        self._seen = pl.concat(
            [self._seen.join(touched, on=["user_idx", "item_idx"], how="anti"), seen],
            how="vertical_relaxed",
        )
        self._model = self._refit(self._pairs, len(self._user_row))

    def recommend(self, user_ids, k=10, *, exclude="signals", filter=None) -> pl.DataFrame:
        import torch

        from recfb.signals import rule_labels

        self._require_fitted()
        users = _ids(user_ids)
        extra, rule = _exclusion(exclude)
        n_items = len(self._item_ids)
        hidden = rule_labels(self._signals, rule)
        rows_known = [self._user_row.get(u) for u in users]
        known = [r for r in rows_known if r is not None]
        scores = np.zeros((len(users), n_items), dtype=np.float64)
        if known:
            got = self._model.score(torch.as_tensor(known, dtype=torch.long)).numpy()
            scores[[i for i, r in enumerate(rows_known) if r is not None]] = got
        popularity = self._popularity()
        masked = self._seen.filter(pl.col("label").is_in(list(hidden)))
        by_user = masked.group_by("user_idx").agg(pl.col("item_idx"))
        hide = dict(zip(by_user["user_idx"].to_list(), by_user["item_idx"].to_list(), strict=True))
        extra_rows = [self._item_row[i] for i in extra if i in self._item_row]
        allowed = None
        if filter is not None:
            allowed = np.zeros(n_items, dtype=bool)
            allowed[[self._item_row[i] for i in filter if i in self._item_row]] = True
        out = []
        for j, (user, row) in enumerate(zip(users, rows_known, strict=True)):
            warm = row is not None and scores[j].any()
            s = scores[j] if warm else popularity.copy()
            s = s.astype(np.float64)
            if row is not None:
                s[hide.get(row, [])] = -np.inf
            s[extra_rows] = -np.inf
            if allowed is not None:
                s[~allowed] = -np.inf
            order = np.argsort(-s, kind="stable")[:k]
            order = order[np.isfinite(s[order])]
            source = "model" if warm else "popularity"
            out += [
                (user, r + 1, self._item_ids[i], float(s[i]), source) for r, i in enumerate(order)
            ]
        return pl.DataFrame(out, schema=LIST_SCHEMA, orient="row")

    def user_ids(self) -> list[str]:
        self._require_fitted()
        return list(self._user_row)

    def _popularity(self) -> np.ndarray:
        return self._items["popularity"].to_numpy().astype(np.float64)

    def similar_items(self, item_ids, k=10) -> pl.DataFrame:
        """Item-item cosine over the fitted positive pairs (who engaged with both)."""
        import scipy.sparse as sp

        self._require_fitted()
        pos = self._pairs.filter(pl.col("label") >= 1)
        matrix = sp.csr_matrix(
            (
                np.ones(pos.height, dtype=np.float32),
                (pos["item_idx"].to_numpy(), pos["user_idx"].to_numpy()),
            ),
            shape=(len(self._item_ids), max(len(self._user_row), 1)),
        )
        norms = np.sqrt(np.asarray(matrix.multiply(matrix).sum(1)).ravel())
        unit = sp.diags(1 / np.maximum(norms, 1e-12)) @ matrix
        return _similar_by_matrix(_ids(item_ids), self._item_ids, self._item_row, unit, k)


# --- the `recfb train` command ---------------------------------------------------------
@dataclass
class TrainResult:
    run_id: str
    metrics: dict[str, float]
    model: Any
    history: list[dict[str, float]] = field(default_factory=list)


def train(cfg: TrainConfig, *, quiet: bool = False) -> TrainResult:
    """`recfb train`: fit the family on the ETL output `cfg.data`, evaluate it, and record
    one MLflow run with the model logged as an MLflow model (`runs:/<id>/model`)."""
    from recfb.tracking import MlflowTracker
    from recfb.train.data import Interactions

    data = Interactions.load(cfg.data)
    rec = Recommender.create(cfg.model.family, cfg)
    tracker = MlflowTracker(cfg.experiment, cfg.run_name)
    rec.fit(data, tracker=tracker, quiet=quiet)
    fitted = rec.fitted
    return TrainResult(
        run_id=fitted.run_id, metrics=fitted.metrics, model=fitted.model, history=fitted.history
    )


# --- helpers -------------------------------------------------------------------------------
def _log_model(model: Recommender, tracker: Any, run_id: str | None) -> None:
    """With a tracker, the fitted bundle is logged to the run as an MLflow model."""
    if tracker is not None and run_id is not None:
        tracker.log_model(model, run_id)


def vectors_of(model: Any) -> tuple[np.ndarray, np.ndarray]:
    """(user vectors, item vectors) as float32 of any fitted vector family."""
    if hasattr(model, "vectors"):
        users, items = (t.detach().cpu().numpy() for t in model.vectors())
    else:
        users, items = model.user_vectors(), model.item_vectors()
    return np.ascontiguousarray(users, np.float32), np.ascontiguousarray(items, np.float32)


class _VectorScorer:
    """Inner-product scores of fixed vectors (the two-stage embedding source)."""

    def __init__(self, users: np.ndarray, items: np.ndarray) -> None:
        import torch

        self.user_vectors, self.item_vectors = torch.from_numpy(users), torch.from_numpy(items)
        self.n_users, self.n_items = len(users), len(items)

    def score(self, users: Any) -> Any:
        return self.user_vectors[users] @ self.item_vectors.T


def _interactions(data: Any) -> Any:
    from recfb.etl.interactions import as_interactions

    return as_interactions(data)


def _ids(ids: Iterable[str] | str) -> list[str]:
    if isinstance(ids, str):
        return [ids]
    return [str(i) for i in ids]


def _exclusion(exclude: str | Iterable[str]) -> tuple[list[str], str]:
    """(extra item ids to hide, the seen-pairs rule) from `recommend`'s `exclude`."""
    from recfb.signals import EXCLUSION_RULES

    if isinstance(exclude, str):
        if exclude not in EXCLUSION_RULES:
            raise ValueError(
                f"exclude={exclude!r}: use one of {EXCLUSION_RULES} or a list of item ids to hide"
            )
        return [], exclude
    return [str(i) for i in exclude], "signals"


def _events_frame(events: Any) -> pl.DataFrame:
    if not isinstance(events, pl.DataFrame):
        events = pl.from_pandas(events) if hasattr(events, "to_numpy") else pl.DataFrame(events)
    missing = [c for c in ("user_id", "item_id", "event", "ts") if c not in events.columns]
    if missing:
        raise ValueError(f"recalculate_user: events lack columns {missing}")
    ts = pl.col("ts")
    if events.schema["ts"] != pl.Int64:
        ts = ts.cast(pl.Datetime("ms")).dt.epoch("ms")
    optional = [
        pl.lit(None, pl.Float64).alias(c) if c == "value" else pl.lit(None, pl.String).alias(c)
        for c in ("value", "order_id")
        if c not in events.columns
    ]
    return (
        events.with_columns(*optional)
        .with_columns(
            pl.col("user_id").cast(pl.String),
            pl.col("item_id").cast(pl.String),
            ts.alias("ts"),
            pl.col("value").cast(pl.Float64),
            pl.col("order_id").cast(pl.String),
        )
        .sort("ts")
    )


def _similar_by_matrix(
    wanted: list[str], item_ids: np.ndarray, item_row: dict, unit: Any, k: int
) -> pl.DataFrame:
    """Top-k cosine neighbours of each wanted item from row-normalised vectors (dense or
    sparse), the item itself left out; unknown items give no rows."""
    out = []
    for item in wanted:
        row = item_row.get(item)
        if row is None:
            continue
        scores = unit @ unit[row].T
        scores = np.asarray(scores.todense() if hasattr(scores, "todense") else scores).ravel()
        scores = scores.astype(np.float64)
        scores[row] = -np.inf
        order = np.argsort(-scores, kind="stable")[:k]
        out += [(item, r + 1, item_ids[i], float(scores[i])) for r, i in enumerate(order)]
    return pl.DataFrame(out, schema=SIMILAR_SCHEMA, orient="row")

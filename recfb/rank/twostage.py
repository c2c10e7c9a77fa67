"""The two-stage recommender offline: fit the ranker on one window, score the next.

Fitting (`fit_two_stage`): the snapshot before the valid window gives candidates and
features; the valid window's pairs give graded labels (the deepest level reached there; a
refund or dislike is 0). Scoring the test: the snapshot before the test window (train + valid
folded), sources refitted on it, the same features, the ranker's order. Everything is compared
in the same run on the same masks (`evaluate_methods`): each source alone, the "own engaged
items first, then the model" heuristic, any external scorer, and the two-stage list.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from recfb.errors import InputError
from recfb.evaluate import EvalConfig, full_ranking_metrics
from recfb.rank.candidates import (
    history_candidates,
    merge_sources,
    topn_candidates,
    trending_scores,
)
from recfb.rank.config import FEATURE_GROUPS, SOURCES, RankConfig
from recfb.rank.features import (
    ItemTable,
    build_features,
    feature_columns,
    item_stats,
    recent_events,
)
from recfb.rank.ranker import Ranker
from recfb.rank.state import PAIR, Snapshot, snapshot_from_etl

log = logging.getLogger(__name__)
ScoreFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Sources:
    """The candidate sources fitted on one snapshot."""

    cascade: Any | None
    embedding: Any | None  # anything with score(users) -> (B, n_items)
    popularity: np.ndarray

    def popularity_score(self, users: torch.Tensor) -> torch.Tensor:
        row = torch.from_numpy(self.popularity)
        return row.unsqueeze(0).expand(len(users), -1).clone()


def _level_weighted(snap: Snapshot) -> pl.DataFrame:
    """The snapshot's pairs with the signal map's level weight (ALS confidence)."""
    weights = {t: lv["weight"] for t, lv in enumerate(snap.spec["levels"], start=1)}
    return snap.pairs.with_columns(
        pl.col("label")
        .replace_strict(weights, default=0.0, return_dtype=pl.Float32)
        .alias("weight")
    )


def fit_cascade(snap: Snapshot, cfg: RankConfig) -> Any:
    """The cascade walk of `cfg.cascade` over the snapshot's folded pairs."""
    from recfb.models.baselines import make_baseline

    c = cfg.cascade
    return make_baseline(
        "cascade",
        alpha=c.alpha,
        beta=c.beta,
        level_weights=c.level_weights,
        tol=c.tol,
        max_iter=c.max_iter,
        n_levels=snap.n_levels,
    ).fit(snap.pairs, snap.n_users, snap.n_items)


def fit_sources(snap: Snapshot, cfg: RankConfig, embedding: Any | None = None) -> Sources:
    """Cascade, embedding (ALS fitted here, or the given scorer) and trending popularity."""
    from recfb.models.baselines import make_baseline

    cascade = fit_cascade(snap, cfg) if cfg.sources.cascade else None
    if embedding is None and cfg.embedding == "als" and cfg.sources.embedding:
        embedding = make_baseline("als", factors=cfg.embedding_dim, seed=cfg.seed).fit(
            _level_weighted(snap), snap.n_users, snap.n_items
        )
    if not cfg.sources.embedding:
        embedding = None
    return Sources(cascade, embedding, trending_scores(snap, max(cfg.item_windows_days)))


def candidates(
    snap: Snapshot, sources: Sources, users: np.ndarray, cfg: RankConfig, recent: pl.DataFrame
) -> pl.DataFrame:
    """Every source's candidates for `users`, merged (one row per user, item); the history
    source reads the `recent` events (`recent_events`)."""
    sizes = cfg.sources
    frames: dict[str, pl.DataFrame] = {}
    user_frame = pl.DataFrame({"user_idx": users.astype(np.int64)})
    if sizes.history:
        events = recent.join(user_frame, on="user_idx", how="semi")
        frames["history"] = history_candidates(
            events, snap.hidden_pairs(), snap.now_ms, sizes.history, snap
        )
    if sources.cascade is not None:
        frames["cascade"] = topn_candidates(
            sources.cascade.score, users, snap, sizes.cascade, "cascade"
        )
    if sources.embedding is not None:
        frames["embedding"] = topn_candidates(
            sources.embedding.score, users, snap, sizes.embedding, "embedding"
        )
    if sizes.popularity:
        frames["popularity"] = topn_candidates(
            sources.popularity_score, users, snap, sizes.popularity, "popularity"
        )
    return merge_sources(frames)


class DelayedRates:
    """Delay-corrected CVR and refund rate per item at any cut of one ETL output.

    The delay models are fitted once, at the earliest cut asked for (`first_cut_ms`), so no
    later snapshot's fit sees the future and the EM over the unlogged click runs once; each
    snapshot then only rebuilds its trials at its own cut. Snapshots without a time cut
    (leave-last-out: the held-out buys lie inside the log) get naive rates instead, because
    the event log's trials would include the held-out purchases."""

    def __init__(self, etl: Any, first_cut_ms: int | None) -> None:
        from recfb.delayed.fit import fit_delays, load_cascade

        self.fits = None
        self.etl = etl
        if first_cut_ms is None:
            log.info("naive item rates: no time cut to fit delay models before")
            return
        try:
            self.events, self.signals = load_cascade(etl)
            self.fits = fit_delays(etl, first_cut_ms)
        except InputError as exc:
            log.info("naive item rates: %s", exc)

    def at(self, cutoff_ms: int, n_items: int) -> pl.DataFrame | None:
        """`item_idx, cvr, refund_rate` as of `cutoff_ms` (None: naive rates)."""
        if self.fits is None:
            return None
        from recfb.delayed import click_trials, item_rates, purchase_trials

        conversion = self.fits.conversion
        clicks = click_trials(
            self.events,
            self.signals.clock,
            self.signals.purchase,
            cutoff_ms,
            delay=conversion.overall,
        )
        purchases = purchase_trials(self.events, self.signals.purchase, cutoff_ms)
        rates = item_rates(clicks, purchases, conversion, self.fits.refund, n_items)
        refund = (
            rates["refund_corrected"]
            if "refund_corrected" in rates.columns
            else pl.repeat(None, rates.height, dtype=pl.Float64, eager=True)
        )
        return pl.DataFrame(
            {
                "item_idx": rates["item_idx"].cast(pl.Int64),
                "cvr": rates["cvr_corrected"],
                "refund_rate": refund,
            }
        )


def delayed_rates(etl: Any, cutoff_ms: int | None, n_items: int) -> pl.DataFrame | None:
    """Rates at one cut, delay models fitted there (None: naive rates)."""
    return DelayedRates(etl, cutoff_ms).at(cutoff_ms, n_items) if cutoff_ms else None


@dataclass
class Stage:
    """One snapshot with its fitted sources, item statistics and candidates."""

    snap: Snapshot
    sources: Sources
    items: ItemTable
    users: np.ndarray
    candidates: pl.DataFrame
    features: np.ndarray
    columns: list[str]
    labels: np.ndarray | None = None  # graded next-window labels (fitting stages)
    queries: np.ndarray | None = None  # the ranker's query id per row (window, user)


def prepare(
    etl: Any,
    upto: str,
    users_from: pl.DataFrame,
    cfg: RankConfig,
    embedding: Any | None,
    rates: DelayedRates | None = None,
) -> Stage:
    """Snapshot -> sources -> candidates -> features for the users with a positive pair in
    `users_from` (the window the stage is labelled or scored on)."""
    return _stage_at(snapshot_from_etl(etl, upto), users_from, cfg, etl, embedding, rates)


def _stage_at(
    snap: Snapshot,
    window: pl.DataFrame,
    cfg: RankConfig,
    etl: Any,
    embedding: Any | None = None,
    rates: DelayedRates | None = None,
) -> Stage:
    """A stage from any snapshot for the users with a positive pair in `window`."""
    sources = fit_sources(snap, cfg, embedding)
    item_rates = None
    if cfg.delay_corrected_rates and snap.time_cut:
        rates = rates or DelayedRates(etl, snap.now_ms)
        item_rates = rates.at(snap.now_ms, snap.n_items)
    items = ItemTable(item_stats(snap, cfg.item_windows_days, item_rates))
    users = np.unique(window.filter(pl.col("label") > 0)["user_idx"].to_numpy()).astype(np.int64)
    recent = recent_events(snap.events, snap.now_ms, cfg.history_days, cfg.history_per_user)
    cands = candidates(snap, sources, users, cfg, recent)
    columns = feature_columns(snap, list(FEATURE_GROUPS), cfg.item_windows_days)
    x = build_features(cands, recent, items, snap, snap.now_ms, columns)
    return Stage(snap, sources, items, users, cands, x, columns)


def _past_stages(
    data: Any,
    cfg: RankConfig,
    embedding: Any | None,
    rates: DelayedRates | None,
    first_k: int,
    count: int,
) -> list[Stage]:
    """Fitting stages for `count` windows of the valid window's length before it: window k
    runs [valid - k L, valid - (k-1) L), k = first_k, ..., each with the snapshot at its start
    (temporal splits only; stops where the log does not reach back)."""
    from recfb.rank.state import cut_points, fold_at, snapshot_at

    valid_ms, test_ms, _ = cut_points(data.stats)
    if valid_ms is None or test_ms is None:
        return []
    length = test_ms - valid_ms
    stages = []
    for k in range(first_k, first_k + count):
        start, end = valid_ms - k * length, valid_ms - (k - 1) * length
        later = snapshot_at(data, end)
        if later.events.height == 0 or later.events["ts_ms"].min() >= start:
            break  # the log does not reach back this far
        window_events = later.events.filter(pl.col("ts_ms") >= start).with_columns(
            pl.lit(None, dtype=pl.Int64).alias("cancelled_ms")
        )
        window = fold_at(window_events, end, later.spec)
        if window.filter(pl.col("label") > 0).height == 0:
            break
        stage = _stage_at(snapshot_at(data, start), window, cfg, data, embedding, rates)
        stage.labels = graded_labels(stage.candidates, window)
        stage.queries = k * data.n_users + stage.candidates["user_idx"].to_numpy()
        stages.append(stage)
    return stages


def _stacked(stages: list[Stage]) -> Stage:
    """Several labelled stages as one training set (query = window, user)."""
    first = stages[0]
    log.info("ranker label windows: %d", len(stages))
    return Stage(
        first.snap,
        first.sources,
        first.items,
        np.concatenate([s.users for s in stages]),
        pl.concat([s.candidates for s in stages]),
        np.concatenate([s.features for s in stages]),
        first.columns,
        np.concatenate([s.labels for s in stages]),
        np.concatenate([s.queries for s in stages]),
    )


def graded_labels(cands: pl.DataFrame, window: pl.DataFrame) -> np.ndarray:
    """The deepest level each candidate reached in the window (0: none, refund, dislike)."""
    labels = (
        window.select(
            pl.col("user_idx").cast(pl.Int64),
            pl.col("item_idx").cast(pl.Int64),
            pl.col("label").clip(lower_bound=0).alias("_y"),
        )
        .group_by(PAIR)
        .agg(pl.col("_y").max())
    )
    joined = cands.select(PAIR).with_row_index("_row").join(labels, on=PAIR, how="left")
    return joined.sort("_row")["_y"].fill_null(0).to_numpy().astype(np.int64)


def select_columns(columns: list[str], groups: list[str], sources: list[str]) -> list[str]:
    """The columns of the given feature groups (source columns only of the given sources)."""
    prefix = {"pair": "pair_", "item": "item_", "user": "user_", "category": "cat_"}
    keep = []
    for c in columns:
        group = next((g for g, p in prefix.items() if c.startswith(p)), "source")
        if group not in groups:
            continue
        if group == "source" and c != "n_sources" and c.rsplit("_", 1)[0] not in sources:
            continue
        keep.append(c)
    return keep


def without_source(stage_cands: pl.DataFrame, x: np.ndarray, columns: list[str], source: str):
    """Rows and features as if `source` had not run: pairs only it proposed are dropped,
    its columns become missing and n_sources counts the others."""
    others = [f"{s}_rank" for s in SOURCES if s != source]
    keep = (
        stage_cands.select(pl.any_horizontal([pl.col(c).is_not_null() for c in others]))
        .to_series()
        .to_numpy()
    )
    x = x[keep].copy()
    for kind in ("score", "rank"):
        if f"{source}_{kind}" in columns:
            x[:, columns.index(f"{source}_{kind}")] = np.nan
    if "n_sources" in columns:
        present = (
            stage_cands.filter(pl.Series(keep))
            .select(pl.sum_horizontal([pl.col(c).is_not_null() for c in others]))
            .to_series()
            .to_numpy()
        )
        x[:, columns.index("n_sources")] = present
    return keep, x


def list_scorer(
    users: np.ndarray, items: np.ndarray, order_score: np.ndarray, n_items: int, fill: np.ndarray
) -> ScoreFn:
    """A full-catalogue scorer from ranked candidate lists: a user's candidates by
    `order_score`, then every other item by `fill` (popularity), so lists are always full."""
    frame = pl.DataFrame({"u": users, "i": items, "s": order_score})
    grouped = frame.group_by("u").agg("i", "s")
    rows = {
        int(u): (np.asarray(i), np.asarray(s))
        for u, i, s in zip(grouped["u"], grouped["i"], grouped["s"], strict=True)
    }
    base = torch.from_numpy(fill.astype(np.float32))
    finite = torch.isfinite(base)  # -inf: never listed
    lo, hi = (float(base[finite].min()), float(base[finite].max())) if finite.any() else (0, 0)
    base = torch.where(finite, (base - lo) / max(hi - lo, 1e-9) - 2.0, base)  # in [-2, -1]

    def score(batch: torch.Tensor) -> torch.Tensor:
        out = base.unsqueeze(0).repeat(len(batch), 1)
        for j, u in enumerate(batch.tolist()):
            if u in rows:
                cand, s = rows[u]
                ranks = np.argsort(np.argsort(-s, kind="stable"), kind="stable")
                out[j, torch.tensor(cand, dtype=torch.long)] = torch.from_numpy(
                    (1000.0 - ranks).astype(np.float32)
                )
        return out

    return score


@dataclass
class TwoStageResult:
    ranker: Ranker
    metrics: dict[str, dict[str, float]]
    candidate_recall: dict[str, float]
    ablation: dict[str, dict[str, float]] = field(default_factory=dict)
    columns: list[str] = field(default_factory=list)
    fit_stage: Stage | None = None
    test_stage: Stage | None = None


def fit_two_stage(
    cfg: RankConfig,
    embedding_train: Any | None = None,
    embedding_test: Any | None = None,
    extra: dict[str, tuple[Any, Any]] | None = None,
    ablation: bool = False,
    on: str = "test",
    data: Any = None,
) -> TwoStageResult:
    """Fit the ranker on the valid window's labels (and earlier windows') and score the test
    window; `extra` maps a name to (scorer fitted before valid, scorer fitted before test),
    evaluated in the same run with the same masks. `on="valid"` moves everything one window
    back (fit on the windows before valid, score valid): where settings are chosen, so that
    the test window is looked at once. `data` (an `Interactions`) replaces reading
    `cfg.data`."""
    from recfb.etl.interactions import as_interactions

    data = as_interactions(cfg.data if data is None else data)
    if data.valid.filter(pl.col("label") > 0).height == 0:
        raise InputError(
            "the valid split has no positive pairs to label the ranker with",
            file=str(data.directory or "<memory>"),
        )
    from recfb.rank.state import cut_points

    valid_ms, test_ms, _ = cut_points(data.stats)
    shift = 1 if on == "valid" else 0  # scoring valid: every fitting window moves back one
    first_cut = None
    if valid_ms is not None and test_ms is not None:  # the earliest label window's start
        first_cut = valid_ms - (cfg.ranker.label_windows - 1 + shift) * (test_ms - valid_ms)
    rates = DelayedRates(data, first_cut) if cfg.delay_corrected_rates else None
    if on == "valid":
        stages = _past_stages(
            data, cfg, embedding_train, rates, first_k=1, count=cfg.ranker.label_windows
        )
        if not stages:
            raise InputError(
                "scoring the valid window needs a temporal split with a window before it",
                file=str(data.directory or "<memory>"),
            )
        test = prepare(data, "train", data.valid, cfg, embedding_train, rates)
        heldout_split = data.valid
    else:
        first = prepare(data, "train", data.valid, cfg, embedding_train, rates)
        first.labels = graded_labels(first.candidates, data.valid)
        first.queries = first.candidates["user_idx"].to_numpy().astype(np.int64)
        count = cfg.ranker.label_windows - 1
        stages = [first, *_past_stages(data, cfg, embedding_train, rates, 1, count)]
        test = prepare(data, "valid", data.test, cfg, embedding_test, rates)
        heldout_split = data.test
    fit = _stacked(stages)
    y_fit = fit.labels
    users_fit = fit.candidates["user_idx"].to_numpy()
    groups = list(cfg.features)
    cols = select_columns(fit.columns, groups, list(SOURCES))
    ranker = _fit_ranker(fit, y_fit, users_fit, cols, cfg)
    ecfg = EvalConfig(ks=tuple(cfg.ks), exclude="signals", hidden_labels=test.snap.hidden_labels)
    heldout = heldout_split.with_columns(pl.col(PAIR).cast(pl.Int64))

    def metrics_of(score: ScoreFn) -> dict[str, float]:
        return full_ranking_metrics(
            score, test.snap.n_items, heldout, test.snap.pairs, data.level_names, ecfg
        )

    def two_stage_metrics(r: Ranker, rows: np.ndarray | None = None, x: np.ndarray | None = None):
        cands = test.candidates if rows is None else test.candidates.filter(pl.Series(rows))
        x = test.features if x is None else x
        pred = r.predict(x[:, [test.columns.index(c) for c in r.columns]])
        return metrics_of(
            list_scorer(
                cands["user_idx"].to_numpy(),
                cands["item_idx"].to_numpy(),
                pred,
                test.snap.n_items,
                test.sources.popularity,
            )
        )

    results: dict[str, dict[str, float]] = {"two_stage": two_stage_metrics(ranker)}
    src = test.sources
    if src.cascade is not None:
        results["cascade"] = metrics_of(src.cascade.score)
    if src.embedding is not None:
        results["embedding"] = metrics_of(src.embedding.score)
    results["popularity"] = metrics_of(src.popularity_score)
    hist = test.candidates.filter(pl.col("history_rank").is_not_null())
    results["history"] = metrics_of(
        list_scorer(
            hist["user_idx"].to_numpy(),
            hist["item_idx"].to_numpy(),
            -hist["history_rank"].to_numpy().astype(np.float64),
            test.snap.n_items,
            src.popularity,
        )
    )
    if src.embedding is not None:
        results["history_then_embedding"] = metrics_of(_history_then(hist, src.embedding.score))
    for name, pair in (extra or {}).items():
        scorer = pair[0] if on == "valid" else pair[1]
        results[name] = metrics_of(scorer.score)
        results[f"history_then_{name}"] = metrics_of(_history_then(hist, scorer.score))
    recall = _candidate_recall(test.candidates, heldout, test.snap)
    out = TwoStageResult(ranker, results, recall, columns=cols, fit_stage=fit, test_stage=test)
    if ablation:
        for g in groups:
            sub = select_columns(fit.columns, [x for x in groups if x != g], list(SOURCES))
            if sub == cols:
                continue
            out.ablation[f"-{g} features"] = two_stage_metrics(
                _fit_ranker(fit, y_fit, users_fit, sub, cfg)
            )
        for s in SOURCES:
            if fit.candidates[f"{s}_rank"].is_null().all():
                continue
            keep, x = without_source(fit.candidates, fit.features, fit.columns, s)
            sub = select_columns(fit.columns, groups, [o for o in SOURCES if o != s])
            r = Ranker.fit(
                x[:, [fit.columns.index(c) for c in sub]],
                y_fit[keep],
                users_fit[keep],
                sub,
                cfg.ranker,
                fit.queries[keep],
            )
            tkeep, tx = without_source(test.candidates, test.features, test.columns, s)
            out.ablation[f"-{s} source"] = two_stage_metrics(r, tkeep, tx)
    return out


def _fit_ranker(
    stage: Stage, y: np.ndarray, users: np.ndarray, cols: list[str], cfg: RankConfig
) -> Ranker:
    idx = [stage.columns.index(c) for c in cols]
    return Ranker.fit(stage.features[:, idx], y, users, cols, cfg.ranker, stage.queries)


def _history_then(hist: pl.DataFrame, score: ScoreFn) -> ScoreFn:
    """The heuristic: the user's own engaged items first (history order), then the model."""
    rows = hist.group_by("user_idx").agg("item_idx", "history_rank")
    own = {
        int(u): (np.asarray(i), np.asarray(r))
        for u, i, r in zip(rows["user_idx"], rows["item_idx"], rows["history_rank"], strict=True)
    }

    def scorer(batch: torch.Tensor) -> torch.Tensor:
        s = score(batch).float()
        lo, hi = s.min(dim=1, keepdim=True).values, s.max(dim=1, keepdim=True).values
        s = (s - lo) / (hi - lo).clamp(min=1e-9)  # in [0, 1]
        for j, u in enumerate(batch.tolist()):
            if u in own:
                items, ranks = own[u]
                s[j, torch.tensor(items, dtype=torch.long)] = torch.from_numpy(
                    1000.0 - ranks.astype(np.float32)
                )
        return s

    return scorer


def _candidate_recall(
    cands: pl.DataFrame, heldout: pl.DataFrame, snap: Snapshot
) -> dict[str, float]:
    """Share of the held-out positive pairs (not hidden) that each source, and all together,
    proposed: the ceiling the ranker works under."""
    pos = (
        heldout.filter(pl.col("label") > 0)
        .select(PAIR)
        .unique()
        .join(snap.hidden_pairs(), on=PAIR, how="anti")
    )
    if pos.height == 0:
        return {}
    joined = pos.join(cands, on=PAIR, how="left")
    out: dict[str, float] = {}
    any_col = pl.any_horizontal([pl.col(f"{s}_rank").is_not_null() for s in SOURCES])
    out["all"] = float(joined.select(any_col.mean()).item())
    for s in SOURCES:
        out[s] = float(joined[f"{s}_rank"].is_not_null().mean())
    return out


class _MappedVectors:
    """A model's vectors re-indexed into another ETL's vocabulary by id (unknown users get
    a zero vector, unknown items score -inf), so it can serve that ETL's snapshot."""

    def __init__(self, etl: str, user_ids, user_vectors, item_ids, item_vectors) -> None:
        users = pl.read_parquet(f"{etl}/users.parquet").sort("user_idx")["user_id"].cast(pl.String)
        items = pl.read_parquet(f"{etl}/items.parquet").sort("item_idx")["item_id"].cast(pl.String)
        urow = {u: i for i, u in enumerate(np.asarray(user_ids).astype(str))}
        irow = {t: i for i, t in enumerate(np.asarray(item_ids).astype(str))}
        dim = user_vectors.shape[1]
        self.users = np.zeros((len(users), dim), dtype=np.float32)
        self.items = np.zeros((len(items), dim), dtype=np.float32)
        self.known = np.zeros(len(items), dtype=bool)
        for j, u in enumerate(users.to_list()):
            if u in urow:
                self.users[j] = user_vectors[urow[u]]
        for j, t in enumerate(items.to_list()):
            if t in irow:
                self.items[j], self.known[j] = item_vectors[irow[t]], True

    def score(self, batch: torch.Tensor) -> torch.Tensor:
        s = torch.from_numpy(self.users[batch.numpy()] @ self.items.T)
        s[:, torch.from_numpy(~self.known)] = float("-inf")
        return s


def two_stage_lists(
    etl: str, vectors: Any, rank_dir: str, k: int, split: str = "test"
) -> dict[str, list[str]]:
    """Top-k item ids per user id of a two-stage model (its vectors and ranker) on the
    snapshot before `split` of `etl`: what the gate compares, for any model version."""
    import json

    from recfb.train.data import Interactions

    meta = json.loads((Path(rank_dir) / "rank.json").read_text())
    cfg = RankConfig.model_validate(meta["config"]).model_copy(update={"data": etl})
    data = Interactions.load(etl)
    holdout = {"test": data.test, "valid": data.valid}[split]
    upto = "valid" if split == "test" else "train"
    mapped = _MappedVectors(
        etl, vectors.user_ids, vectors.user_vectors, vectors.item_ids, vectors.item_vectors
    )
    stage = prepare(etl, upto, holdout, cfg, mapped)
    ranker = Ranker.load(Path(rank_dir) / "ranker.txt", meta["columns"])
    pred = ranker.predict(stage.features[:, [stage.columns.index(c) for c in ranker.columns]])
    # items the model's bundle does not know cannot be served by it (the service drops them
    # from history and the log), so they leave its list here too, however a source found them
    cand_items = stage.candidates["item_idx"].to_numpy()
    servable = mapped.known[cand_items]
    fill = np.where(mapped.known, stage.sources.popularity, -np.inf)
    score = list_scorer(
        stage.candidates["user_idx"].to_numpy()[servable],
        cand_items[servable],
        pred[servable],
        stage.snap.n_items,
        fill,
    )
    from recfb.evaluate import topk_items

    ecfg = EvalConfig(ks=(k,), exclude="signals", hidden_labels=stage.snap.hidden_labels)
    items, scores = topk_items(score, stage.snap.n_items, stage.users, stage.snap.pairs, ecfg, k)
    items[~torch.isfinite(scores)] = -1  # an item the model does not know
    user_ids = pl.read_parquet(f"{etl}/users.parquet").sort("user_idx")["user_id"].cast(pl.String)
    item_ids = pl.read_parquet(f"{etl}/items.parquet").sort("item_idx")["item_id"].cast(pl.String)
    uid, iid = user_ids.to_numpy(), item_ids.to_numpy()
    return {
        str(uid[u]): [str(iid[i]) for i in row if i >= 0]
        for u, row in zip(stage.users.tolist(), items.numpy(), strict=True)
    }

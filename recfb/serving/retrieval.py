"""What one request does with one bundle: fold recent events in, search, exclude, filter.

Fold-in. The query vector of a user is the ridge solution
    u = argmin_u  sum_e w_e (y_e - u.v_e)^2 + lambda ||u - u0||^2
over the items e the user engaged with in the event log, where u0 is the bundle's vector for
the user (zero for a user the bundle does not know), y_e is the manifest's `positive` target
score for a positive event and its `negative` target for an explicit negative or a refund,
w_e = level weight (negatives: `negative_weight`) x 0.5^(age / half_life), and
lambda = l2 x mean squared item norm. It is exact for any inner-product model (GNOLR included:
the solve happens in the concatenated query space), costs one d x d solve, and needs no
model code at serving time.

Exclusion. Explicit negatives and refunds that fall back to negative are always removed; beyond
them the rule `signals` (default) removes the levels the signal map says do not repeat (by
default the deepest: bought and not refunded; what was viewed or carted stays a candidate),
`purchased` the deepest level, `any` every item the user engaged with, `none` nothing more.
The bundle's pairs and the log's events are both applied.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from recfb.index import Bundle
from recfb.serving.config import ServeConfig
from recfb.serving.eventlog import LoggedEvent
from recfb.serving.rates import OnlineRates, RatesTable
from recfb.signals import SignalFold, as_signal_map, rule_labels


@dataclass
class Timings:
    """Seconds spent per stage of one request (exported as Prometheus histograms)."""

    stages: dict[str, float] = field(default_factory=dict)

    def add(self, stage: str, started: float) -> float:
        now = time.perf_counter()
        self.stages[stage] = self.stages.get(stage, 0.0) + now - started
        return now


class ServingBundle:
    """A bundle plus the lookup structures requests need, built once at load."""

    def __init__(self, bundle: Bundle, cfg: ServeConfig) -> None:
        self.bundle = bundle
        self.version = bundle.version
        self.cfg = cfg
        self.item_ids: np.ndarray = bundle.items["item_id"].to_numpy().astype(object)
        self.item_row = {iid: i for i, iid in enumerate(self.item_ids)}
        self.user_row = {
            uid: i for i, uid in enumerate(bundle.users["user_id"].to_numpy().astype(object))
        }
        self.category: dict[str, np.ndarray] = {}
        if "category" in bundle.items.columns:  # one pass, however many categories
            groups = (
                bundle.items.with_row_index("_row")
                .group_by(pl.col("category").cast(pl.Utf8).fill_null(""))
                .agg(pl.col("_row"))
            )
            for value, rows in zip(groups["category"], groups["_row"], strict=True):
                self.category[value] = np.asarray(rows, dtype=np.int64)
        self.popular = np.argsort(-bundle.items["popularity"].to_numpy(), kind="stable")
        self.pop_score = bundle.items["popularity"].to_numpy().astype(np.float32)
        smap = as_signal_map(bundle.signals, f"{bundle.path}/signals.json")
        self.n_levels = smap.n_levels
        self.level_weight = {i + 1: lv.weight for i, lv in enumerate(smap.levels)}
        # the ETL's fold, so that an online event means what it meant in training
        self.fold = SignalFold(smap)
        self.signals = smap.signals  # the event names the API accepts
        self.event_level = {name: rule.level for name, rule in self.fold.rules.items()}
        self.hidden_levels = self._hidden_levels(cfg.exclude)
        self.excluded = self._seen_exclusions(bundle.seen, self.hidden_levels)
        self._excluded_by_rule = {cfg.exclude: self.excluded}
        foldin = bundle.manifest["foldin"]
        self.target_pos, self.target_neg = foldin["positive"], foldin["negative"]
        self.ridge = cfg.foldin.l2 * foldin["item_sq_norm"]
        self.online = None  # the two-stage ranker, where the bundle carries one
        if bundle.manifest.get("two_stage"):
            from recfb.rank.online import OnlineRanker

            codes = None
            if "category" in bundle.items.columns:
                codes = (
                    bundle.items["category"]
                    .cast(pl.String)
                    .rank("dense")
                    .fill_null(0)
                    .cast(pl.Int64)
                    .to_numpy()
                    - 1
                )
            self.online = OnlineRanker(bundle.path, bundle.signals, codes)
        self.rates: OnlineRates | None = None
        if bundle.delays is not None and bundle.cascade_events is not None:
            segment = None
            if "category" in bundle.items.columns:
                segment = (
                    bundle.items["category"].cast(pl.Int64, strict=False).fill_null(-1).to_numpy()
                )
            self.rates = OnlineRates(
                bundle.delays,
                bundle.cascade_events,
                bundle.signals,
                self.item_row,
                self.user_row,
                segment,
                cfg.rates,
            )

    def _hidden_levels(self, rule: str) -> frozenset[int]:
        """Positive levels whose items are not shown again (explicit negatives: always)."""
        return frozenset(t for t in rule_labels(self.bundle.signals, rule) if t > 0)

    def exclusions(self, rule: str) -> dict[int, frozenset[int]]:
        """user row -> item rows the bundle's pairs exclude under `rule` (`signals`,
        `purchased`, `any`, `none`); the service's own rule is built at load, others once
        on first use (the library's `recommend(exclude=...)`)."""
        if rule not in self._excluded_by_rule:
            hidden = self._hidden_levels(rule)
            self._excluded_by_rule[rule] = self._seen_exclusions(self.bundle.seen, hidden)
        return self._excluded_by_rule[rule]

    def _seen_exclusions(
        self, seen: pl.DataFrame, hidden_levels: frozenset[int]
    ) -> dict[int, frozenset[int]]:
        """user row -> item rows excluded by the bundle's pairs under the rule (sets, built
        once here so that a request only unions them)."""
        hidden = [-1, *sorted(hidden_levels)]
        rows = (
            seen.filter(pl.col("label").is_in(hidden)).group_by("user_idx").agg(pl.col("item_idx"))
        )
        return {
            int(u): frozenset(items)
            for u, items in zip(rows["user_idx"].to_list(), rows["item_idx"].to_list(), strict=True)
        }

    def logged_rows(self, events: list[LoggedEvent]) -> list[tuple[int, str, int, int]]:
        """The logged events on items the bundle knows: (item row, event, level, ts ms)."""
        out = []
        for ev in events:
            row = self.item_row.get(ev.item_id)
            if row is not None and self.fold.keeps(ev.event, ev.value):
                out.append((row, ev.event, self.event_level[ev.event], ev.ts))
        return out

    # --- the user's online state ---------------------------------------------------------
    def session_state(self, events: list[LoggedEvent], now_ms: int) -> tuple[dict, set[int]]:
        """(item row -> (target, weight)) for the fold-in and the item rows to exclude.

        Each item's events fold into the ETL's pair state (`recfb.signals.SignalFold`:
        dwell noise dropped, cancellations matched, negative vs positive by recency); an
        item is excluded when its label is -1 or a hidden level (`exclusion_labels`)."""
        states = self.fold.fold(
            (row, ev.event, ev.ts, ev.value, ev.order_id)
            for ev in events
            if (row := self.item_row.get(ev.item_id)) is not None
        )
        half_life_ms = self.cfg.foldin.half_life_hours * 3_600_000
        targets: dict[int, tuple[float, float]] = {}
        exclude: set[int] = set()
        for row, state in states.items():
            decay = 0.5 ** (max(0, now_ms - state.last_ts) / half_life_ms)
            if state.negative:
                targets[row] = (self.target_neg, self.cfg.foldin.negative_weight * decay)
            elif state.level >= 1:
                targets[row] = (self.target_pos, self.level_weight[state.level] * decay)
            if state.label == -1 or state.label in self.hidden_levels:
                exclude.add(row)
        return targets, exclude

    def query_vector(self, user_row: int | None, targets: dict) -> np.ndarray | None:
        """The fold-in solution (the bundle vector when there is nothing to fold in)."""
        dim = self.bundle.item_vectors.shape[1]
        u0 = (
            self.bundle.user_vectors[user_row]
            if user_row is not None
            else np.zeros(dim, dtype=np.float32)
        )
        if not targets:
            return u0 if user_row is not None else None
        rows = np.fromiter(targets.keys(), dtype=np.int64)
        y = np.array([t[0] for t in targets.values()], dtype=np.float64)
        w = np.array([t[1] for t in targets.values()], dtype=np.float64)
        v = self.bundle.item_vectors[rows].astype(np.float64)
        a = (v * w[:, None]).T @ v + self.ridge * np.eye(dim)
        b = (v * w[:, None]).T @ y + self.ridge * u0.astype(np.float64)
        return np.linalg.solve(a, b).astype(np.float32)

    # --- ranking -------------------------------------------------------------------------
    def rank(
        self,
        query: np.ndarray | None,
        k: int,
        exclude: set[int],
        category: str | None,
        timings: Timings,
        allowed: np.ndarray | None = None,
    ) -> tuple[list[int], list[float]]:
        """Top-k item rows for a query vector (None: popularity), minus `exclude`, within
        `category` or the `allowed` rows."""
        started = time.perf_counter()
        if allowed is None and category is not None:
            allowed = self.category.get(category, np.empty(0, dtype=np.int64))
        n_items = len(self.item_ids)
        if query is None:
            fetch = (k + len(exclude)) * (4 if allowed is not None else 1) + 16
            while True:
                picked = _take(self.popular[:fetch], exclude, allowed, k)
                if len(picked) >= k or fetch >= n_items:
                    break
                fetch *= 4
            timings.add("filter", started)
            return picked, [float(self.pop_score[i]) for i in picked]
        if allowed is not None and len(allowed) <= self.cfg.exact_filter_below:
            # a narrow filter: exact scores over the allowed items beat over-fetching
            scores = self.bundle.item_vectors[allowed] @ query
            order = allowed[np.argsort(-scores, kind="stable")]
            started = timings.add("search", started)
            picked = _take(order, exclude, None, k)
            timings.add("filter", started)
            score_of = dict(zip(allowed.tolist(), scores.tolist(), strict=True))
            return picked, [score_of[i] for i in picked]
        fetch = min(n_items, (k + len(exclude)) * (4 if allowed is not None else 1) + 16)
        while True:
            dist, ids = self.bundle.index.search(query[None, :], fetch)
            started = timings.add("search", started)
            picked = _take(ids[0][ids[0] >= 0], exclude, allowed, k)
            started = timings.add("filter", started)
            if len(picked) >= k or fetch >= n_items:
                break
            fetch = min(n_items, fetch * 4)
        score_of = dict(zip(ids[0].tolist(), dist[0].tolist(), strict=True))
        return picked, [score_of[i] for i in picked]


def rerank(
    rows: list[int], scores: list[float], table: RatesTable, weight: float, floor: float, k: int
) -> tuple[list[int], list[float]]:
    """Order candidates by score + weight * log(max(corrected NetCVR, floor)); keep k."""
    if not rows:
        return rows, scores
    net = np.maximum(np.nan_to_num(table.netcvr[np.asarray(rows)], nan=floor), floor)
    blended = np.asarray(scores, dtype=np.float64) + weight * np.log(net)
    order = np.argsort(-blended, kind="stable")[:k]
    return [rows[i] for i in order], [float(blended[i]) for i in order]


def _take(order: np.ndarray, exclude: set[int], allowed: np.ndarray | None, k: int) -> list[int]:
    """The first k of `order` that are not excluded (and are allowed)."""
    if allowed is not None:
        order = order[np.isin(order, allowed)]
    if not exclude:
        return order[:k].tolist()
    # a few dozen candidates against a few excluded rows: a set beats np.isin's sorting
    out = []
    for row in order.tolist():
        if row not in exclude:
            out.append(row)
            if len(out) == k:
                break
    return out

"""The closed loop: a policy decides what simulated users see, and learns from what they did.

Timeline (simulated clock, hour by hour): `warmup_days` in which the simulator's own
exposure model shows the lists (the history every policy starts from, written as a parquet
log), then `days` in which the policy shows them. Every hour users arrive (Poisson by their
activity), each request shows `k` items plus some organic, popularity-driven views; the
simulator's funnel (`recfb.simulate.simulator.respond_to_views`, the batch simulator's own)
answers every view with clicks, dwell, likes, carts, purchases and refunds after their
delays; an event is posted to the service's event log (with `is_organic`) once its time
has come. Every `rates_every_hours` the served bundle's online rates are refreshed at the
simulated now (the hourly pipeline's cheap part); every `retrain_every_days` at midnight the
ETL reads the history plus the service's event log, the policy's model is refitted and the
service swaps to the new bundle (the nightly pipeline and the alias follower).

Metrics are computed from the simulator's truth, cohort-wise: the purchases and refunds
caused by the impressions of day d count for day d, whenever they happen.
Deterministic by seed: arrivals, views and responses come from random streams derived from
(seed, hour), the same for every policy (common random numbers).
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from recfb.config import apply_overrides, read_yaml, set_dotted
from recfb.errors import ConfigError
from recfb.loop.config import LoopConfig, PolicySpec
from recfb.loop.metrics import gini, top_share, true_ndcg
from recfb.loop.policies import Http, InProcess, Transport, rows_of
from recfb.serving.config import ServeConfig
from recfb.simulate.config import SimConfig
from recfb.simulate.simulator import (
    EVENT_TYPES,
    PURCHASE,
    REFUND,
    respond_to_views,
)
from recfb.simulate.world import Exposure, affinity_logit, build_world, rng_for, sigmoid

log = logging.getLogger("recfb.loop")
HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
STREAM_LAUNCH, STREAM_ARRIVALS, STREAM_RESPONSES, STREAM_RANDOM = 60, 61, 62, 63
_LIST_GAP_MS = 2_000  # between the views of one list


@dataclass
class LoopResult:
    """One policy, one seed. `daily`: one row per loop day; `events`: everything the users did
    that was due before the end (loop days: what was posted); `posted`: the event log after."""

    policy: str
    seed: int
    daily: pl.DataFrame
    summary: dict[str, float]
    wall_s: float
    events: pl.DataFrame
    posted: pl.DataFrame
    skipped: str | None = None
    notes: list[str] = field(default_factory=list)


# --- the policy's side: lists and learning -----------------------------------------------


class _Policy:
    """What a policy does at the loop's three moments: nightly, hourly, per request."""

    def __init__(self, shop: _Shop, transport: Transport) -> None:
        self.shop, self.transport = shop, transport

    def refit(self, now_ms: int) -> None:
        pass

    def hourly(self, now_ms: int) -> None:
        pass

    def lists(self, user_rows: np.ndarray, now_ms: int, rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError


class _Random(_Policy):
    def lists(self, user_rows, now_ms, rng):
        launched = self.shop.launched(now_ms)
        k = min(self.shop.cfg.k, launched.size)
        out = np.full((user_rows.size, self.shop.cfg.k), -1, dtype=np.int64)
        for i in range(user_rows.size):
            out[i, :k] = rng.choice(launched, size=k, replace=False)
        return out


class _Oracle(_Policy):
    """The k launched items of highest true net-purchase probability per view."""

    def lists(self, user_rows, now_ms, rng):
        shop = self.shop
        launched = shop.launched(now_ms)
        value = shop.net_value(user_rows, launched)
        k = min(shop.cfg.k, launched.size)
        top = np.argsort(-value, axis=1, kind="stable")[:, :k]
        out = np.full((user_rows.size, shop.cfg.k), -1, dtype=np.int64)
        out[:, :k] = launched[top]
        return out


class _Library(_Policy):
    """A training-free family (popularity, itemknn, cascade) through `recfb.Recommender`."""

    def __init__(self, shop: _Shop, transport: Transport, train: dict) -> None:
        super().__init__(shop, transport)
        self.train = train
        self.model: Any = None

    def refit(self, now_ms: int) -> None:
        from recfb.recommender import Recommender

        data = self.shop.etl(self.transport)
        self.model = Recommender.create(self.train["model"]["family"], self.train).fit(data)

    def lists(self, user_rows, now_ms, rng):
        users = [self.shop.user_id[r] for r in user_rows.tolist()]
        frame = self.model.recommend(users, k=self.shop.cfg.k)
        by_user: dict[str, list[str]] = {}
        for user, item in frame.select("user_id", "item_id").iter_rows():
            by_user.setdefault(user, []).append(item)
        return rows_of([by_user.get(u, []) for u in users], self.shop.item_row, self.shop.cfg.k)


class _Served(_Policy):
    """An embedding or two-stage bundle answered by the service's recommendation code."""

    def __init__(self, shop: _Shop, transport: Transport, train: dict, rank: dict | None):
        super().__init__(shop, transport)
        self.train, self.rank = train, rank
        self.n_fits = 0
        self.rates: Any = None

    def refit(self, now_ms: int) -> None:
        from recfb.recommender import Recommender, TwoStageRecommender

        data = self.shop.etl(self.transport)
        if self.rank is not None:
            model = TwoStageRecommender({"embedding": self.train, "rank": self.rank})
        else:
            model = Recommender.create(self.train["model"]["family"], self.train)
        model.fit(data)
        self.n_fits += 1
        target = self.shop.work / "models" / f"bundle-{self.n_fits:03d}"
        if target.exists():
            shutil.rmtree(target)
        model.save(target)
        self.transport.load(target)
        self.hourly(now_ms)

    def hourly(self, now_ms: int) -> None:
        self.rates = self.transport.refresh_rates(now_ms)

    def lists(self, user_rows, now_ms, rng):
        users = [self.shop.user_id[r] for r in user_rows.tolist()]
        lists = self.transport.recommend(users, self.shop.cfg.k, now_ms)
        return rows_of(lists, self.shop.item_row, self.shop.cfg.k)


# --- the simulated shop ------------------------------------------------------------------


class _Events:
    """Events not yet due (struct of arrays), released hour by hour in time order."""

    KEYS = ("event_id", "user_row", "item_row", "code", "ts", "value", "order", "organic")

    def __init__(self) -> None:
        self.parts: list[dict[str, np.ndarray]] = []

    def add(self, part: dict[str, np.ndarray]) -> None:
        if part["ts"].size:
            self.parts.append(part)

    def due(self, end_ms: int) -> dict[str, np.ndarray]:
        """Remove and return the events timed before `end_ms`, by (ts, event_id)."""
        if not self.parts:
            dtype = {"value": np.float64, "organic": bool}
            return {k: np.empty(0, dtype=dtype.get(k, np.int64)) for k in self.KEYS}
        allp = {k: np.concatenate([p[k] for p in self.parts]) for k in self.KEYS}
        now = allp["ts"] < end_ms
        later = {k: v[~now] for k, v in allp.items()}
        self.parts = [later] if later["ts"].size else []
        due = {k: v[now] for k, v in allp.items()}
        order = np.lexsort((due["event_id"], due["ts"]))
        return {k: v[order] for k, v in due.items()}


class _Shop:
    """The world, its launches, arrivals and the event stream of one seed."""

    def __init__(self, cfg: LoopConfig, seed: int, work: Path) -> None:
        self.cfg, self.seed, self.work = cfg, seed, work
        total_days = cfg.warmup_days + cfg.days
        self.sim = SimConfig.model_validate({**cfg.world, "seed": seed, "days": total_days})
        self.world = build_world(self.sim)
        w = self.world
        self.start_ms = self.sim.start_ms()
        self.loop_start_ms = self.start_ms + cfg.warmup_days * DAY_MS
        rng = rng_for(seed, STREAM_LAUNCH)
        new = rng.random(w.n_items) < cfg.new_item_share
        launch_day = cfg.warmup_days + rng.random(w.n_items) * cfg.days
        self.launch_ms = np.where(new, self.start_ms + (launch_day * DAY_MS).astype(np.int64), 0)
        self.is_new = new
        self.user_id = [str(u) for u in w.user_ids.tolist()]
        self.item_id = [str(i) for i in w.item_ids.tolist()]
        self.item_row = {x: i for i, x in enumerate(self.item_id)}
        self._exposure: tuple[int, Exposure] | None = None
        self.next_event = 0
        self.next_order = 0
        self.history_dir = work / "history"
        self.log_path = work / "events.db"

    def launched(self, now_ms: int) -> np.ndarray:
        return np.flatnonzero(self.launch_ms <= now_ms)

    def exposure(self, now_ms: int) -> Exposure:
        """The simulator's exposure model over the items launched by now (rebuilt on launch)."""
        n = int((self.launch_ms <= now_ms).sum())
        if self._exposure is None or self._exposure[0] != n:
            pop = np.where(self.launch_ms <= now_ms, self.world.item_popularity, 0.0)
            world = replace(self.world, item_popularity=pop)
            self._exposure = (n, Exposure(world, self.sim))
        return self._exposure[1]

    def logits(self, user_rows: np.ndarray, item_rows: np.ndarray) -> np.ndarray:
        w = self.world
        return affinity_logit(
            w.user_latent, w.item_latent, w.item_bias, self.sim.affinity_scale, user_rows, item_rows
        )

    def logit_matrix(self, user_rows: np.ndarray, item_rows: np.ndarray) -> np.ndarray:
        w = self.world
        dots = w.user_latent[user_rows] @ w.item_latent[item_rows].T
        return self.sim.affinity_scale * dots + w.item_bias[item_rows][None, :]

    def net_value(self, user_rows: np.ndarray, item_rows: np.ndarray) -> np.ndarray:
        """True expected net purchases of one view, P(click) P(buy|click) (1 - P(refund))."""
        s, w = self.sim, self.world
        a = self.logit_matrix(user_rows, item_rows)
        click = sigmoid(a + s.click_logit)
        buy = sigmoid(a + w.item_cvr_logit[item_rows][None, :] + s.purchase_logit)
        refund = sigmoid(w.item_refund_logit[item_rows][None, :] - s.refund_affinity * a)
        return click * buy * (1.0 - refund)

    def etl(self, transport: Transport) -> Any:
        """The retrain's ETL: the history log plus the service's event log."""
        from recfb import etl

        return etl.run(
            [str(self.history_dir), str(self.log_path)],
            self.cfg.signals,
            split={"method": "temporal", "valid_frac": self.cfg.valid_frac, "test_frac": 0.0},
        )

    def event_dicts(self, ev: dict[str, np.ndarray]) -> list[dict]:
        """Events in the API's schema (ts as ISO text, as a client would send them)."""
        out = []
        names = EVENT_TYPES
        for eid, u, i, c, ts, value, order, organic in zip(
            *(ev[k].tolist() for k in _Events.KEYS), strict=True
        ):
            d = {
                "event_id": f"{self.seed}-{eid}",
                "user_id": self.user_id[u],
                "item_id": self.item_id[i],
                "event": names[c],
                "ts": ts / 1000.0,
                "is_organic": bool(organic),
            }
            if not math.isnan(value):
                d["value"] = value
            if order >= 0:
                d["order_id"] = f"o{self.seed}-{order}"
            out.append(d)
        return out


# --- the loop ----------------------------------------------------------------------------


def build_policy(cfg: LoopConfig, spec: PolicySpec, shop: _Shop, transport: Transport) -> _Policy:
    """The policy object of a spec; ConfigError when its overrides do not validate."""
    from recfb.rank.config import RankConfig
    from recfb.train.config import TrainConfig

    if spec.kind == "random":
        return _Random(shop, transport)
    if spec.kind == "oracle":
        return _Oracle(shop, transport)
    base = read_yaml(cfg.train_config)
    if spec.kind == "library":  # a training-free family takes none of the embedding's keys
        base["model"] = {"family": spec.family}
    train = apply_overrides(base, [*cfg.train_overrides, *spec.train])
    train.pop("data", None)
    if spec.kind != "library":
        set_dotted(train, "model.family", spec.family if spec.family != "two_stage" else "mf")
    set_dotted(train, "seed", shop.seed)
    try:
        train = TrainConfig.model_validate(train).model_dump(mode="json")
    except Exception as exc:
        raise ConfigError(f"train overrides {spec.train}: {exc}") from None
    if spec.kind == "library":
        return _Library(shop, transport, train)
    rank = None
    if spec.family == "two_stage":
        rank = apply_overrides(read_yaml(cfg.rank_config), [*cfg.rank_overrides, *spec.rank])
        try:
            rank = RankConfig.model_validate(rank).model_dump(mode="json")
        except Exception as exc:
            raise ConfigError(f"rank overrides {spec.rank}: {exc}") from None
    return _Served(shop, transport, train, rank)


def serve_config(work: Path, spec: PolicySpec) -> ServeConfig:
    """The service of one loop: its own event log and model store, rates on the data clock
    (the loop refreshes them at the simulated hour; no background refresh)."""
    data: dict = {
        "event_log": str(work / "events.db"),
        "models_dir": str(work / "models"),
        "synchronous": "NORMAL",
        "allow_unsigned": True,
        "mmap": False,
        "fast_path": False,
        "rates": {"clock": "data", "refresh_s": 1e12},
    }
    apply_overrides(data, spec.serve)
    try:
        return ServeConfig.model_validate(data)
    except Exception as exc:
        raise ConfigError(f"serve overrides {spec.serve}: {exc}") from None


def _write_history(shop: _Shop, ev: dict[str, np.ndarray], part: int) -> None:
    """Warm-up events as a canonical parquet part of the history log."""
    shop.history_dir.mkdir(parents=True, exist_ok=True)
    d = shop.event_dicts(ev)
    frame = pl.DataFrame(
        {
            "event_id": [x["event_id"] for x in d],
            "user_id": [x["user_id"] for x in d],
            "item_id": [x["item_id"] for x in d],
            "event": [x["event"] for x in d],
            "ts": pl.Series(ev["ts"].astype(np.int64)).cast(pl.Datetime("ms")),
            "value": pl.Series(ev["value"].astype(np.float64), nan_to_null=True),
            "order_id": [x.get("order_id") for x in d],
            "is_organic": ev["organic"].astype(bool),
        }
    )
    frame.write_parquet(shop.history_dir / f"part-{part:05d}.parquet")


class _Tally:
    """Running truth and per-day measures of the loop days."""

    def __init__(self, shop: _Shop) -> None:
        n = shop.world.n_items
        self.shop = shop
        self.clicks = np.zeros(n)
        self.p_buy = np.zeros(n)
        self.buys = np.zeros(n)
        self.p_ref = np.zeros(n)
        self.first_shown = np.full(n, -1, dtype=np.int64)
        self.days: list[dict[str, float]] = []
        self.day: dict[str, Any] = {}

    def start_day(self) -> None:
        n = self.shop.world.n_items
        self.day = {"impr": np.zeros(n), "buys": 0, "refunds": 0, "ndcg": [], "lists": 0}


def run_loop(
    cfg: LoopConfig,
    policy: str,
    seed: int,
    work_dir: str | Path,
    *,
    http: bool = False,
    progress: Callable[[str], None] | None = None,
) -> LoopResult:
    """Run one policy for one seed; `work_dir` receives the history, event log and bundles
    (replaced if it exists). A policy whose overrides do not validate is skipped with the
    reason (`LoopResult.skipped`), not an error."""
    started = time.perf_counter()
    if policy not in cfg.policies:
        raise ConfigError(f"loop: unknown policy {policy!r}; known: {sorted(cfg.policies)}")
    spec = cfg.policies[policy]
    work = Path(work_dir)
    if work.exists():
        shutil.rmtree(work)
    (work / "models").mkdir(parents=True)
    shop = _Shop(cfg, seed, work)
    empty = pl.DataFrame()
    try:
        serve_cfg = serve_config(work, spec)
        transport: Transport = Http(serve_cfg) if http else InProcess(serve_cfg)
    except ConfigError as exc:
        log.warning("policy %s skipped: %s", policy, exc)
        return LoopResult(
            policy, seed, empty, {}, 0.0, empty, empty, skipped=" ".join(str(exc).split())
        )
    try:
        try:
            pol = build_policy(cfg, spec, shop, transport)
        except ConfigError as exc:
            log.warning("policy %s skipped: %s", policy, exc)
            return LoopResult(
                policy, seed, empty, {}, 0.0, empty, empty, skipped=" ".join(str(exc).split())
            )
        result = _simulate(cfg, shop, pol, transport, progress)
        posted = _posted(shop)
    finally:
        transport.close()
    daily, events = result
    summary = _summary(daily, shop)
    return LoopResult(policy, seed, daily, summary, time.perf_counter() - started, events, posted)


def _simulate(
    cfg: LoopConfig,
    shop: _Shop,
    pol: _Policy,
    transport: Transport,
    progress: Callable[[str], None] | None,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    w, s = shop.world, shop.sim
    pending = _Events()
    tally = _Tally(shop)
    due_record: list[dict[str, np.ndarray]] = []
    hours = (cfg.warmup_days + cfg.days) * 24
    warm: list[dict[str, np.ndarray]] = []
    for hour in range(hours):
        t0 = shop.start_ms + hour * HOUR_MS
        day, hod = divmod(hour, 24)
        in_loop = day >= cfg.warmup_days
        loop_day = day - cfg.warmup_days
        if in_loop and hod == 0:
            if loop_day % cfg.retrain_every_days == 0:
                if progress:
                    progress(f"day {loop_day}: retrain")
                pol.refit(t0)
            if loop_day > 0:
                tally.days.append(_close_day(tally, loop_day - 1, pol, t0))
            tally.start_day()
        elif in_loop and hod % cfg.rates_every_hours == 0:
            pol.hourly(t0)

        arrivals = rng_for(shop.seed, STREAM_ARRIVALS, hour)
        lam = w.user_activity * cfg.sessions_per_day / 24.0
        n_sess = arrivals.poisson(lam)
        users = np.repeat(np.arange(w.n_users), n_sess)
        sess_ts = t0 + np.sort(arrivals.integers(0, HOUR_MS, users.size))
        n_org = arrivals.poisson(cfg.organic_views, users.size)
        exposure = shop.exposure(t0)
        if in_loop:
            lists = pol.lists(users, t0, rng_for(shop.seed, STREAM_RANDOM, hour))
        else:  # the simulator's own (targeted, popularity-driven) exposure
            flat, _ = exposure.sample_views(arrivals, np.repeat(users, cfg.k))
            lists = flat.reshape(users.size, cfg.k)
        k = cfg.k
        shown = lists >= 0
        lu = np.repeat(users, k)[shown.ravel()]
        li = lists.ravel()[shown.ravel()]
        pos = np.tile(np.arange(k), users.size)[shown.ravel()]
        lts = np.repeat(sess_ts, k)[shown.ravel()] + pos * _LIST_GAP_MS
        ou = np.repeat(users, n_org)
        oi = exposure.sample_global(arrivals, ou.size)
        ots = np.repeat(sess_ts, n_org) + arrivals.integers(1_000, 600_000, ou.size)
        vu = np.concatenate([lu, ou])
        vi = np.concatenate([li, oi])
        v_ts = np.concatenate([lts, ots])
        organic = np.zeros(vu.size, dtype=bool)
        organic[lu.size :] = True
        a = shop.logits(vu, vi)
        resp = respond_to_views(
            rng_for(shop.seed, STREAM_RESPONSES, hour),
            s,
            w,
            vi,
            a,
            v_ts,
            np.zeros(vu.size, dtype=bool),
            0.0,
        )
        c = resp.cols
        n_ev = c["ts"].size
        order = np.full(n_ev, -1, dtype=np.int64)
        has = c["order"] >= 0
        # purchases number their orders in row order; refunds point at their purchase's row
        buy_rows = np.flatnonzero(c["code"] == PURCHASE)
        order_of_row = np.full(n_ev, -1, dtype=np.int64)
        order_of_row[buy_rows] = shop.next_order + np.arange(buy_rows.size)
        order[has] = order_of_row[c["order"][has]]
        shop.next_order += buy_rows.size
        pending.add(
            {
                "event_id": shop.next_event + np.arange(n_ev, dtype=np.int64),
                "user_row": vu[c["view"]],
                "item_row": vi[c["view"]],
                "code": c["code"].astype(np.int64),
                "ts": c["ts"],
                "value": c["value"],
                "order": order,
                "organic": organic[c["view"]],
            }
        )
        shop.next_event += n_ev
        _count_truth(tally, resp, vi)
        if in_loop:
            _count_day(tally, shop, users, lists, lu.size, resp, t0)

        due = pending.due(t0 + HOUR_MS)
        if in_loop and due["ts"].size:
            transport.post(shop.event_dicts(due))
            due_record.append(due)
        elif not in_loop:
            warm.append(due)
            if hod == 23:  # one history part per warm-up day
                _write_history(shop, {k: np.concatenate([d[k] for d in warm]) for k in due}, day)
                warm = []
        if progress and hod == 23:
            progress(f"{'loop' if in_loop else 'warm-up'} day {loop_day if in_loop else day}")
    end = shop.start_ms + hours * HOUR_MS
    tally.days.append(_close_day(tally, cfg.days - 1, pol, end))
    daily = pl.DataFrame(tally.days)
    events = _events_frame(shop, due_record)
    return daily, events


def _count_truth(tally: _Tally, resp: Any, vi: np.ndarray) -> None:
    """Per item: genuine clicks with their true P(buy), purchases with their true P(refund).
    Accidental clicks (true P(buy) 0) are left out: their short dwell makes the signal map
    drop them before any rate sees them."""
    n = tally.shop.world.n_items
    genuine = resp.click_p_buy > 0
    items = vi[resp.click_views[genuine]]
    tally.clicks += np.bincount(items, minlength=n)
    tally.p_buy += np.bincount(items, weights=resp.click_p_buy[genuine], minlength=n)
    tally.buys += np.bincount(resp.buy_items, minlength=n)
    tally.p_ref += np.bincount(resp.buy_items, weights=resp.buy_p_ref, minlength=n)


def _count_day(
    tally: _Tally,
    shop: _Shop,
    users: np.ndarray,
    lists: np.ndarray,
    n_list_views: int,
    resp: Any,
    t0: int,
) -> None:
    """Impressions, their purchases and refunds (whenever they happen), list quality."""
    d = tally.day
    shown = lists[lists >= 0]
    d["impr"] += np.bincount(shown, minlength=shop.world.n_items)
    d["lists"] += users.size
    code, view = resp.cols["code"], resp.cols["view"]
    from_list = view < n_list_views
    d["buys"] += int(np.sum((code == PURCHASE) & from_list))
    d["refunds"] += int(np.sum((code == REFUND) & from_list))
    fresh = tally.first_shown[shown] < 0
    tally.first_shown[shown[fresh]] = t0
    if users.size:
        launched = shop.launched(t0)
        gain_all = sigmoid(shop.logit_matrix(users, launched))
        k = lists.shape[1]
        best = -np.sort(-gain_all, axis=1)[:, :k]
        col = np.full(shop.world.n_items, -1, dtype=np.int64)
        col[launched] = np.arange(launched.size)
        idx = np.where(lists >= 0, col[np.maximum(lists, 0)], -1)
        gains = np.where(idx >= 0, np.take_along_axis(gain_all, np.maximum(idx, 0), 1), np.nan)
        d["ndcg"].append(true_ndcg(gains, best))


def _close_day(tally: _Tally, loop_day: int, pol: _Policy, now_ms: int) -> dict[str, float]:
    shop, d = tally.shop, tally.day
    launched = shop.launched(now_ms)
    impr = d["impr"][launched]
    n_impr = float(impr.sum())
    ndcg = np.concatenate(d["ndcg"]) if d["ndcg"] else np.array([np.nan])
    per_k = 1000.0 / n_impr if n_impr else float("nan")
    new = np.flatnonzero(shop.is_new & (shop.launch_ms <= now_ms))
    shown_new = new[tally.first_shown[new] >= 0]
    wait = (tally.first_shown[shown_new] - shop.launch_ms[shown_new]) / DAY_MS
    row = {
        "day": loop_day,
        "requests": float(d["lists"]),
        "impressions": n_impr,
        "purchases_per_1k": d["buys"] * per_k,
        "refunds_per_1k": d["refunds"] * per_k,
        "net_purchases_per_1k": (d["buys"] - d["refunds"]) * per_k,
        "true_ndcg": float(np.nanmean(ndcg)) if np.isfinite(ndcg).any() else float("nan"),
        "gini": gini(impr),
        "top1pct_share": top_share(impr, 0.01),
        "coverage": float(np.mean(impr > 0)) if impr.size else float("nan"),
        "new_items_launched": float(new.size),
        "new_items_discovered": float(shown_new.size),
        "new_item_discovery_days": float(wait.mean()) if wait.size else float("nan"),
    }
    row |= _rate_error(tally, pol, new)
    return row


def _rate_error(tally: _Tally, pol: _Policy, new: np.ndarray) -> dict[str, float]:
    """Mean absolute error of the served NetCVR (corrected and naive) of the items launched
    during the loop that the bundle knows, against their true NetCVR so far."""
    out = {"new_item_netcvr_mae": float("nan"), "new_item_netcvr_naive_mae": float("nan")}
    table = getattr(pol, "rates", None)
    served = getattr(getattr(pol.transport, "service", None), "current", None)
    if table is None or served is None or not new.size:
        return out
    shop = tally.shop
    rows, truth = [], []
    for item in new.tolist():
        r = served.item_row.get(shop.item_id[item])
        if r is None or tally.clicks[item] == 0:
            continue
        cvr = tally.p_buy[item] / tally.clicks[item]
        refund = tally.p_ref[item] / tally.buys[item] if tally.buys[item] else 0.0
        rows.append(r)
        truth.append(cvr * (1.0 - refund))
    if not rows:
        return out
    idx, t = np.asarray(rows), np.asarray(truth)
    corrected = table.frame["netcvr_corrected"].to_numpy()[idx]
    naive = table.frame["netcvr_naive"].to_numpy()[idx]
    out["new_item_netcvr_mae"] = float(np.nanmean(np.abs(corrected - t)))
    out["new_item_netcvr_naive_mae"] = float(np.nanmean(np.abs(naive - t)))
    return out


def _events_frame(shop: _Shop, parts: list[dict[str, np.ndarray]]) -> pl.DataFrame:
    """What the simulated users did in the loop days (as posted), one row per event."""
    rows = [e for p in parts for e in shop.event_dicts(p)]
    schema = {
        "event_id": pl.String,
        "user_id": pl.String,
        "item_id": pl.String,
        "event": pl.String,
        "ts_ms": pl.Int64,
        "value": pl.Float64,
        "order_id": pl.String,
        "is_organic": pl.Boolean,
    }
    return pl.DataFrame(
        [
            (
                r["event_id"],
                r["user_id"],
                r["item_id"],
                r["event"],
                round(r["ts"] * 1000),
                r.get("value"),
                r.get("order_id"),
                r["is_organic"],
            )
            for r in rows
        ],
        schema=schema,
        orient="row",
    )


def _posted(shop: _Shop) -> pl.DataFrame:
    """The service's event log as it stands (read directly, for the tests and reports)."""
    import sqlite3

    with sqlite3.connect(shop.log_path) as conn:
        cols = [r[1] for r in conn.execute("PRAGMA table_info(events)")]
        rows = conn.execute(f"SELECT {', '.join(cols)} FROM events ORDER BY rowid").fetchall()
    return pl.DataFrame(rows, schema=cols, orient="row", infer_schema_length=None)


def _summary(daily: pl.DataFrame, shop: _Shop) -> dict[str, float]:
    """Means over the loop days, plus the last day's concentration."""
    if daily.is_empty():
        return {}
    out = {
        f"mean_{c}": float(np.nanmean(daily[c].to_numpy()))
        if daily[c].is_not_nan().any()
        else float("nan")
        for c in daily.columns
        if c != "day"
    }
    last = daily.row(-1, named=True)
    for key in ("gini", "top1pct_share", "coverage", "new_items_discovered"):
        out[f"last_{key}"] = float(last[key])
    return out

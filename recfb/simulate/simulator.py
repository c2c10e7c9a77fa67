"""Deterministic generator of an implicit-feedback event log with known ground truth.

The log is generated in chunks of users (each chunk with its own random stream derived from
``(seed, chunk index)``), so memory stays bounded and the same config always gives byte-identical
files. Everything is written into a temporary directory beside ``out_dir`` and renamed into place
at the end, so a reader never sees a half-written simulation.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recfb.simulate.config import MS_PER_DAY, SimConfig
from recfb.simulate.world import (
    STREAM_CHUNK,
    STREAM_PILOT,
    Exposure,
    World,
    affinity_logit,
    build_world,
    rng_for,
    sigmoid,
    users_table,
)

EVENT_TYPES: tuple[str, ...] = (
    "view",
    "click",
    "like",
    "cart",
    "purchase",
    "refund",
    "dislike",
    "unlike",
    "undislike",
)
(VIEW, CLICK, LIKE, CART, PURCHASE, REFUND, DISLIKE, UNLIKE, UNDISLIKE) = range(len(EVENT_TYPES))

NOISE_LABELS: tuple[str, ...] = ("accidental_click", "random_positive")  # codes 1 and 2; 0 = none
_NOISE_NONE, _NOISE_ACCIDENTAL, _NOISE_RANDOM = 0, 1, 2

EVENTS_SCHEMA = pa.schema(
    [
        pa.field("event_id", pa.int64(), nullable=False),
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("event", pa.string(), nullable=False),
        pa.field("ts", pa.timestamp("ms"), nullable=False),
        pa.field("value", pa.float64()),
        pa.field("order_id", pa.string()),
        pa.field("category", pa.int32(), nullable=False),
        pa.field("is_organic", pa.bool_(), nullable=False),
    ]
)
TRUTH_EVENTS_SCHEMA = pa.schema(
    [
        pa.field("event_id", pa.int64(), nullable=False),
        pa.field("noise", pa.string()),
        pa.field("p_purchase", pa.float64()),
        pa.field("p_refund", pa.float64()),
        pa.field("true_affinity", pa.float64(), nullable=False),
    ]
)
CENSORED_SCHEMA = pa.schema(list(EVENTS_SCHEMA) + list(TRUTH_EVENTS_SCHEMA)[1:])

_EVENT_NAMES = pa.array(EVENT_TYPES, pa.string())
_NOISE_NAMES = pa.array((None, *NOISE_LABELS), pa.string())
_PILOT_SIZE = 100_000
_CLICK_DELAY_MEDIAN_S = 4.0  # view -> click
_DISLIKE_DELAY_MEDIAN_S = 8.0  # view -> dislike
_MAX_DELAY_S = 100 * 365 * 86_400.0  # keeps int64 milliseconds far from overflow
_COMPRESSION = "zstd"


@dataclass(frozen=True)
class SimResult:
    """Where the simulation was written and what it contains.

    ``n_events``, ``event_counts`` and ``noise_counts`` count unique emitted events (noise counts
    are events carrying that truth label, all event types); ``n_rows`` adds the duplicates.
    """

    out_dir: Path
    events_dir: Path
    truth_dir: Path
    parts: tuple[Path, ...]
    n_rows: int
    n_events: int
    n_duplicates: int
    n_censored: int
    event_counts: dict[str, int]
    noise_counts: dict[str, int]
    start: str
    end: str


@dataclass(frozen=True)
class _Plan:
    """Rates derived from a pilot sample so that the log lands near ``n_events`` rows."""

    views_per_activity: float  # expected ordinary views of a user with activity 1
    random_positive_rate: float  # extra random-positive views per ordinary view
    a_neutral: float  # affinity logit used for random positives (mean over genuine clicks)
    rows_per_view: float  # expected emitted rows per ordinary view, everything included


class _Clock:
    """Samples view times over the window with a daily cycle, by inverting a tabulated CDF."""

    def __init__(self, cfg: SimConfig) -> None:
        hours = cfg.days * 24.0
        n = max(4097, int(hours * 12) + 1)  # 5-minute resolution
        t = np.linspace(0.0, hours, n)
        start_hour = (cfg.start_ms() % MS_PER_DAY) / 3_600_000.0
        w = 2.0 * math.pi / 24.0
        phase = start_hour - cfg.daily_peak_hour
        cdf = t + cfg.daily_amplitude / w * (np.sin(w * (t + phase)) - math.sin(w * phase))
        self._cdf = cdf / cdf[-1]
        self._t_ms = t * 3_600_000.0
        self._window_ms = round(cfg.days * MS_PER_DAY)

    def offsets_ms(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Offsets from the window start, int64 ms in [0, window)."""
        t = np.interp(rng.random(n), self._cdf, self._t_ms)
        return np.minimum(t.astype(np.int64), self._window_ms - 1)


def _delay_ms(seconds: np.ndarray) -> np.ndarray:
    """Seconds -> int64 ms, at least 1 so that a child event is strictly after its parent."""
    ms = np.rint(np.minimum(seconds, _MAX_DELAY_S) * 1000.0).astype(np.int64)
    return np.maximum(ms, 1)


def _lognormal_s(rng: np.random.Generator, median_s: float, sigma: float, n: int) -> np.ndarray:
    return median_s * np.exp(sigma * rng.standard_normal(n))


def _plan(cfg: SimConfig, world: World, exposure: Exposure) -> _Plan:
    """Estimate the expected rows per view on a pilot sample of exposures.

    Uses the funnel's exact per-view expectations (not a Monte-Carlo of outcomes) so the
    estimate is tight; right censoring is ignored, which makes the log a little smaller.
    """
    rng = rng_for(cfg.seed, STREAM_PILOT)
    p_user = world.user_activity / world.user_activity.sum()
    users = rng.choice(world.n_users, size=_PILOT_SIZE, p=p_user)
    items, _ = exposure.sample_views(rng, users)
    a = affinity_logit(
        world.user_latent, world.item_latent, world.item_bias, cfg.affinity_scale, users, items
    )
    p_click = sigmoid(a + cfg.click_logit)
    p_acc = (1.0 - p_click) * cfg.noise_click_rate
    p_buy = sigmoid(a + world.item_cvr_logit[items] + cfg.purchase_logit)
    p_ref = sigmoid(world.item_refund_logit[items] - cfg.refund_affinity * a)
    after_click = (
        sigmoid(a + cfg.like_logit) * (1.0 + cfg.unlike_rate)
        + sigmoid(a + cfg.cart_logit)
        + p_buy * (1.0 + p_ref)
    )
    p_dislike = sigmoid(cfg.dislike_logit - cfg.dislike_affinity * a)
    rows_view = (
        1.0
        + p_click
        + p_acc
        + p_click * after_click
        + (1.0 - p_click) * (1.0 - cfg.noise_click_rate) * p_dislike * (1.0 + cfg.undislike_rate)
    )
    a_neutral = float(np.sum(p_click * a) / np.sum(p_click))

    rand_items = exposure.sample_global(rng, _PILOT_SIZE)
    rp_buy = sigmoid(a_neutral + world.item_cvr_logit[rand_items] + cfg.purchase_logit)
    rp_ref = sigmoid(world.item_refund_logit[rand_items] - cfg.refund_affinity * a_neutral)
    rows_rp = (
        2.0
        + sigmoid(a_neutral + cfg.like_logit) * (1.0 + cfg.unlike_rate)
        + sigmoid(a_neutral + cfg.cart_logit)
        + float(np.mean(rp_buy * (1.0 + rp_ref)))
    )
    share = cfg.noise_positive_share
    rp_rate = share * float(np.mean(p_click) + np.mean(p_acc)) / (1.0 - share)
    rows_per_view = (float(np.mean(rows_view)) + rp_rate * rows_rp) * (1.0 + cfg.duplicate_rate)
    views = cfg.n_events / rows_per_view
    return _Plan(
        views_per_activity=views / float(world.user_activity.sum()),
        random_positive_rate=rp_rate,
        a_neutral=a_neutral,
        rows_per_view=rows_per_view,
    )


def _chunk_bounds(cfg: SimConfig, world: World, plan: _Plan) -> list[tuple[int, int]]:
    """Contiguous user ranges with about ``chunk_events`` expected rows each."""
    rows = plan.views_per_activity * world.user_activity * plan.rows_per_view
    before = np.cumsum(rows) - rows
    chunk_of = (before // cfg.chunk_events).astype(np.int64)
    cuts = np.flatnonzero(np.diff(chunk_of)) + 1
    edges = [0, *cuts.tolist(), world.n_users]
    return list(zip(edges[:-1], edges[1:], strict=True))


class _Segments:
    """Accumulates events type by type (struct of arrays), then concatenates them."""

    def __init__(self) -> None:
        self.n = 0
        self._cols: dict[str, list[np.ndarray]] = {
            k: [] for k in ("code", "view", "ts", "value", "noise", "p_buy", "p_ref", "order")
        }

    def add(
        self,
        code: int,
        view: np.ndarray,
        ts: np.ndarray,
        noise: np.ndarray,
        value: np.ndarray | None = None,
        p_buy: np.ndarray | None = None,
        p_ref: np.ndarray | None = None,
        order: np.ndarray | None = None,
    ) -> int:
        """Append one event type; returns the row offset of its first event."""
        n = view.size
        nan = np.full(n, np.nan)
        c = self._cols
        c["code"].append(np.full(n, code, dtype=np.int8))
        c["view"].append(view)
        c["ts"].append(ts)
        c["noise"].append(noise.astype(np.int8, copy=False))
        c["value"].append(nan if value is None else value)
        c["p_buy"].append(nan if p_buy is None else p_buy)
        c["p_ref"].append(nan if p_ref is None else p_ref)
        c["order"].append(np.full(n, -1, dtype=np.int64) if order is None else order)
        start = self.n
        self.n += n
        return start

    def concat(self) -> dict[str, np.ndarray]:
        return {k: np.concatenate(v) for k, v in self._cols.items()}


@dataclass
class _Chunk:
    """One chunk's simulated events, sorted by time; the first ``n_emitted`` are observed."""

    cols: dict[str, np.ndarray]
    n_emitted: int
    duplicates: np.ndarray  # row indices (among emitted rows) re-sent once more
    click_items: np.ndarray
    click_p_buy: np.ndarray
    buy_items: np.ndarray
    buy_p_ref: np.ndarray


@dataclass
class _Context:
    cfg: SimConfig
    world: World
    exposure: Exposure
    plan: _Plan
    clock: _Clock
    start_ms: int
    end_ms: int


@dataclass
class Responses:
    """What users did with a batch of views (struct of arrays, in no particular order).

    ``cols``: ``code`` (index into ``EVENT_TYPES``), ``view`` (the view's position in the
    input), ``ts`` (epoch ms), ``value`` (dwell s of a click, price of a purchase, else NaN),
    ``noise`` (0 none, 1 accidental click, 2 random positive), ``p_buy``/``p_ref`` (true
    probabilities on clicks and purchases), ``order`` (for purchases and refunds: the row of
    the purchase in ``cols``, else -1).
    """

    cols: dict[str, np.ndarray]
    click_views: np.ndarray  # view positions of every click (accidental ones too)
    click_p_buy: np.ndarray  # their true purchase probability (0 for accidental clicks)
    buy_items: np.ndarray  # item rows of the purchases
    buy_p_ref: np.ndarray  # their true refund probability


def respond_to_views(
    rng: np.random.Generator,
    cfg: SimConfig,
    world: World,
    vi: np.ndarray,
    a: np.ndarray,
    v_ts: np.ndarray,
    rnd: np.ndarray,
    a_neutral: float,
) -> Responses:
    """The funnel of each view: click (with dwell) or accidental click, like, cart, purchase
    after a delay, refund after another, unlike, dislike and undislike.

    Why one function: the batch simulator and the closed loop (``recfb.loop``) must answer
    a view the same way. ``vi`` are the views' item rows, ``a`` their affinity logits, ``v_ts``
    their times (epoch ms), ``rnd`` marks random-positive views (clicked regardless, and
    treated downstream as if of affinity ``a_neutral``).
    """
    nv = vi.size
    a_fun = np.where(rnd, a_neutral, a)  # random positives ignore preference downstream
    v_noise = np.where(rnd, _NOISE_RANDOM, _NOISE_NONE).astype(np.int8)
    seg = _Segments()
    all_views = np.arange(nv)
    seg.add(VIEW, all_views, v_ts, v_noise)

    # Clicks: genuine (affinity driven, or forced for random positives) or accidental.
    genuine = rnd | (rng.random(nv) < sigmoid(a + cfg.click_logit))
    accidental = ~genuine & (rng.random(nv) < cfg.noise_click_rate)
    ci = np.flatnonzero(genuine | accidental)
    c_acc = accidental[ci]
    c_ts = v_ts[ci] + _delay_ms(_lognormal_s(rng, _CLICK_DELAY_MEDIAN_S, 0.8, ci.size))
    c_a = a_fun[ci]
    log_mu = np.where(
        c_acc,
        math.log(cfg.accidental_dwell_median_s),
        math.log(cfg.dwell_median_s) + cfg.dwell_affinity * (2.0 * sigmoid(c_a) - 1.0),
    )
    log_sd = np.where(c_acc, cfg.accidental_dwell_sigma, cfg.dwell_sigma)
    dwell = np.round(np.exp(log_mu + log_sd * rng.standard_normal(ci.size)), 3)
    gen = ~c_acc
    gi, g_ts, g_dwell, g_a = ci[gen], c_ts[gen], dwell[gen], c_a[gen]
    g_items = vi[gi]
    p_buy = sigmoid(g_a + world.item_cvr_logit[g_items] + cfg.purchase_logit)
    c_p_buy = np.zeros(ci.size)
    c_p_buy[gen] = p_buy
    c_noise = np.where(c_acc, _NOISE_ACCIDENTAL, v_noise[ci])
    seg.add(CLICK, ci, c_ts, c_noise, value=dwell, p_buy=c_p_buy)

    # Engagement within the dwell time of a genuine click.
    like = rng.random(gi.size) < sigmoid(g_a + cfg.like_logit)
    like_ts = g_ts[like] + 1 + (rng.random(int(like.sum())) * g_dwell[like] * 1000).astype(np.int64)
    seg.add(LIKE, gi[like], like_ts, v_noise[gi[like]])
    cart = rng.random(gi.size) < sigmoid(g_a + cfg.cart_logit)
    cart_ts = g_ts[cart] + 1 + (rng.random(int(cart.sum())) * g_dwell[cart] * 1000).astype(np.int64)
    seg.add(CART, gi[cart], cart_ts, v_noise[gi[cart]])

    # Conversion after a delay, then maybe a refund after another delay.
    buy = rng.random(gi.size) < p_buy
    b_view = gi[buy]
    b_items = g_items[buy]
    b_ts = g_ts[buy] + _delay_ms(cfg.purchase_delay.sample_seconds(rng, b_view.size))
    b_p_ref = sigmoid(world.item_refund_logit[b_items] - cfg.refund_affinity * g_a[buy])
    b_start = seg.n
    seg.add(
        PURCHASE,
        b_view,
        b_ts,
        v_noise[b_view],
        value=world.item_price[b_items],
        p_ref=b_p_ref,
        order=b_start + np.arange(b_view.size, dtype=np.int64),
    )
    ref = np.flatnonzero(rng.random(b_view.size) < b_p_ref)
    r_ts = b_ts[ref] + _delay_ms(cfg.refund_delay.sample_seconds(rng, ref.size))
    seg.add(REFUND, b_view[ref], r_ts, v_noise[b_view[ref]], order=b_start + ref)

    unlike = np.flatnonzero(rng.random(like_ts.size) < cfg.unlike_rate)
    u_view = gi[like][unlike]
    u_ts = like_ts[unlike] + _delay_ms(cfg.undo_delay.sample_seconds(rng, unlike.size))
    seg.add(UNLIKE, u_view, u_ts, v_noise[u_view])

    # Dislikes on views left unclicked, likelier as affinity falls.
    ni = np.flatnonzero(~(genuine | accidental))
    dis = rng.random(ni.size) < sigmoid(cfg.dislike_logit - cfg.dislike_affinity * a[ni])
    d_view = ni[dis]
    d_ts = v_ts[d_view] + _delay_ms(_lognormal_s(rng, _DISLIKE_DELAY_MEDIAN_S, 0.8, d_view.size))
    seg.add(DISLIKE, d_view, d_ts, v_noise[d_view])
    undo = np.flatnonzero(rng.random(d_view.size) < cfg.undislike_rate)
    ud_ts = d_ts[undo] + _delay_ms(cfg.undo_delay.sample_seconds(rng, undo.size))
    seg.add(UNDISLIKE, d_view[undo], ud_ts, v_noise[d_view[undo]])

    return Responses(
        cols=seg.concat(),
        click_views=ci,
        click_p_buy=c_p_buy,
        buy_items=b_items,
        buy_p_ref=b_p_ref,
    )


def _generate_chunk(ctx: _Context, chunk: int, u0: int, u1: int, id_offset: int) -> _Chunk:
    """Simulate every event of users [u0, u1): exposures, then the funnel of each view."""
    cfg, world, plan = ctx.cfg, ctx.world, ctx.plan
    rng = rng_for(cfg.seed, STREAM_CHUNK, chunk)

    # Exposure: ordinary views, plus random-positive views that will be clicked regardless.
    users = np.arange(u0, u1)
    lam = plan.views_per_activity * world.user_activity[u0:u1]
    n_ord = rng.poisson(lam)
    n_rnd = rng.poisson(lam * plan.random_positive_rate)
    vu_ord = np.repeat(users, n_ord)
    vi_ord, org_ord = ctx.exposure.sample_views(rng, vu_ord)
    vu_rnd = np.repeat(users, n_rnd)
    if cfg.noise_positive_items == "uniform":
        vi_rnd = rng.integers(0, world.n_items, vu_rnd.size)
    else:
        vi_rnd = ctx.exposure.sample_global(rng, vu_rnd.size)
    org_rnd = rng.random(vu_rnd.size) < cfg.organic_share
    vu = np.concatenate([vu_ord, vu_rnd])
    vi = np.concatenate([vi_ord, vi_rnd])
    organic = np.concatenate([org_ord, org_rnd])
    rnd = np.zeros(vu.size, dtype=bool)
    rnd[vu_ord.size :] = True
    v_ts = ctx.start_ms + ctx.clock.offsets_ms(rng, vu.size)
    a = affinity_logit(
        world.user_latent, world.item_latent, world.item_bias, cfg.affinity_scale, vu, vi
    )
    resp = respond_to_views(rng, cfg, world, vi, a, v_ts, rnd, plan.a_neutral)
    cols = resp.cols

    # Sort by time, number events in that order, resolve order ids, split off the censored.
    order = np.argsort(cols["ts"], kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    ref_rows = cols["order"]
    has_order = ref_rows >= 0
    order_num = np.full(ref_rows.size, -1, dtype=np.int64)
    order_num[has_order] = id_offset + rank[ref_rows[has_order]]
    cols["order"] = order_num
    for key in list(cols):  # one column at a time: peak memory grows by one column only
        cols[key] = cols[key][order]
    cols["event_id"] = id_offset + np.arange(order.size, dtype=np.int64)
    view_rows = cols.pop("view")
    cols["user_row"] = vu[view_rows]
    cols["item_row"] = vi[view_rows]
    cols["organic"] = organic[view_rows]
    cols["affinity"] = sigmoid(a[view_rows])
    n_emitted = int(np.searchsorted(cols["ts"], ctx.end_ms, side="left"))
    duplicates = np.flatnonzero(rng.random(n_emitted) < cfg.duplicate_rate)
    return _Chunk(
        cols=cols,
        n_emitted=n_emitted,
        duplicates=duplicates,
        click_items=vi[resp.click_views],
        click_p_buy=resp.click_p_buy,
        buy_items=resp.buy_items,
        buy_p_ref=resp.buy_p_ref,
    )


def _nullable_float(x: np.ndarray) -> pa.Array:
    return pa.array(x, type=pa.float64(), mask=np.isnan(x))


def _events_columns(world: World, cols: dict[str, np.ndarray], rows: np.ndarray) -> dict:
    """Canonical event columns for the given chunk rows."""
    item_rows = cols["item_row"][rows]
    order_num = cols["order"][rows]
    order_ids = pc.binary_join_element_wise(
        "o", pc.cast(pa.array(order_num, mask=order_num < 0), pa.string()), ""
    )
    return {
        "event_id": pa.array(cols["event_id"][rows]),
        "user_id": pa.array(world.user_ids[cols["user_row"][rows]]),
        "item_id": pa.array(world.item_ids[item_rows]),
        "event": _EVENT_NAMES.take(pa.array(cols["code"][rows])),
        "ts": pa.array(cols["ts"][rows].view("datetime64[ms]")),
        "value": _nullable_float(cols["value"][rows]),
        "order_id": order_ids,
        "category": pa.array(world.item_category[item_rows]),
        "is_organic": pa.array(cols["organic"][rows]),
    }


def _truth_columns(cols: dict[str, np.ndarray], rows: np.ndarray) -> dict:
    """Ground-truth columns (noise label and true probabilities) for the given chunk rows."""
    return {
        "noise": _NOISE_NAMES.take(pa.array(cols["noise"][rows])),
        "p_purchase": _nullable_float(cols["p_buy"][rows]),
        "p_refund": _nullable_float(cols["p_ref"][rows]),
        "true_affinity": pa.array(cols["affinity"][rows]),
    }


def _items_table(world: World, sums: dict[str, np.ndarray]) -> pa.Table:
    """Truth table of items, with the true rates averaged over everything simulated."""
    n_clicks = sums["clicks"]
    n_buys = sums["buys"]
    with np.errstate(invalid="ignore", divide="ignore"):
        cvr = sums["p_buy"] / n_clicks
        refund = sums["p_ref"] / n_buys
    net = cvr * (1.0 - refund)
    dim = world.item_latent.shape[1]
    return pa.table(
        {
            "item_id": pa.array(world.item_ids),
            "category": pa.array(world.item_category),
            "popularity": pa.array(world.item_popularity),
            "price": pa.array(world.item_price),
            "bias": pa.array(world.item_bias),
            "cvr_logit": pa.array(world.item_cvr_logit),
            "refund_logit": pa.array(world.item_refund_logit),
            "latent": pa.FixedSizeListArray.from_arrays(
                pa.array(world.item_latent.reshape(-1)), dim
            ),
            "true_cvr": _nullable_float(cvr),
            "true_refund_rate": _nullable_float(refund),
            "true_netcvr": _nullable_float(net),
            "n_clicks_simulated": pa.array(n_clicks.astype(np.int64)),
            "n_purchases_simulated": pa.array(n_buys.astype(np.int64)),
        }
    )


def _check_target(out: Path, overwrite: bool) -> None:
    """Refuse early (before any work) to clobber a non-empty directory or a file."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; pass overwrite=True to replace it")


def _commit(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished simulation into place with renames (atomic on one filesystem)."""
    _check_target(out, overwrite)
    old: Path | None = None
    if out.is_dir():
        if any(out.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rmdir(old)
            os.rename(out, old)
        else:
            os.rmdir(out)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@dataclass
class _Totals:
    """Running counts over chunks (events, noise, per-item sums behind the true rates)."""

    n_items: int
    parts: list[str] = field(default_factory=list)
    n_rows: int = 0
    n_duplicates: int = 0
    n_censored: int = 0
    counts: np.ndarray = field(default_factory=lambda: np.zeros(len(EVENT_TYPES), np.int64))
    noise: np.ndarray = field(default_factory=lambda: np.zeros(len(NOISE_LABELS) + 1, np.int64))
    sums: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key in ("clicks", "p_buy", "buys", "p_ref"):
            self.sums[key] = np.zeros(self.n_items)

    def add_truth(self, ch: _Chunk) -> None:
        """Accumulate everything simulated, censored included (the truth keeps it)."""
        for key, items, weights in (
            ("clicks", ch.click_items, None),
            ("p_buy", ch.click_items, ch.click_p_buy),
            ("buys", ch.buy_items, None),
            ("p_ref", ch.buy_items, ch.buy_p_ref),
        ):
            self.sums[key] += np.bincount(items, weights=weights, minlength=self.n_items)


def _write_chunks(
    ctx: _Context,
    bounds: list[tuple[int, int]],
    events_dir: Path,
    truth_dir: Path,
    progress: Callable[[int], None] | None,
) -> _Totals:
    """Generate and write chunk after chunk, so only one chunk is ever in memory."""
    world = ctx.world
    tot = _Totals(n_items=world.n_items)
    with (
        pq.ParquetWriter(
            truth_dir / "events.parquet", TRUTH_EVENTS_SCHEMA, compression=_COMPRESSION
        ) as truth_writer,
        pq.ParquetWriter(
            truth_dir / "censored.parquet", CENSORED_SCHEMA, compression=_COMPRESSION
        ) as censored_writer,
    ):
        next_id = 1
        for chunk, (u0, u1) in enumerate(bounds):
            ch = _generate_chunk(ctx, chunk, u0, u1, next_id)
            n_simulated = ch.cols["event_id"].size
            next_id += n_simulated
            tot.add_truth(ch)
            emitted = np.arange(ch.n_emitted)
            censored = np.arange(ch.n_emitted, n_simulated)
            tot.counts += np.bincount(ch.cols["code"][emitted], minlength=len(EVENT_TYPES))
            tot.noise += np.bincount(ch.cols["noise"][emitted], minlength=tot.noise.size)
            tot.n_censored += censored.size
            if ch.n_emitted:
                rows = np.concatenate([emitted, ch.duplicates])  # re-sent rows come last
                name = f"part-{len(tot.parts):05d}.parquet"
                table = pa.table(_events_columns(world, ch.cols, rows), schema=EVENTS_SCHEMA)
                pq.write_table(table, events_dir / name, compression=_COMPRESSION)
                tot.parts.append(name)
                truth = {"event_id": pa.array(ch.cols["event_id"][emitted])}
                truth.update(_truth_columns(ch.cols, emitted))
                truth_writer.write_table(pa.table(truth, schema=TRUTH_EVENTS_SCHEMA))
                tot.n_rows += rows.size
                tot.n_duplicates += ch.duplicates.size
            if censored.size:
                cens = _events_columns(world, ch.cols, censored)
                cens.update(_truth_columns(ch.cols, censored))
                censored_writer.write_table(pa.table(cens, schema=CENSORED_SCHEMA))
            del ch
            if progress is not None:
                progress(tot.n_rows)
    if not tot.parts:  # keep events/ readable as a dataset even when nothing was emitted
        tot.parts.append("part-00000.parquet")
        pq.write_table(EVENTS_SCHEMA.empty_table(), events_dir / tot.parts[0])
    return tot


def simulate(
    config: SimConfig,
    out_dir: str | Path,
    progress: Callable[[int], None] | None = None,
    *,
    overwrite: bool = False,
) -> SimResult:
    """Simulate a world and its event log into ``out_dir`` (see the package docstring).

    ``progress`` is called after each chunk with the number of rows written so far. Raises
    FileExistsError if ``out_dir`` is a non-empty directory and ``overwrite`` is False.
    """
    cfg = config
    out = Path(out_dir).absolute()
    _check_target(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)

    world = build_world(cfg)
    exposure = Exposure(world, cfg)
    plan = _plan(cfg, world, exposure)
    ctx = _Context(
        cfg=cfg,
        world=world,
        exposure=exposure,
        plan=plan,
        clock=_Clock(cfg),
        start_ms=cfg.start_ms(),
        end_ms=cfg.end_ms(),
    )
    bounds = _chunk_bounds(cfg, world, plan)

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)
        events_dir = tmp / "events"
        truth_dir = tmp / "truth"
        events_dir.mkdir()
        truth_dir.mkdir()
        tot = _write_chunks(ctx, bounds, events_dir, truth_dir, progress)
        pq.write_table(users_table(world), truth_dir / "users.parquet", compression=_COMPRESSION)
        pq.write_table(_items_table(world, tot.sums), truth_dir / "items.parquet")
        meta = {
            "config": cfg.model_dump(mode="json"),
            "start": cfg.start_iso(),
            "end": cfg.end_iso(),
            "start_ms": ctx.start_ms,
            "end_ms": ctx.end_ms,
            "event_types": list(EVENT_TYPES),
            "noise_labels": list(NOISE_LABELS),
            "derived": {
                "a_neutral": plan.a_neutral,
                "random_positive_rate": plan.random_positive_rate,
                "rows_per_view": plan.rows_per_view,
                "expected_views": plan.views_per_activity * float(world.user_activity.sum()),
                "n_chunks": len(bounds),
            },
        }
        (truth_dir / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
        _commit(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    return SimResult(
        out_dir=out,
        events_dir=out / "events",
        truth_dir=out / "truth",
        parts=tuple(out / "events" / n for n in tot.parts),
        n_rows=tot.n_rows,
        n_events=int(tot.counts.sum()),
        n_duplicates=tot.n_duplicates,
        n_censored=tot.n_censored,
        event_counts={k: int(c) for k, c in zip(EVENT_TYPES, tot.counts, strict=True)},
        noise_counts={k: int(c) for k, c in zip(NOISE_LABELS, tot.noise[1:], strict=True)},
        start=cfg.start_iso(),
        end=cfg.end_iso(),
    )

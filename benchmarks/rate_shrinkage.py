"""Per-item NetCVR error: naive, delay-corrected, delay-corrected + shrinkage, and the oracle.

Two streams, each logged past "now" so that every eventual outcome of the clicks before now
is known:

* ``simulator``: recfb's simulator (lognormal click -> purchase delays, Weibull refunds, item
  rates spread around their category's), now = 14 days before the end of the log;
* ``generator``: a stream the simulator did not make (``other_stream`` below): segments with
  their own CVR and refund rate, items spread around them, click -> purchase delays from a
  mixture (a fast exponential and a slow lognormal) in half the segments and a Weibull of
  shape 0.7 in the other half, Weibull refund delays of shape 2.

At now, over the clicks of the last ``--click-days`` and the purchases of the last
``--buy-days``, per item: ``naive`` (outcomes seen / trials), ``corrected`` (the delay
correction, no prior), ``corrected m=2`` (the service's fixed prior of 2 pseudo-trials at the
segment's rate), ``shrunk`` (the prior's strength chosen by held-out likelihood,
``recfb.delayed.rates.heldout_prior_strength``) and ``oracle`` (outcomes / trials of the
same clicks and purchases once every outcome has arrived: the sampling floor of a per-item
estimate; ``oracle_shrunk``: the same outcomes, shrunk as ``shrunk`` is). Error = the
median over items of |estimate - true NetCVR|, true = the simulator's per-click probability
``p_buy (1 - p_refund)`` averaged over the window's clicks (the generator: the item's rates).

    python benchmarks/rate_shrinkage.py          # -> benchmarks/results/rate_shrinkage.{json,md}
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import cpu_steal, simulated_etl, steal_share  # noqa: E402

DAY_MS = 86_400_000
EXTRA_DAYS = 14  # the log runs this long after "now": the oracle's eventual outcomes
RESULTS = Path(__file__).parent / "results"
BANDS = ((1, 10), (10, 100), (100, None))
ESTIMATES = ("naive", "corrected", "corrected_m2", "shrunk", "oracle", "oracle_shrunk")
SIGNAL_MAP = {
    "name": "clicks and orders",
    "levels": [{"name": "click"}, {"name": "purchase"}],
    "signals": {
        "click": {"level": "click"},
        "purchase": {"level": "purchase"},
        "refund": {"cancels": "purchase", "fallback": "negative"},
    },
    "attribution": {
        "clock_signals": ["click"],
        "click_to_purchase_hours": 168,
        "purchase_to_refund_hours": 336,
    },
}


def sim_config(n_events: int, days: float):
    from recfb.simulate import DelaySpec, SimConfig

    return SimConfig(
        seed=11,
        n_users=20_000,
        n_items=3_000,
        n_events=n_events,
        days=days + EXTRA_DAYS,
        purchase_logit=-3.0,
        noise_positive_share=0.0,
        purchase_delay=DelaySpec(distribution="lognormal", median_hours=24.0, shape=1.0),
    )


def other_stream(seed: int, n_items: int, n_clicks: int, days: float) -> tuple[pl.DataFrame, dict]:
    """Raw events (canonical schema, `category` = segment) of a click -> purchase -> refund
    stream with delay shapes the simulator does not draw, and each item's true rates."""
    rng = np.random.default_rng(seed)
    n_seg = 12
    seg_cvr = np.exp(rng.uniform(np.log(0.01), np.log(0.15), n_seg))
    seg_refund = rng.uniform(0.05, 0.35, n_seg)
    seg = rng.integers(0, n_seg, n_items)
    cvr = np.clip(seg_cvr[seg] * np.exp(0.35 * rng.standard_normal(n_items)), 1e-4, 0.9)
    a = 20.0  # item refund rates ~ Beta around the segment's, 20 pseudo-purchases strong
    refund = rng.beta(a * seg_refund[seg], a * (1 - seg_refund[seg]))
    popularity = rng.pareto(1.2, n_items) + 0.05
    item = rng.choice(n_items, n_clicks, p=popularity / popularity.sum())
    horizon_s = (days + EXTRA_DAYS) * 86_400.0
    click_s = rng.uniform(0, horizon_s, n_clicks)
    buys = rng.random(n_clicks) < cvr[item]
    fast_mix = seg[item] % 2 == 0
    mixture = np.where(
        rng.random(n_clicks) < 0.6,
        rng.exponential(2 * 3600 / np.log(2), n_clicks),
        48 * 3600 * np.exp(1.2 * rng.standard_normal(n_clicks)),
    )
    weibull = 10 * 3600 / np.log(2) ** (1 / 0.7) * rng.weibull(0.7, n_clicks)
    buy_s = click_s + np.where(fast_mix, mixture, weibull)
    buys &= buy_s < horizon_s
    refunded = buys & (rng.random(n_clicks) < refund[item])
    refund_s = buy_s + 5 * 86_400 / np.log(2) ** 0.5 * rng.weibull(2.0, n_clicks)
    refunded &= refund_s < horizon_s
    user = rng.integers(0, 50_000, n_clicks)
    start = datetime(2026, 3, 1)
    start_ms = int((start - datetime(1970, 1, 1)) / timedelta(milliseconds=1))

    def rows(mask: np.ndarray, event: str, seconds: np.ndarray) -> pl.DataFrame:
        idx = np.flatnonzero(mask)
        return pl.DataFrame(
            {
                "user_id": user[idx],
                "item_id": item[idx],
                "event": [event] * idx.size,
                "ts": pl.Series(start_ms + seconds[idx] * 1000)
                .cast(pl.Int64)
                .cast(pl.Datetime("ms")),
                "order_id": [f"o{i}" for i in idx] if event != "click" else [None] * idx.size,
                "category": seg[item[idx]],
            },
            schema_overrides={"order_id": pl.String},
        )

    everything = np.ones(n_clicks, dtype=bool)
    events = pl.concat(
        [rows(everything, "click", click_s), rows(buys, "purchase", buy_s)]
        + [rows(refunded, "refund", refund_s)]
    )
    truth = {"cvr": cvr, "refund": refund, "start": start}
    return events, truth


def _estimates(data, now_ms: int, end_ms: int, click_days: float, buy_days: float) -> dict:
    """Per-item rates of every estimate (ESTIMATES) over the windows before now, plus the
    clicks per item and the chosen strengths."""
    from recfb.delayed.fit import fit_delays, item_segments, load_cascade
    from recfb.delayed.observations import click_trials, purchase_trials
    from recfb.delayed.rates import item_rates, shrunk_stage

    events, signals = load_cascade(data)
    segments = item_segments(events, "category", data.n_items)
    fits = fit_delays(data, cutoff_ms=now_ms)
    clicks_in = (now_ms - int(click_days * DAY_MS), now_ms)
    buys_in = (now_ms - int(buy_days * DAY_MS), now_ms)
    conversion = fits.conversion

    def trials(cutoff: int) -> tuple[pl.DataFrame, pl.DataFrame]:
        clicks = click_trials(
            events, signals.clock, signals.purchase, cutoff, *clicks_in, conversion.overall
        )
        return clicks, purchase_trials(events, signals.purchase, cutoff, *buys_in)

    clicks, buys = trials(now_ms)
    n = data.n_items
    m_cvr = shrunk_stage(clicks, conversion, segments, n)[1]
    m_ref = shrunk_stage(buys, fits.refund, segments, n)[1]

    def rates(m_c, m_r, cl=clicks, bu=buys) -> pl.DataFrame:
        return item_rates(cl, bu, conversion, fits.refund, n, segments, m_c, m_r)

    plain = rates(0.0, 0.0)
    final = trials(end_ms)
    eventual = rates(0.0, 0.0, *final)
    out = {
        "clicks": plain["clicks"].to_numpy(),
        "naive": plain["netcvr_naive"].to_numpy(),
        "corrected": plain["netcvr_corrected"].to_numpy(),
        "corrected_m2": rates(2.0, 2.0)["netcvr_corrected"].to_numpy(),
        "shrunk": rates("auto", "auto")["netcvr_corrected"].to_numpy(),
        "oracle": eventual["netcvr_naive"].to_numpy(),
        "oracle_shrunk": rates("auto", "auto", *final)["netcvr_corrected"].to_numpy(),
    }
    seen = float(plain["purchases"].sum())
    later = float(eventual["purchases"].sum())
    info = {
        "strength_cvr": m_cvr,
        "strength_refund": m_ref,
        "pending_purchase_share": 1 - seen / max(later, 1.0),
        "conversion_family": conversion.overall.family,
        "refund_family": fits.refund.overall.family if fits.refund else None,
    }
    return {"rates": out, "info": info, "clicks_in": clicks_in, "buys_in": buys_in}


def errors(rates: dict, truth: np.ndarray) -> dict:
    """Median |estimate - truth| (and relative) per estimate over items with clicks in the
    window, overall and per band of clicks."""
    clicks = rates["clicks"]
    out: dict = {}
    for lo, hi in ((1, None), *BANDS):
        band = (clicks >= lo) & (clicks < (hi or np.inf)) & np.isfinite(truth) & (truth > 0)
        name = f"{lo}+" if hi is None else f"{lo}-{hi - 1}"
        row: dict = {"items": int(band.sum())}
        for est in ESTIMATES:
            diff = np.nan_to_num(rates[est][band], nan=0.0) - truth[band]
            row[est] = float(np.median(np.abs(diff))) if band.any() else None
            row[f"{est}_rel"] = float(np.median(np.abs(diff) / truth[band])) if band.any() else None
        out[name] = row
    return out


def run_simulator(args: argparse.Namespace) -> dict:
    from benchmarks.delayed import truth_by_item
    from recfb.etl import Interactions

    cfg = sim_config(args.events, args.days)
    work = Path(args.work) / "simulator"
    etl = simulated_etl(cfg, work, split={"method": "none"})
    data = Interactions.load(etl)
    end_ms = cfg.end_ms()
    now_ms = end_ms - EXTRA_DAYS * DAY_MS
    est = _estimates(data, now_ms, end_ms, args.click_days, args.buy_days)
    truth = truth_by_item(etl, work / "sim", est["clicks_in"], est["buys_in"])
    true_net = np.full(data.n_items, np.nan)
    true_net[truth["item_idx"].to_numpy()] = truth["netcvr_true"].to_numpy()
    return {"info": est["info"], "errors": errors(est["rates"], true_net)}


def run_generator(args: argparse.Namespace) -> dict:
    import recfb

    raw, truth = other_stream(args.seed, args.items, args.clicks, args.days)
    data = recfb.etl.run(raw, SIGNAL_MAP, split={"method": "none"})
    start_ms = int((truth["start"] - datetime(1970, 1, 1)) / timedelta(milliseconds=1))
    now_ms = start_ms + int(args.days * DAY_MS)
    end_ms = now_ms + EXTRA_DAYS * DAY_MS
    est = _estimates(data, now_ms, end_ms, args.click_days, args.buy_days)
    ids = data.items["item_id"].cast(pl.Int64).to_numpy()
    true_net = np.full(data.n_items, np.nan)
    true_net[data.items["item_idx"].to_numpy()] = truth["cvr"][ids] * (1 - truth["refund"][ids])
    return {"info": est["info"], "errors": errors(est["rates"], true_net)}


def table(results: dict) -> str:
    """The Markdown table of the results."""
    lines = [
        "| stream | clicks per item | items | naive | corrected | corrected, m=2 | shrunk "
        "(m by held-out likelihood) | oracle (floor) | oracle, shrunk |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for stream, res in results["streams"].items():
        for band, row in res["errors"].items():
            if not row["items"]:
                continue
            cells = [f"{row[e]:.5f} ({100 * row[f'{e}_rel']:.0f}%)" for e in ESTIMATES]
            lines.append(f"| {stream} | {band} | {row['items']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--events", type=int, default=3_000_000, help="simulator rows")
    ap.add_argument("--clicks", type=int, default=400_000, help="generator clicks")
    ap.add_argument("--items", type=int, default=3_000, help="generator items")
    ap.add_argument("--days", type=float, default=21.0, help="log before now")
    ap.add_argument("--click-days", type=float, default=3.0)
    ap.add_argument("--buy-days", type=float, default=14.0)
    ap.add_argument("--seed", type=int, default=5, help="generator seed")
    ap.add_argument("--work", default="/tmp/recfb-rate-shrinkage")
    ap.add_argument("--out", default=str(RESULTS / "rate_shrinkage"))
    args = ap.parse_args()

    results: dict = {"args": vars(args), "streams": {}}
    for name, fn in (("simulator", run_simulator), ("generator", run_generator)):
        steal0 = cpu_steal()
        res = fn(args)
        res["cpu_steal_share"] = steal_share(steal0, cpu_steal())
        results["streams"][name] = res
        print(json.dumps({name: res["info"]}, default=str))
    out = Path(args.out)
    out.parent.mkdir(exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2, default=str))
    print(table(results))


if __name__ == "__main__":
    main()

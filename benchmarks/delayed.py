"""Delay-corrected item rates against the simulator's truth, as a function of data age.

A shop is simulated with conversions slow enough that about half of the eventual purchases of
the last two days' clicks are still pending at the evaluation time T. At T + lag (lag = data
age: 0 h ... 7 days), the delay models are refitted on everything logged before T + lag, and
each item's CVR, refund rate and NetCVR over the window's clicks (2 days before T) and purchases
(7 days before T) are estimated naively and corrected. Truth per item comes from the simulator:
the mean true purchase probability of the window's clicks, the mean true refund probability of
the window's purchases, and per click ``p_buy (1 - p_refund)`` for NetCVR.

    python benchmarks/delayed.py                 # writes benchmarks/results/delayed.{json,png}
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import simulated_etl  # noqa: E402

HOUR_MS = 3_600_000
RESULTS = Path(__file__).parent / "results"


def sim_config(n_events: int):
    from recfb.simulate import DelaySpec, SimConfig

    return SimConfig(
        seed=7,
        n_users=30_000,
        n_items=1_000,
        n_events=n_events,
        days=21,
        purchase_logit=-3.0,
        noise_positive_share=0.0,
        purchase_delay=DelaySpec(distribution="lognormal", median_hours=24.0, shape=1.0),
    )


def truth_by_item(etl: Path, sim: Path, clicks_in: tuple[int, int], buys_in: tuple[int, int]):
    """True CVR, refund rate and NetCVR per item over the same windows ([from, to) in epoch ms)
    as the estimates."""
    from recfb.simulate import SimConfig

    raw = json.loads((sim / "truth" / "config.json").read_text())["config"]
    cfg = SimConfig.model_validate(raw)
    items = pl.read_parquet(sim / "truth" / "items.parquet", columns=["item_id", "refund_logit"])
    vocab = pl.read_parquet(etl / "items.parquet", columns=["item_idx", "item_id"])
    items = vocab.join(items.with_columns(pl.col("item_id").cast(pl.String)), on="item_id")
    truth = pl.scan_parquet(sim / "truth" / "events.parquet")
    ev = pl.scan_parquet(etl / "events.parquet").with_columns(
        pl.col("ts").dt.epoch("ms").alias("ts_ms"), pl.col("event").cast(pl.String)
    )
    clicks = (
        ev.filter(
            (pl.col("event") == "click") & pl.col("ts_ms").is_between(*clicks_in, closed="left")
        )
        .join(truth, on="event_id")
        .join(items.lazy(), on="item_idx")
        .with_columns(
            (
                1
                / (
                    1
                    + (
                        -(
                            pl.col("refund_logit")
                            - cfg.refund_affinity
                            * (pl.col("true_affinity") / (1 - pl.col("true_affinity"))).log()
                        )
                    ).exp()
                )
            ).alias("p_ref")
        )
        .group_by("item_idx")
        .agg(
            pl.col("p_purchase").mean().alias("cvr_true"),
            (pl.col("p_purchase") * (1 - pl.col("p_ref"))).mean().alias("netcvr_true"),
        )
    )
    buys = (
        ev.filter(
            (pl.col("event") == "purchase") & pl.col("ts_ms").is_between(*buys_in, closed="left")
        )
        .join(truth, on="event_id")
        .group_by("item_idx")
        .agg(pl.col("p_refund").mean().alias("refund_true"))
    )
    return clicks.join(buys, on="item_idx", how="left").collect()


def bias_table(est: pl.DataFrame, truth: pl.DataFrame, min_clicks: int) -> dict:
    """Per rate: mean signed and median absolute relative error over items with >= min_clicks,
    and the click-weighted total error (sum of estimate x clicks over sum of truth x clicks)."""
    df = est.join(truth, on="item_idx").filter(pl.col("clicks") >= min_clicks)
    out: dict = {"items": df.height, "clicks": int(df["clicks"].sum())}
    for rate in ("cvr", "refund", "netcvr"):
        for kind in ("naive", "corrected"):
            rel = (pl.col(f"{rate}_{kind}") - pl.col(f"{rate}_true")) / pl.col(f"{rate}_true")
            vals = df.select(rel.alias("r")).drop_nulls().drop_nans()["r"]
            out[f"{rate}_{kind}_bias"] = float(vals.mean())
            out[f"{rate}_{kind}_mae"] = float(vals.abs().median())
            ok = df.drop_nulls([f"{rate}_{kind}", f"{rate}_true"])
            total = (ok[f"{rate}_{kind}"] * ok["clicks"]).sum() / (
                ok[f"{rate}_true"] * ok["clicks"]
            ).sum()
            out[f"{rate}_{kind}_total"] = float(total - 1)
    return out


def estimate(etl, fits, segments, n_items, t_ms, clicks_in, buys_in, prior=(2.0, 2.0)):
    """Naive and corrected rates at t_ms over click and purchase windows ([from, to) ms);
    ``prior``: pseudo-clicks and pseudo-purchases of the thin-item prior (service defaults)."""
    from recfb.delayed.observations import click_trials, purchase_trials
    from recfb.delayed.rates import item_rates

    events = pl.scan_parquet(etl / "events.parquet")
    clicks = click_trials(
        events, ["click"], ["purchase"], t_ms, *clicks_in, delay=fits.conversion.overall
    )
    buys = purchase_trials(events, ["purchase"], t_ms, *buys_in)
    return item_rates(clicks, buys, fits.conversion, fits.refund, n_items, segments, *prior)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--events", type=int, default=8_000_000)
    ap.add_argument("--work", default="/tmp/recfb-delayed")
    ap.add_argument("--click-days", type=float, default=2.0)
    ap.add_argument("--buy-days", type=float, default=7.0)
    ap.add_argument("--min-clicks", type=int, default=200)
    ap.add_argument("--ages", default="0,6,12,24,48,96,168,336", help="age band edges, hours")
    args = ap.parse_args()

    from recfb.delayed.fit import fit_delays, item_segments

    work = Path(args.work)
    cfg = sim_config(args.events)
    etl = simulated_etl(cfg, work, split={"method": "none"})
    sim = work / "sim"
    t_ms = cfg.end_ms()  # "now": the end of the log
    n_items = pl.read_parquet(etl / "items.parquet", columns=["item_idx"]).height
    segments = item_segments(pl.scan_parquet(etl / "events.parquet"), "category", n_items)
    fits = fit_delays(etl, cutoff_ms=t_ms)
    day = 24 * HOUR_MS
    buys_in = (t_ms - int(args.buy_days * day), t_ms)

    # the headline: the last click_days of clicks, seen at the end of the log
    clicks_in = (t_ms - int(args.click_days * day), t_ms)
    truth = truth_by_item(etl, sim, clicks_in, buys_in)
    est = estimate(etl, fits, segments, n_items, t_ms, clicks_in, buys_in)
    joined = est.join(truth, on="item_idx")
    expected = float((joined["cvr_true"] * joined["clicks"]).sum())
    seen = float(joined["purchases"].sum())
    headline = {
        "pending_purchase_share": 1 - seen / expected,
        **bias_table(est, truth, args.min_clicks),
    }
    print(json.dumps({k: round(v, 4) for k, v in headline.items()}))
    # the same without the thin-item prior: how much of the per-item bias the prior adds
    est0 = estimate(etl, fits, segments, n_items, t_ms, clicks_in, buys_in, prior=(0.0, 0.0))
    headline_no_prior = bias_table(est0, truth, args.min_clicks)

    # error by data age: clicks (and purchases) binned by their age at "now"
    edges = [float(x) for x in args.ages.split(",")]
    bands = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        c_in = (t_ms - int(hi * HOUR_MS), t_ms - int(lo * HOUR_MS))
        b_in = (t_ms - int(max(hi, 24 * args.buy_days) * HOUR_MS), t_ms - int(lo * HOUR_MS))
        truth_b = truth_by_item(etl, sim, c_in, b_in)
        est_b = estimate(etl, fits, segments, n_items, t_ms, c_in, b_in)
        row = {"age_from_h": lo, "age_to_h": hi, **bias_table(est_b, truth_b, 1)}
        bands.append(row)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))

    RESULTS.mkdir(exist_ok=True)
    out = {
        "config": cfg.model_dump(mode="json"),
        "args": vars(args),
        "fits": fits.to_dict(),
        "headline": headline,
        "headline_no_prior": headline_no_prior,
        "by_age": bands,
    }
    (RESULTS / "delayed.json").write_text(json.dumps(out, indent=2))
    plot(bands, RESULTS / "delayed.png")


def plot(bands: list[dict], path: Path) -> None:
    from recfb.tracking.plots import plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    labels = [f"{b['age_from_h']:g}-{b['age_to_h']:g}" for b in bands]
    xs = range(len(bands))
    for ax, rate in zip(axes, ("cvr", "refund", "netcvr"), strict=True):
        for kind, style in (("naive", "--"), ("corrected", "-")):
            ax.plot(
                xs,
                [100 * b[f"{rate}_{kind}_total"] for b in bands],
                style,
                marker="o",
                label=f"{kind}: total error",
            )
            ax.plot(
                xs,
                [100 * b[f"{rate}_{kind}_mae"] for b in bands],
                style,
                marker="x",
                alpha=0.5,
                label=f"{kind}: median |item error|",
            )
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xticks(list(xs), labels, rotation=30, fontsize=8)
        ax.set(title=rate, xlabel="age of the clicks at evaluation (hours)", ylabel="% of truth")
    axes[0].legend(fontsize=7)
    fig.suptitle("delay-corrected vs naive item rates against the simulator's truth")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()

"""Continuous training of CVR / refund / NetCVR models on a simulated stream with delays.

Simulates 35 days (click -> purchase log-normal, median 24 h; purchase -> refund Weibull,
median 96 h), then for each mode (naive, fnw, esdfm, oracle) replays the stream: train on
everything emitted before day t, test day t's clicks against their labels at the end of the
log (at least 14 days later), for t = day 14 .. 20. The direct NetCVR model (one head on the
net label: a purchase not refunded) runs beside the cascade with the labels it can have: once
matured (direct-wait) and, as a bound, the eventual ones (direct-oracle).

    python benchmarks/delayed_stream.py      # writes benchmarks/results/delayed_stream.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import simulated_etl  # noqa: E402
from benchmarks.delayed import sim_config  # noqa: E402

DAY_MS = 86_400_000
RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--events", type=int, default=12_500_000)
    ap.add_argument("--work", default="/tmp/recfb-delayed-stream")
    ap.add_argument("--first-test-day", type=int, default=14)
    ap.add_argument("--test-days", type=int, default=7)
    ap.add_argument("--modes", default="naive,fnw,esdfm,wait,oracle,direct-wait,direct-oracle")
    ap.add_argument("--epochs-per-day", type=int, default=2)
    ap.add_argument("--seed", type=int, default=7, help="of the simulated shop and the models")
    ap.add_argument("--out", default="delayed_stream.json", help="file in benchmarks/results/")
    args = ap.parse_args()

    from recfb.delayed.cvr import CvrConfig, run_continuous
    from recfb.delayed.stream import click_outcomes, refund_trials

    cfg_sim = sim_config(args.events).model_copy(update={"days": 35.0, "seed": args.seed})
    etl = simulated_etl(cfg_sim, Path(args.work), split={"method": "none"})
    events = pl.scan_parquet(etl / "events.parquet")
    end = cfg_sim.end_ms()
    clicks = click_outcomes(events, ["click"], ["purchase"], end)
    purchases = refund_trials(clicks)
    n_users = pl.read_parquet(etl / "users.parquet", columns=["user_idx"]).height
    n_items = pl.read_parquet(etl / "items.parquet", columns=["item_idx"]).height
    start = cfg_sim.start_ms()
    days = [
        start + d * DAY_MS for d in range(args.first_test_day, args.first_test_day + args.test_days)
    ]
    cfg = CvrConfig(epochs_per_day=args.epochs_per_day, seed=args.seed)
    results = {}
    for mode in args.modes.split(","):
        t = time.perf_counter()
        direct = mode.startswith("direct-")
        res = run_continuous(
            clicks,
            purchases,
            mode.removeprefix("direct-"),
            cfg,
            n_users,
            n_items,
            days,
            end,
            direct,
        )
        results[mode] = {
            "pooled": res.pooled,
            "by_day": res.by_day,
            "seconds": time.perf_counter() - t,
        }
        for target, m in res.pooled.items():
            print(
                f"{mode:7s} {target:7s} " + " ".join(f"{k}={v:.4f}" for k, v in m.items()),
                flush=True,
            )
    RESULTS.mkdir(exist_ok=True)
    out = {
        "sim": cfg_sim.model_dump(mode="json"),
        "cvr": cfg.model_dump(),
        "args": vars(args),
        "clicks": clicks.height,
        "purchases": purchases.height,
        "results": results,
    }
    (RESULTS / args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

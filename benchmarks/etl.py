"""ETL throughput and peak memory at 1M / 10M / 50M simulated events vs bare Polars and pandas.

Each measurement runs in its own child process, so the peak RSS reported (from wait4) is that
run's alone, with the CPU steal share while it ran. In the same run two references read the
same events: bare Polars (scan_parquet -> group_by(user, item) -> max level, count, first/last
time, refunds; streaming engine; the floor a Polars ETL can reach) and the pair aggregation
written plainly in pandas (dedupe, drop short clicks, max level / counts per signal /
first-last time per pair). Neither validates, links refunds or splits. The table reports the
ratios. Results go to benchmarks/results/etl.json and are printed as a Markdown table.

    python benchmarks/etl.py --sizes 1000000 10000000 50000000 --work /tmp/recfb-bench
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import SIGNALS, run_child, sim_etl_config  # noqa: E402


def child_etl(events: str, out: str) -> dict:
    from recfb.etl import run_etl

    cfg = sim_etl_config(events, out)
    start = time.perf_counter()
    stats = run_etl(cfg, quiet=True).stats
    return {
        "seconds": time.perf_counter() - start,
        "rows_in": stats["reconciliation"]["rows_in"],
        "pairs": sum(s["pairs"] for s in stats["splits"].values()),
        "stages_s": stats["timings_s"],
    }


def _levels() -> dict[str, int]:
    """Signal name -> positive level (1..T; 0 for signals without one), from the signal map."""
    import yaml

    smap = yaml.safe_load(SIGNALS.read_text())
    levels = [lv["name"] for lv in smap["levels"]]
    return {
        name: levels.index(s["level"]) + 1 if s.get("level") else 0
        for name, s in smap["signals"].items()
    }


def child_polars(events: str) -> dict:
    import polars as pl

    level_of = _levels()
    start = time.perf_counter()
    lf = pl.scan_parquet(f"{events}/*.parquet")
    rows_in = lf.select(pl.len()).collect().item()
    pairs = (
        lf.group_by("user_id", "item_id")
        .agg(
            pl.col("event").replace_strict(level_of, return_dtype=pl.Int8).max().alias("level"),
            pl.len().alias("n"),
            pl.col("ts").min().alias("first_ts"),
            pl.col("ts").max().alias("last_ts"),
            (pl.col("event") == "refund").sum().alias("refunds"),
        )
        .collect(engine="streaming")
    )
    return {"seconds": time.perf_counter() - start, "rows_in": rows_in, "pairs": pairs.height}


def child_pandas(events: str) -> dict:
    import pandas as pd

    level_of = _levels()
    start = time.perf_counter()
    df = pd.concat(
        [pd.read_parquet(p) for p in sorted(Path(events).glob("*.parquet"))], ignore_index=True
    )
    rows_in = len(df)
    df = df.drop_duplicates("event_id")
    df = df[~((df["event"] == "click") & (df["value"] < 3.0))]
    df["level"] = df["event"].map(level_of)
    keys = ["user_id", "item_id"]
    pairs = df.groupby(keys).agg(
        level=("level", "max"), first_ts=("ts", "min"), last_ts=("ts", "max")
    )
    counts = df.groupby([*keys, "event"]).size().unstack(fill_value=0)
    pairs = pairs.join(counts)
    return {"seconds": time.perf_counter() - start, "rows_in": rows_in, "pairs": len(pairs)}


def measure(args: list[str]) -> dict:
    """Run this script as a child; return its JSON plus wall time and peak RSS."""
    return run_child(__file__, args)


def simulate(size: int, work: Path) -> Path:
    from recfb.simulate import SimConfig
    from recfb.simulate import simulate as run_simulation

    out = work / f"sim-{size}"
    if (out / "events").exists():
        return out / "events"
    cfg = SimConfig(
        seed=1,
        n_events=size,
        n_users=max(2_000, size // 50),
        n_items=max(5_000, size // 500),
        noise_positive_share=0.1,
        duplicate_rate=0.001,
    )
    start = time.perf_counter()
    run_simulation(cfg, out, overwrite=True)
    print(f"simulated {size:,} events in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return out / "events"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--work", type=Path, default=Path("/tmp/recfb-bench"))
    parser.add_argument("--pandas-up-to", type=int, default=50_000_000)
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks/results/etl.json")
    parser.add_argument("--child", choices=["etl", "polars", "pandas"])
    parser.add_argument("--events")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.child == "etl":
        print(json.dumps(child_etl(args.events, args.out)))
        return
    if args.child == "polars":
        print(json.dumps(child_polars(args.events)))
        return
    if args.child == "pandas":
        print(json.dumps(child_pandas(args.events)))
        return

    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in args.sizes:
        events = simulate(size, args.work)
        etl = measure(["--child", "etl", "--events", str(events), "--out", str(args.work / "etl")])
        row = {"target_events": size, "etl": etl}
        row["polars"] = measure(["--child", "polars", "--events", str(events)])
        if size <= args.pandas_up_to:
            row["pandas"] = measure(["--child", "pandas", "--events", str(events)])
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "python": platform.python_version(),
        "rows": rows,
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(rows))


def markdown(rows: list[dict]) -> str:
    """The results as a Markdown table; the steal shares are the CPU other tenants took."""
    lines = [
        "| events in | recfb ETL s | events/s | peak RSS GiB | steal | bare Polars s | "
        "Polars RSS GiB | steal | ETL time / bare Polars time | pandas agg s | pandas RSS GiB | "
        "steal | ETL time / pandas time |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        e, b, p = row["etl"], row.get("polars"), row.get("pandas")

        def cells(ref: dict | None, e: dict = e) -> str:
            if ref is None:
                return "- | - | - | -"
            return (
                f"{ref['seconds']:.1f} | {ref['peak_rss_gib']:.2f} | "
                f"{ref.get('cpu_steal_share', float('nan')):.1%} | "
                f"{e['seconds'] / ref['seconds']:.2f}"
            )

        lines.append(
            f"| {e['rows_in']:,} | {e['seconds']:.1f} | {e['rows_in'] / e['seconds']:,.0f} | "
            f"{e['peak_rss_gib']:.2f} | {e.get('cpu_steal_share', float('nan')):.1%} | "
            f"{cells(b)} | {cells(p)} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""ETL throughput and peak memory at 1M / 10M / 50M simulated events, against pandas.

Each measurement runs in its own child process, so the peak RSS reported (from wait4) is that
run's alone. In the same run, the pair aggregation written plainly in pandas (dedupe, drop
short clicks, max level / counts per signal / first-last time per pair; no validation, no
refund linking, no split) is timed on the same events as the reference; the table reports
the ratio. Results go to benchmarks/results/etl.json and are printed as a Markdown table.

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

from benchmarks.common import run_child  # noqa: E402

SIGNALS = ROOT / "conf" / "signals" / "simulator.yaml"


def child_etl(events: str, out: str) -> dict:
    from recfb.config import build_model
    from recfb.etl import EtlConfig, run_etl

    cfg = build_model(
        EtlConfig,
        {"input": {"paths": [events], "format": "parquet"}, "signals": str(SIGNALS), "out": out},
        "bench",
    )
    start = time.perf_counter()
    stats = run_etl(cfg, quiet=True).stats
    return {
        "seconds": time.perf_counter() - start,
        "rows_in": stats["reconciliation"]["rows_in"],
        "pairs": sum(s["pairs"] for s in stats["splits"].values()),
        "stages_s": stats["timings_s"],
    }


def child_pandas(events: str) -> dict:
    import pandas as pd
    import yaml

    smap = yaml.safe_load(SIGNALS.read_text())
    levels = [lv["name"] for lv in smap["levels"]]
    level_of = {
        name: levels.index(s["level"]) + 1 if s.get("level") else 0
        for name, s in smap["signals"].items()
    }
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
    parser.add_argument("--child", choices=["etl", "pandas"])
    parser.add_argument("--events")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.child == "etl":
        print(json.dumps(child_etl(args.events, args.out)))
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
    print(
        "| events in | recfb ETL s | events/s | peak RSS GiB | pandas agg s | pandas RSS GiB | "
        "ETL time / pandas time |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        e, p = row["etl"], row.get("pandas")
        ratio = f"{e['seconds'] / p['seconds']:.2f}" if p else "-"
        print(
            f"| {e['rows_in']:,} | {e['seconds']:.1f} | {e['rows_in'] / e['seconds']:,.0f} | "
            f"{e['peak_rss_gib']:.2f} | {p['seconds'] if p else float('nan'):.1f} | "
            f"{p['peak_rss_gib'] if p else float('nan'):.2f} | {ratio} |"
        )


if __name__ == "__main__":
    main()

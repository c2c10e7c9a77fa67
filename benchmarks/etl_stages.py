"""Where the ETL's cores and memory go: one `recfb etl` run with the wall and process CPU
seconds of each stage (a stage that keeps one of the cores idle shows as cores used near 1)
and the peak resident memory while it ran (sampled every 20 ms).

    python benchmarks/etl_stages.py /tmp/recfb-bench/sim-50000000/events --out /tmp/etl-stages

The events are benchmarks/etl.py's simulated parquet files (generated there). Prints a
Markdown table; nothing is written under benchmarks/results.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import sim_etl_config  # noqa: E402
from recfb import progress  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("events", help="a parquet file, directory or glob of events")
    parser.add_argument("--out", default="/tmp/recfb-etl-stages", help="ETL output directory")
    args = parser.parse_args()
    rows: list[tuple[str, float, float, float]] = []
    peak = {"now": 0.0}

    def sample() -> None:
        page = resource.getpagesize()
        while True:
            with open("/proc/self/statm") as f:
                peak["now"] = max(peak["now"], int(f.read().split()[1]) * page / 2**30)
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()

    @contextlib.contextmanager
    def stage(self: progress.StageTimer, name: str) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.process_time()
        peak["now"] = 0.0
        yield
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        self.seconds[name] = round(wall, 3)
        rows.append((name, wall, cpu, peak["now"]))

    progress.StageTimer.stage = stage  # type: ignore[method-assign]
    from recfb.etl import run_etl

    cfg = sim_etl_config(args.events, args.out)
    wall, cpu = time.perf_counter(), time.process_time()
    run_etl(cfg, quiet=True)
    whole = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    rows.append(("whole ETL", time.perf_counter() - wall, time.process_time() - cpu, whole))
    print("| stage | wall s | CPU s | cores used | peak RSS GiB |\n|---|---:|---:|---:|---:|")
    for name, w, c, r in rows:
        print(f"| {name} | {w:.2f} | {c:.2f} | {c / w if w else 0:.2f} | {r:.2f} |")


if __name__ == "__main__":
    main()

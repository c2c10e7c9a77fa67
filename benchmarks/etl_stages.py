"""Where the ETL's cores go: one `recfb etl` run with the wall and process CPU seconds of each
stage, so a stage that keeps one of the cores idle shows as cores used near 1.

    python benchmarks/etl_stages.py /tmp/recfb-bench/sim-50000000/events --out /tmp/etl-stages

The events are benchmarks/etl.py's simulated parquet files (generated there). Prints a
Markdown table; nothing is written under benchmarks/results.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from recfb import progress  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("events", help="a parquet file, directory or glob of events")
    parser.add_argument("--out", default="/tmp/recfb-etl-stages", help="ETL output directory")
    parser.add_argument("--signals", default=str(ROOT / "conf/signals/simulator.yaml"))
    args = parser.parse_args()
    rows: list[tuple[str, float, float]] = []

    @contextlib.contextmanager
    def stage(self: progress.StageTimer, name: str) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        self.seconds[name] = round(wall, 3)
        rows.append((name, wall, cpu))

    progress.StageTimer.stage = stage  # type: ignore[method-assign]
    from recfb.config import build_model
    from recfb.etl import EtlConfig, run_etl

    spec = {"input": {"paths": [args.events], "format": "parquet"}, "signals": args.signals}
    cfg = build_model(EtlConfig, spec | {"out": args.out}, "etl_stages")
    wall, cpu = time.perf_counter(), time.process_time()
    run_etl(cfg, quiet=True)
    rows.append(("whole ETL", time.perf_counter() - wall, time.process_time() - cpu))
    print("| stage | wall s | CPU s | cores used |\n|---|---:|---:|---:|")
    for name, w, c in rows:
        print(f"| {name} | {w:.2f} | {c:.2f} | {c / w if w else 0:.2f} |")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"\npeak RSS {peak:.2f} GiB")


if __name__ == "__main__":
    main()

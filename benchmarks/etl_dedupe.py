"""The dedupe rules' time (`_first_occurrence`: event_id, then user/item/event/ts among the
survivors) for one or more checkouts, in turn, on the same key columns: an A/B of the stage
that a whole-ETL run on a noisy machine cannot resolve.

    python benchmarks/etl_dedupe.py /tmp/recfb-bench/sim-50000000/events \\
        /tmp/wt-base . /tmp/wt-base .

Each checkout runs in its own process (PYTHONPATH=<checkout>), `--calls` times.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import run_in_checkout  # noqa: E402

_CHILD = """
import json, sys, time
import polars as pl
from recfb.etl.pipeline import _first_occurrence
keys = ["event_id", "user_id", "item_id", "event", "ts"]
events = pl.read_parquet(sys.argv[1], columns=keys).rechunk()
events = events.with_columns(pl.col("event").cast(pl.Categorical))
out = {"event_id_s": [], "four_keys_s": []}
for _ in range(int(sys.argv[2])):
    start = time.perf_counter()
    first = _first_occurrence(events, ["event_id"])
    out["event_id_s"].append(round(time.perf_counter() - start, 3))
    start = time.perf_counter()
    kept = _first_occurrence(events, keys[1:], within=first)
    out["four_keys_s"].append(round(time.perf_counter() - start, 3))
out["kept"] = int(kept.sum())
print(json.dumps(out))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("events", help="a directory of parquet events (benchmarks/etl.py's)")
    parser.add_argument("checkouts", nargs="+", help="recfb checkouts, run in this order")
    parser.add_argument("--calls", type=int, default=3)
    args = parser.parse_args()
    pattern = os.path.join(args.events, "*.parquet")
    for checkout in args.checkouts:
        output = run_in_checkout(checkout, _CHILD, [pattern, str(args.calls)])
        print(json.dumps({"checkout": checkout} | json.loads(output.splitlines()[-1])))


if __name__ == "__main__":
    main()

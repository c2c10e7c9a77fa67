"""Wall time of the nightly pipeline on a simulated log, stage by stage.

    python benchmarks/pipeline_nightly.py --events 10000000
writes benchmarks/results/pipeline_nightly.json (stage seconds, sizes, CPU steal).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import cpu_steal, steal_share  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--events", type=int, default=10_000_000)
    ap.add_argument("--users", type=int, default=200_000)
    ap.add_argument("--items", type=int, default=50_000)
    ap.add_argument("--work", default="/tmp/recfb-nightly-bench")
    args = ap.parse_args()
    os.chdir(ROOT)  # the definition's conf paths are relative to the repository root
    work = Path(args.work)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlruns.db'}"

    from recfb.pipeline import load_pipeline, run_pipeline
    from recfb.simulate import SimConfig, simulate

    sim_dir = work / "sim"
    t0 = time.perf_counter()
    if not (sim_dir / "events").exists():
        simulate(
            SimConfig(seed=1, n_users=args.users, n_items=args.items, n_events=args.events),
            sim_dir,
            overwrite=True,
        )
    sim_s = time.perf_counter() - t0
    spec = load_pipeline(ROOT / "pipelines" / "nightly.yaml")
    spec.work_dir = str(work / "pipelines")
    spec.stages["etl"].set = [f"input.paths=['{sim_dir / 'events'}']"]
    spec.stages["index"].set = [f"models_dir={work / 'models'}"]
    steal0 = cpu_steal()
    t0 = time.perf_counter()
    result = run_pipeline(spec)
    total = time.perf_counter() - t0
    out = {
        "events": args.events,
        "users": args.users,
        "items": args.items,
        "simulate_s": sim_s,
        "pipeline_s": total,
        "stages_s": {n: r.seconds for n, r in result.stages.items()},
        "statuses": {n: r.status for n, r in result.stages.items()},
        "rows_in": result.stages["etl"].outputs.get("rows_in"),
        "gate": result.stages["promote"].outputs,
        "cpu_steal": steal_share(steal0, cpu_steal()),
    }
    print(json.dumps(out, indent=2, default=str))
    (ROOT / "benchmarks" / "results" / "pipeline_nightly.json").write_text(
        json.dumps(out, indent=2, default=str)
    )


if __name__ == "__main__":
    main()

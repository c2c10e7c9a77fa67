"""Training on Ray Train: wall time and the peak memory of each training worker and of the
driver, for `recfb train --engine ray` on an ETL output (a private local cluster with
`--workers` CPUs; every command the user's own, in its own process).

    python benchmarks/ray_train_memory.py --data /tmp/recfb-bench/etl --workers 2 \
        --epochs 1 --label shards --out benchmarks/results/ray_train_memory.json

Rows are appended under `--label`, so the same script run from an older checkout (with
PYTHONPATH naming it, so that the driver and the Ray workers import that code) gives the
before/after pair. The shard each worker read is the run's `ray.train_shards` parameter.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.scale import RECFB, timed  # noqa: E402
from recfb.distributed.local import ENV, LocalCluster  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="an ETL output directory")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--model", default="mf", help="conf/models/<model>.yaml")
    parser.add_argument("--label", required=True)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks/results/ray_train_memory.json"
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="recfb-ray-train-mem-"))
    env = ENV | {"MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlruns.db'}"}
    cluster = LocalCluster(cpus=args.workers, object_store_bytes=2 << 30)
    try:
        cmd = [
            *RECFB,
            "train",
            "-c",
            str(ROOT / "conf" / "models" / f"{args.model}.yaml"),
            "--engine",
            "ray",
            "--address",
            cluster.address,
        ]
        settings = [f"data={args.data}", f"trainer.max_epochs={args.epochs}"]
        settings += [f"ray.workers={args.workers}", "experiment=ray-train-memory"]
        for setting in settings:
            cmd += ["--set", setting]
        row = timed(cmd, env | {"PYTHONPATH": os.environ.get("PYTHONPATH", "")})
    finally:
        cluster.stop()
    row |= {"data": str(args.data), "workers": args.workers, "epochs": args.epochs}
    print(args.label, json.dumps(row), flush=True)
    rows = json.loads(args.out.read_text()) if args.out.exists() else {}
    rows[args.label] = row
    args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()

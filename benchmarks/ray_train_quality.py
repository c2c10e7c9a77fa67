"""Training on Ray Train against one process: valid and test NDCG@20 of the shipped MF config
on MovieLens 100k, several seeds each (the seed noise the test of the Ray engine states).

    RAY_AUTH_MODE=disabled python benchmarks/ray_train_quality.py --seeds 5 \
        --out benchmarks/results/ray_train_movielens.json

The ETL output is made from ../shared/data/ml-100k (conf/datasets/movielens.yaml) unless
--data names one; the Ray runs start a private local cluster (`ray.workers` 2).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    from recfb.config import load_config
    from recfb.etl import EtlConfig, run_etl
    from recfb.recommender import train
    from recfb.train.config import TrainConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks/results/ray_train_movielens.json"
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="recfb-ray-quality-"))
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlruns.db'}")
    data = args.data
    if data is None:
        data = work / "ml"
        cfg = load_config(EtlConfig, ROOT / "conf/datasets/movielens.yaml", [f"out={data}"])
        run_etl(cfg, quiet=True)
    runs: dict[str, dict[str, float]] = {}
    for engine in ("local", "ray"):
        for seed in range(args.seeds):
            sets = [f"data={data}", "eval.exclude=any", f"seed={seed}", f"engine={engine}"]
            sets.append(f"ray.workers={args.workers}")
            cfg = load_config(TrainConfig, ROOT / "conf/models/mf.yaml", sets)
            start = time.perf_counter()
            result = train(cfg, quiet=True)
            runs[f"{engine}-{seed}"] = {
                "valid": result.metrics["valid/ndcg@20"],
                "test": result.metrics["test/ndcg@20"],
                "s": time.perf_counter() - start,
            }
            print(engine, seed, runs[f"{engine}-{seed}"], flush=True)
    summary = {}
    for engine in ("local", "ray"):
        for split in ("valid", "test"):
            values = [v[split] for k, v in runs.items() if k.startswith(engine)]
            summary[f"{engine}/{split}"] = {
                "mean": statistics.mean(values),
                "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            }
    args.out.write_text(json.dumps({"runs": runs, "summary": summary}, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()

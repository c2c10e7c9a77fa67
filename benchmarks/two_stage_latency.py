"""Where a two-stage request's time goes, from the server's own stage histograms.

    python benchmarks/two_stage_latency.py --bundle models/NAME [--requests 500]

Loads a two-stage bundle (one written by the pipeline's index stage after a rank stage) into
the real app in process, posts a few fresh events for a share of the users (so the history
source and the pair features see the log), sends single-user requests one after another and
reads `recfb_stage_seconds` back from /metrics: mean milliseconds per stage (fold-in, ANN
search, candidates, features, ranker, ...) and the client-side p50 / p99. In process and one
at a time: the service's own work, not HTTP or load; `serving/loadtest.py` measures that.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    from fastapi.testclient import TestClient

    from recfb.serving.app import create_app
    from recfb.serving.config import ServeConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks/results/two_stage_latency.json"
    )
    args = parser.parse_args()
    users = pl.read_parquet(args.bundle / "users.parquet")["user_id"].cast(pl.String).to_list()
    items = pl.read_parquet(args.bundle / "items.parquet")["item_id"].cast(pl.String).to_list()
    rng = np.random.default_rng(0)
    picked = [users[i] for i in rng.choice(len(users), size=args.requests)]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = ServeConfig(bundle=str(args.bundle), event_log=str(Path(tmp) / "events.db"))
        with TestClient(create_app(cfg, "bench-key")) as client:
            now = int(time.time() * 1000)
            events = [
                {
                    "event_id": f"b{j}",
                    "user_id": u,
                    "item_id": items[int(rng.integers(len(items)))],
                    "event": "view",
                    "ts": now - 1000 * j,
                }
                for j, u in enumerate(picked[: args.requests // 4])
            ]
            client.post("/v1/events", json={"events": events}, headers={"X-API-Key": "bench-key"})
            for u in picked[:20]:  # warm-up
                client.get(f"/v1/users/{u}/recommendations", params={"k": args.k})
            before = stage_sums(client.get("/metrics").text)
            latency = []
            for u in picked:
                t = time.perf_counter()
                r = client.get(f"/v1/users/{u}/recommendations", params={"k": args.k})
                latency.append(time.perf_counter() - t)
                assert r.status_code == 200, r.text
            after = stage_sums(client.get("/metrics").text)
    n = len(picked)
    stages = {s: 1000 * (after[s] - before.get(s, 0.0)) / n for s in after}
    result = {
        "bundle": str(args.bundle),
        "items": len(items),
        "requests": n,
        "client_p50_ms": 1000 * float(np.percentile(latency, 50)),
        "client_p99_ms": 1000 * float(np.percentile(latency, 99)),
        "stage_mean_ms": stages,
    }
    rank = sum(stages.get(s, 0.0) for s in ("candidates", "features", "ranker"))
    result["two_stage_share_of_server_time"] = rank / max(sum(stages.values()), 1e-12)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


def stage_sums(text: str) -> dict[str, float]:
    out = {}
    for stage, value in re.findall(
        r'recfb_stage_seconds_sum\{stage="([^"]+)"\} ([0-9.e+-]+)', text
    ):
        out[stage] = float(value)
    return out


if __name__ == "__main__":
    main()

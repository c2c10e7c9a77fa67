"""Per-request CPU of the two-stage path, in process: no HTTP, no event log, no load.

    python benchmarks/two_stage_profile.py --bundle /tmp/recfb-loadtest/synthetic-1000000-two-stage
        [--requests 2000] [--profile 30] [--out FILE]

Loads the bundle as the service does (`load_bundle(mmap=True)` + `ServingBundle`), gives a
quarter of the users five fresh logged events each (so the history source and the pair
features see the log), then calls `recfb.serving.lists.served_list` for `--requests` users one
after another and reports the mean microseconds per stage (`Timings`: foldin, filter, search,
candidates, features, ranker) and the whole call, the CPU steal share, and a digest of every
served list (item ids and scores) so two versions of the code can be checked to serve the
same lists. `--profile N` adds cProfile's top N functions by own time over a second pass.
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import json
import pstats
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    from benchmarks.common import cpu_steal, steal_share
    from recfb.index import load_bundle
    from recfb.serving.config import ServeConfig
    from recfb.serving.eventlog import LoggedEvent
    from recfb.serving.lists import served_list
    from recfb.serving.retrieval import ServingBundle, Timings

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--profile", type=int, default=0, help="cProfile's top N (0: none)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    started = time.perf_counter()
    served = ServingBundle(load_bundle(args.bundle, device="cpu", mmap=True), ServeConfig())
    load_s = time.perf_counter() - started
    if served.online is None:
        raise SystemExit(f"{args.bundle} is not a two-stage bundle")
    n_users, n_items = len(served.user_row), len(served.item_ids)
    rng = np.random.default_rng(0)
    users = [f"u{u}" for u in rng.integers(0, n_users, args.requests)]
    now = served.online.snap.now_ms + 60_000
    names = ["view", "click", "purchase"]
    logged = {
        u: [
            LoggedEvent(f"i{rng.integers(n_items)}", names[int(rng.integers(3))], now - 1000 * j)
            for j in range(5, 0, -1)
        ]
        for u in users[: args.requests // 4]
    }

    def one_pass(stages: dict[str, float], digest) -> float:
        total = 0.0
        for u in users:
            timings = Timings()
            t0 = time.perf_counter()
            ids, scores, _ = served_list(
                served, u, logged.get(u, []), args.k, [], None, now, timings=timings
            )
            total += time.perf_counter() - t0
            for stage, seconds in timings.stages.items():
                stages[stage] = stages.get(stage, 0.0) + seconds
            if digest is not None:
                digest.update(json.dumps([ids, scores]).encode())
        return total

    one_pass({}, None)  # warm-up: caches, lazy imports, mapped pages
    stages: dict[str, float] = {}
    digest = hashlib.sha256()
    steal0 = cpu_steal()
    total = one_pass(stages, digest)
    result = {
        "bundle": str(args.bundle),
        "requests": args.requests,
        "load_s": round(load_s, 1),
        "mean_us": {s: round(v / args.requests * 1e6, 1) for s, v in stages.items()},
        "served_list_us": round(total / args.requests * 1e6, 1),
        "cpu_steal_share": steal_share(steal0, cpu_steal()),
        "lists_sha256": digest.hexdigest(),
    }
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        one_pass({}, None)
        prof.disable()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(args.profile)
        print(text.getvalue(), file=sys.stderr)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""The closed-loop policy table (recfb loop) with the wall time of each loop and the CPU
steal share while it ran: writes benchmarks/results/loop.md (+ loop.json, curves).

    flock /tmp/recfb-bench.lock python benchmarks/loop.py --days 14 --seeds 1,2,3
    python benchmarks/loop.py --policies random,oracle,mf --days 3 --seeds 1   # quick
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import cpu_steal, steal_share  # noqa: E402
from recfb.loop.config import load_loop_config  # noqa: E402
from recfb.loop.report import run_policies  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "conf/loop.yaml"))
    ap.add_argument("--policies", default=None, help="comma-separated; default all")
    ap.add_argument("--days", type=int, default=None)
    ap.add_argument("--seeds", default=None)
    ap.add_argument("--set", action="append", default=[], help="LoopConfig override")
    ap.add_argument("--work", default="/tmp/recfb-loop-bench")
    ap.add_argument("--name", default="loop", help="results file stem")
    args = ap.parse_args()
    extra = [f"days={args.days}"] if args.days else []
    cfg = load_loop_config(args.config, [*args.set, *extra])
    policies = args.policies.split(",") if args.policies else list(cfg.policies)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else cfg.seeds
    steal0, started = cpu_steal(), time.perf_counter()
    results, report = run_policies(
        cfg, policies, seeds, args.work, track=False, progress=lambda m: print(m, flush=True)
    )
    wall = time.perf_counter() - started
    steal = steal_share(steal0, cpu_steal())
    out = ROOT / "benchmarks" / "results"
    command = " ".join(["python benchmarks/loop.py", *sys.argv[1:]])
    head = (
        f"Command: `{command}` (config {Path(args.config).name}); total wall {wall:.0f} s, "
        f"CPU steal share {steal:.1%} while it ran; other agents' jobs shared the 2 cores.\n\n"
    )
    text = report.read_text().replace("](loop_", f"]({args.name}_curves/loop_")
    (out / f"{args.name}.md").write_text(text.replace("\n\n", "\n\n" + head, 1))
    curves = out / f"{args.name}_curves"
    curves.mkdir(exist_ok=True)
    for png in Path(args.work).glob("loop_*.png"):
        shutil.copy(png, curves / png.name)
    shutil.copy(Path(args.work) / "daily.csv", out / f"{args.name}_daily.csv")
    summary = [
        {"policy": r.policy, "seed": r.seed, "wall_s": round(r.wall_s, 1), "skipped": r.skipped}
        | {k: round(v, 5) for k, v in r.summary.items()}
        for r in results
    ]
    (out / f"{args.name}.json").write_text(
        json.dumps({"command": command, "wall_s": wall, "steal": steal, "runs": summary}, indent=1)
    )
    print(json.dumps({"wall_s": round(wall, 1), "steal": steal}))


if __name__ == "__main__":
    main()

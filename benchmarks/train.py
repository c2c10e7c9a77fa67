"""Training speed and peak memory: MF-BPR, LightGCN, GNOLR vs `implicit` ALS/BPR.

    python benchmarks/train.py --sizes 100000 1000000 10000000

For each size a simulated shop is generated with about that many train interactions (pairs)
and run through the ETL. Each model then trains in its own child process (peak RSS from
wait4) for a bounded number of steps; seconds per epoch = measured seconds per step x steps
per epoch (batch 4096 for MF/GNOLR, 16384 for LightGCN, whose every step propagates over the
whole graph). `implicit` ALS and BPR run one full iteration (= one epoch) on the same pairs
in the same run. Results: a Markdown table and benchmarks/results/train.json.
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

from benchmarks.common import run_child, simulated_etl  # noqa: E402

BATCH = {"mf": 4096, "gnolr": 4096, "lightgcn": 16384}


def child(family: str, etl: str, steps: int) -> dict:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    from recfb.config import build_model
    from recfb.train.config import TrainConfig
    from recfb.train.data import Interactions

    data = Interactions.load(etl)
    n_pairs = data.train.filter(data.train["label"] >= 1).height
    if family in ("als", "bpr_implicit"):
        from recfb.models.baselines import make_baseline

        model = make_baseline(family, factors=64, iterations=1)
        start = time.perf_counter()
        model.fit(data.train, data.n_users, data.n_items)
        return {"pairs": n_pairs, "epoch_s": time.perf_counter() - start, "measured": "1 epoch"}

    from recfb.train.loop import build_model as build_recfb_model

    cfg = build_model(
        TrainConfig,
        {
            "data": etl,
            "model": {"family": family, "dim": 64 if family != "gnolr" else 32},
            "trainer": {"batch_size": BATCH[family]},
        },
        "bench",
    )
    model = build_recfb_model(cfg, data)
    optimizers = model.configure_optimizers()
    model.train()
    n = len(model.pos_users)
    per_epoch = (n + BATCH[family] - 1) // BATCH[family]
    steps = min(steps, per_epoch)
    perm = torch.randperm(n)

    def step(i: int) -> None:
        idx = perm[(i * BATCH[family]) % n :][: BATCH[family]]
        loss = model.batch_loss(idx)
        for opt in optimizers:
            opt.zero_grad()
        loss.backward()
        for opt in optimizers:
            opt.step()

    step(0)  # warm-up
    start = time.perf_counter()
    for i in range(1, steps + 1):
        step(i)
    per_step = (time.perf_counter() - start) / steps
    return {
        "pairs": n_pairs,
        "epoch_s": per_step * per_epoch,
        "measured": f"{steps} of {per_epoch} steps",
    }


def measure(args: list[str]) -> dict:
    return run_child(__file__, args)


def prepare(pairs: int, work: Path) -> Path:
    from recfb.simulate import SimConfig

    events = int(pairs * 1.35)  # the simulator yields ~0.8 train pairs per event
    cfg = SimConfig(
        seed=2, n_events=events, n_users=max(2000, events // 40), n_items=max(2000, events // 400)
    )
    etl = work / f"pairs-{pairs}" / "etl"
    if (etl / "stats.json").exists():
        return etl
    return simulated_etl(cfg, work / f"pairs-{pairs}", split={"method": "none"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--work", type=Path, default=Path("/tmp/recfb-train-bench"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--child")
    parser.add_argument("--etl")
    parser.add_argument("--prepare", type=int, help="(internal) simulate + ETL one size")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.etl, args.steps)))
        return
    if args.prepare:
        print(json.dumps({"etl": str(prepare(args.prepare, args.work))}))
        return
    rows = []
    for size in args.sizes:
        # data is prepared in a child too: a child's peak RSS starts from its parent's at
        # fork, so the parent must stay small for the children's figures to mean anything
        etl = run_child(__file__, ["--prepare", str(size), "--work", str(args.work)])["etl"]
        for family in ("mf", "lightgcn", "gnolr", "als", "bpr_implicit"):
            r = measure(["--child", family, "--etl", str(etl), "--steps", str(args.steps)])
            r |= {"size": size, "model": family}
            rows.append(r)
            print(json.dumps(r), file=sys.stderr, flush=True)
    (ROOT / "benchmarks/results/train.json").write_text(
        json.dumps(
            {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "rows": rows}, indent=2
        )
        + "\n"
    )
    print(
        "| train pairs | model | s / epoch | peak RSS GiB | vs implicit ALS epoch | measured "
        "| CPU steal |"
    )
    print("|---:|---|---:|---:|---:|---|---:|")
    for r in rows:
        als = next(x for x in rows if x["size"] == r["size"] and x["model"] == "als")
        print(
            f"| {r['pairs']:,} | {r['model']} | {r['epoch_s']:.1f} | {r['peak_rss_gib']:.2f} | "
            f"{r['epoch_s'] / als['epoch_s']:.1f}x | {r['measured']} | "
            f"{r['cpu_steal_share']:.0%} |"
        )


if __name__ == "__main__":
    main()

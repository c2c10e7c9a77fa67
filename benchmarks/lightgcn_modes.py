"""LightGCN's propagation modes: full graph every step vs the pruned top-m operator.

    python benchmarks/lightgcn_modes.py quality --datasets movielens taobao --modes full 8 16 32
    python benchmarks/lightgcn_modes.py speed --size 1000000 --modes full 8 16 32
    python benchmarks/lightgcn_modes.py speed --size 10000000 --modes 8:before 8
    python benchmarks/lightgcn_modes.py profile --size 10000000 --modes 8:before 8
    python benchmarks/lightgcn_modes.py speed --size 10000000 --modes 8:autograd 8 \
        --trainer optimizer=sgd lr=0.2

quality: each dataset's ETL (conf/datasets/<name>.yaml, as benchmarks/quality.py runs it),
then LightGCN trained per mode with quality.py's settings (batch 1024, lr 0.005, patience 4
on valid NDCG@20, full ranking); reports valid NDCG@10 at the restored (best) epoch, test
NDCG@10, epochs and fit seconds per epoch (steps plus the per-epoch validation).
speed: the simulated shop of benchmarks/train.py at `--size` pairs; each mode is timed by
train.py's own child (recfb train's loop at train.py's LightGCN batch size, `--budget`
seconds of steps, extrapolated to an epoch) and implicit ALS runs one epoch on the same pairs
in the same run. The top-m operator is built once per fit (timed apart: `operator_s`).
profile: where one step's time goes (the model's own methods, timed apart: loader, sampling
+ forward, backward, optimiser; a closed-form step counts as backward; then torch.profiler's
top operators over a few steps). `--trainer KEY=VALUE` sets trainer keys over the part's own.
A mode is `full` or the top-m width m; `m:before` is top-m with the step as it was before
the 10M work (autograd's embedding-bag backward into a fresh table-sized gradient, foreach
Adam), `m:autograd` as it was before the closed-form step (autograd into the kept gradient
buffer, fused Adam), patched in here only, for a same-run comparison. Each run is a child
process (peak RSS, CPU steal share). Results:
benchmarks/results/lightgcn_modes_<part>.json and a Markdown table.
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

import yaml  # noqa: E402

from benchmarks.common import run_child  # noqa: E402

TRAIN_SCRIPT = str(ROOT / "benchmarks" / "train.py")


def mode_config(mode: str) -> dict:
    if mode == "full":
        return {"propagation": "full"}
    return {"propagation": "topm", "topm": int(mode.split(":")[0])}


def use_step_before(mode: str) -> None:
    """For an `m:before` mode: the top-m step as it was before the 10M work (autograd's
    dense embedding-bag backward, a fresh gradient each step; the base's foreach Adam); for
    `m:autograd`, as it was before the closed-form step (autograd into the kept buffer)."""
    from recfb.models.base import EmbeddingRecommender
    from recfb.models.lightgcn import LightGCN

    if mode.endswith(":autograd"):
        LightGCN.closed_form_backward = EmbeddingRecommender.closed_form_backward  # type: ignore[method-assign]
        return
    if not mode.endswith(":before"):
        return

    init = LightGCN.__init__

    def patched(self, *args, **kwargs) -> None:
        init(self, *args, **kwargs)
        self._bag_into_grad = False

    LightGCN.__init__ = patched  # type: ignore[method-assign]
    LightGCN.configure_optimizers = EmbeddingRecommender.configure_optimizers  # type: ignore[method-assign]


def quality_child(
    dataset: str, mode: str, work: Path, epochs: int, seed: int, trainer: dict
) -> dict:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    use_step_before(mode)
    from benchmarks.quality import DATASETS
    from recfb.config import build_model
    from recfb.recommender import train
    from recfb.train.config import TrainConfig

    os.chdir(ROOT)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlruns.db'}")
    _, eval_rule = DATASETS[dataset]
    data = {
        "data": str(work / "etl"),
        "experiment": f"lightgcn-modes-{dataset}",
        "run_name": f"lightgcn-{mode}",
        "model": {"family": "lightgcn", "dim": 64} | mode_config(mode),
        "trainer": {"max_epochs": epochs, "batch_size": 1024, "patience": 4, "lr": 0.005} | trainer,
        "eval": {"ks": [10, 20, 50]} | eval_rule,
        "seed": seed,
    }
    cfg = build_model(TrainConfig, data, "bench")
    start = time.perf_counter()
    result = train(cfg, quiet=True)
    seconds = time.perf_counter() - start
    scored = [r for r in result.history if "valid/ndcg@20" in r]
    best = max(scored, key=lambda r: r["valid/ndcg@20"]) if scored else {}
    return {
        "valid_ndcg@10": best.get("valid/ndcg@10"),
        "valid_ndcg@20": best.get("valid/ndcg@20"),
        "best_epoch": best.get("epoch"),
        "test_ndcg@10": result.metrics.get("test/ndcg@10"),
        "epochs": len(result.history),
        "fit_s": seconds,
        "s_per_epoch": seconds / max(len(result.history), 1),
    }


def speed_child(mode: str, etl: str, budget: float, batch: int | None, trainer: dict) -> dict:
    """benchmarks/train.py's timed epoch, with this mode's model settings (and batch size,
    when given: train.py's LightGCN batch otherwise)."""
    import benchmarks.train as bench

    use_step_before(mode)
    base = bench._config

    def config(family: str, etl: str, extra: dict | None = None):
        extra = dict(extra or {})
        extra["model"] = extra.get("model", {}) | mode_config(mode)
        extra["trainer"] = extra.get("trainer", {}) | trainer
        if batch:
            extra["trainer"] = extra["trainer"] | {"batch_size": batch}
        return base(family, etl, extra)

    bench._config = config
    out = bench.child("lightgcn", etl, budget)
    if mode != "full":  # the operator, built once per fit (outside the timed steps)
        from recfb.models.lightgcn import propagation_operator
        from recfb.train import loop
        from recfb.train.data import Interactions

        model = loop.build_model(config("lightgcn", etl), Interactions.load(etl))
        start = time.perf_counter()
        propagation_operator(model.adjacency, model.cfg.model.layers, model.cfg.model.topm)
        out["operator_s"] = time.perf_counter() - start
    return out


def profile_child(mode: str, etl: str, steps: int, trainer: dict) -> dict:
    """One step's parts in wall ms (mean over `steps` after two warm-up steps) and
    torch.profiler's operators by self CPU time over 3 more steps."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    import benchmarks.train as bench
    from recfb.train import loop
    from recfb.train.data import Interactions

    torch.set_num_threads(os.cpu_count() or 1)
    # as recfb train's trainer sets it (Lightning's deterministic=True)
    torch.use_deterministic_algorithms(True)
    use_step_before(mode)
    data = Interactions.load(etl)
    epoch = {"max_epochs": 1} | trainer
    cfg = bench._config("lightgcn", etl, {"trainer": epoch, "model": mode_config(mode)})
    model = loop.build_model(cfg, data)
    model.on_fit_start()
    optimizers = model.configure_optimizers()
    model.train()
    batches = iter(loop._loader(model, cfg))
    names = ("loader", "zero_grad", "forward", "backward", "optimizer")
    parts = dict.fromkeys(names, 0.0)

    def step(timed: bool) -> None:
        t0 = time.perf_counter()
        idx = next(batches)
        t1 = time.perf_counter()
        for opt in optimizers:
            opt.zero_grad()
        t2 = time.perf_counter()
        # the closed-form step (sampling, propagation, loss and gradient, no autograd) is
        # timed as the backward; else sampling, propagation of the batch's nodes, the loss
        loss = model.closed_form_backward(idx)
        if loss is None:
            loss = model.batch_loss(idx)
            t3 = time.perf_counter()
            loss.backward()
        else:
            t3 = t2
        t4 = time.perf_counter()
        for opt in optimizers:
            opt.step()
        t5 = time.perf_counter()
        if timed:
            for key, a, b in zip(parts, (t0, t1, t2, t3, t4), (t1, t2, t3, t4, t5), strict=True):
                parts[key] += b - a

    for i in range(steps + 2):
        step(i >= 2)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step(False)
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    top = {e.key: e.self_cpu_time_total / 3000 for e in ops[:12]}  # ms a step
    ms = {k: 1000 * v / steps for k, v in parts.items()}
    return {
        "pairs": len(model.pos_users),
        "batch_size": cfg.trainer.batch_size,
        "step_ms": sum(ms.values()),
        "parts_ms": ms,
        "top_ops_self_cpu_ms": top,
        "table_rows": model.embedding.weight.shape[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["quality", "speed", "profile"])
    parser.add_argument("--datasets", nargs="+", default=["movielens", "taobao"])
    parser.add_argument("--modes", nargs="+", default=["full", "8", "16", "32"])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--size", type=int, default=1_000_000)
    parser.add_argument("--budget", type=float, default=30.0)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (profile)")
    parser.add_argument("--batch", type=int, help="batch size (speed; default train.py's)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/recfb-lightgcn-modes"))
    parser.add_argument("--train-work", type=Path, default=Path("/tmp/recfb-train-bench"))
    parser.add_argument("--child", help="(internal) one mode")
    parser.add_argument("--dataset", help="(internal)")
    parser.add_argument("--etl", help="(internal)")
    parser.add_argument("--tag", default="")
    parser.add_argument("--seed", type=int, default=0, help="training seed (quality)")
    parser.add_argument(
        "--trainer",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="trainer settings over the part's own, e.g. optimizer=sgd lr=0.1",
    )
    args = parser.parse_args()
    trainer = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.trainer)}
    passed = ["--trainer", *args.trainer] if args.trainer else []
    if args.child and args.part == "quality":
        work = args.work / args.dataset
        print(
            json.dumps(
                quality_child(args.dataset, args.child, work, args.epochs, args.seed, trainer)
            )
        )
        return
    if args.child and args.part == "profile":
        print(json.dumps(profile_child(args.child, args.etl, args.steps, trainer)))
        return
    if args.child:
        print(json.dumps(speed_child(args.child, args.etl, args.budget, args.batch, trainer)))
        return
    rows = []
    if args.part == "quality":
        from benchmarks.quality import DATASETS
        from recfb.config import load_config
        from recfb.etl import EtlConfig, run_etl

        os.chdir(ROOT)
        for dataset in args.datasets:
            work = args.work / dataset
            work.mkdir(parents=True, exist_ok=True)
            etl_cfg = load_config(EtlConfig, DATASETS[dataset][0], [f"out={work / 'etl'}"])
            run_etl(etl_cfg, quiet=True)
            # create the MLflow store now, so its one-off set-up is not timed in a mode's fit
            import mlflow

            mlflow.set_tracking_uri(f"sqlite:///{work / 'mlruns.db'}")
            mlflow.search_experiments()
            for mode in args.modes:
                cmd = ["quality", "--child", mode, "--dataset", dataset, "--work", str(args.work)]
                cmd += ["--epochs", str(args.epochs), "--seed", str(args.seed), *passed]
                r = run_child(__file__, cmd)
                row = {"dataset": dataset, "mode": mode, "seed": args.seed, "trainer": trainer}
                rows.append(row | r)
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    elif args.part == "profile":
        work = ["--work", str(args.train_work)]
        etl = run_child(TRAIN_SCRIPT, ["--prepare", str(args.size), *work])["etl"]
        for mode in args.modes:
            cmd = ["profile", "--child", mode, "--etl", etl, "--steps", str(args.steps), *passed]
            rows.append({"mode": mode, "trainer": trainer} | run_child(__file__, cmd))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    else:
        work = ["--work", str(args.train_work)]
        etl = run_child(TRAIN_SCRIPT, ["--prepare", str(args.size), *work])["etl"]
        for mode in args.modes:
            cmd = ["speed", "--child", mode, "--etl", etl, "--budget", str(args.budget)]
            cmd += ["--batch", str(args.batch)] if args.batch else []
            cmd += passed
            rows.append({"mode": mode, "trainer": trainer} | run_child(__file__, cmd))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        als = run_child(TRAIN_SCRIPT, ["--child", "als", "--etl", etl])
        rows.append({"mode": "implicit ALS"} | als)
    out = ROOT / "benchmarks" / "results" / f"lightgcn_modes_{args.part}{args.tag}.json"
    out.write_text(json.dumps({"cores": os.cpu_count(), "rows": rows}, indent=2) + "\n")
    if args.part == "quality":
        print("| dataset | mode | valid NDCG@10 | test NDCG@10 | epochs | s / epoch | CPU steal |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for r in rows:
            print(
                f"| {r['dataset']} | {_name(r['mode'])} | {r['valid_ndcg@10']:.4f} | "
                f"{r['test_ndcg@10']:.4f} | {r['epochs']} | {r['s_per_epoch']:.1f} | "
                f"{r['cpu_steal_share']:.0%} |"
            )
        return
    if args.part == "profile":
        for r in rows:
            print(
                f"\n{_name(r['mode'])}: {r['step_ms']:.1f} ms a step (batch {r['batch_size']}, "
                f"{r['pairs']:,} pairs, CPU steal {r['cpu_steal_share']:.0%})"
            )
            print("| part | ms |\n|---|---:|")
            for k, v in r["parts_ms"].items():
                print(f"| {k} | {v:.1f} |")
            print("| operator (self CPU, mean of 3 steps) | ms |\n|---|---:|")
            for k, v in r["top_ops_self_cpu_ms"].items():
                print(f"| {k[:60]} | {v:.1f} |")
        return
    ref = rows[-1]["epoch_s"]
    print(
        "| train pairs | mode | s / epoch | vs implicit ALS | operator s (once per fit) "
        "| peak RSS GiB | measured | CPU steal |"
    )
    print("|---:|---|---:|---:|---:|---:|---|---:|")
    for r in rows:
        op = f"{r['operator_s']:.1f}" if "operator_s" in r else ""
        batch = f", batch {r['batch_size']}" if "batch_size" in r else ""
        print(
            f"| {r['pairs']:,} | {_name(r['mode'])}{batch} | {r['epoch_s']:.2f} | "
            f"{r['epoch_s'] / ref:.1f}x | {op} | {r['peak_rss_gib']:.2f} | "
            f"{r['measured']} | {r['cpu_steal_share']:.0%} |"
        )


def _name(mode: str) -> str:
    if not mode[0].isdigit():
        return mode
    m, _, step = mode.partition(":")
    return (
        f"topm m={m}" + {"": "", "before": " (step before)", "autograd": " (autograd step)"}[step]
    )


if __name__ == "__main__":
    main()

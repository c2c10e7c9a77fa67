"""Training speed and peak memory: MF-BPR, LightGCN, GNOLR vs `implicit` ALS/BPR.

    python benchmarks/train.py --sizes 1000000 10000000
    python benchmarks/train.py --profile 1000000 10000000   # where an MF step's time goes

For each size a simulated shop is generated with about that many train interactions (pairs)
and run through the ETL. Each model then trains in its own child process (peak RSS from
wait4) through the code path `recfb train` uses (its model, data loader and Lightning
trainer, `recfb.train.loop`) for one epoch, stopped after `--budget` seconds of steps when
the epoch is longer; seconds per epoch = measured seconds per step x steps per epoch.
`implicit` ALS and BPR run one full iteration (= one epoch) on the same pairs in the same
run. For sizes up to `--quality-max`, MF-BPR and implicit's BPR are also fitted in full on a
temporal split of the same simulation (train / valid / test windows; MF early-stops on the
valid window) and their test NDCG@10 is reported. Results: a Markdown table and
benchmarks/results/train.json.
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

# batch sizes timed: the train config's default for MF/GNOLR (None), larger for LightGCN's
# full-graph mode, whose every step propagates over the whole graph
BATCH: dict[str, int | None] = {"mf": None, "gnolr": None, "lightgcn": 16384}
DIM = {"mf": 64, "lightgcn": 64, "gnolr": 32}


def _config(family: str, etl: str, extra: dict | None = None):
    from recfb.config import build_model
    from recfb.train.config import TrainConfig

    data = {"data": etl, "model": {"family": family, "dim": DIM[family]}, "trainer": {}}
    if BATCH[family]:
        data["trainer"]["batch_size"] = BATCH[family]
    for key, value in (extra or {}).items():
        data[key] = data.get(key, {}) | value
    return build_model(TrainConfig, data, "bench")


def _threads() -> int:
    """--threads (0: all cores), passed to children through the environment."""
    return int(os.environ.get("RECFB_BENCH_THREADS", "0"))


def _mf_overrides(trainer: dict) -> dict:
    """Config sections for MF: `trainer` plus --mf-batch / --mf-lr / --mf-optim /
    --mf-negatives, passed to children through the environment."""
    env = os.environ.get
    trainer = dict(trainer)
    if env("RECFB_BENCH_MF_BATCH"):
        trainer["batch_size"] = int(env("RECFB_BENCH_MF_BATCH"))
    if env("RECFB_BENCH_MF_LR"):
        trainer["lr"] = float(env("RECFB_BENCH_MF_LR"))
    if env("RECFB_BENCH_MF_OPTIM"):
        trainer["optimizer"] = env("RECFB_BENCH_MF_OPTIM")
    sections = {"trainer": trainer}
    if env("RECFB_BENCH_MF_NEGATIVES"):
        sections["model"] = {"n_negatives": int(env("RECFB_BENCH_MF_NEGATIVES"))}
    if env("RECFB_BENCH_AUTOGRAD"):  # the autograd step, as before the closed form
        from recfb.models.mf import MatrixFactorization

        MatrixFactorization.closed_form_backward = lambda self, idx: None
    return sections


def child(family: str, etl: str, budget: float) -> dict:
    import torch

    torch.set_num_threads(_threads() or os.cpu_count() or 1)
    from recfb.train.data import Interactions

    data = Interactions.load(etl)
    n_pairs = data.train.filter(data.train["label"] >= 1).height
    if family in ("als", "bpr_implicit"):
        from recfb.models.baselines import make_baseline

        model = make_baseline(family, factors=64, iterations=1, num_threads=_threads())
        start = time.perf_counter()
        model.fit(data.train, data.n_users, data.n_items)
        return {"pairs": n_pairs, "epoch_s": time.perf_counter() - start, "measured": "1 epoch"}

    import lightning as L

    from recfb.train import loop

    epoch = {"trainer": {"max_epochs": 1}}
    cfg = _config(family, etl, _mf_overrides(epoch["trainer"]) if family == "mf" else epoch)
    model = loop.build_model(cfg, data)
    loader = loop.train_loader(model, cfg)
    per_epoch = len(loader)

    class Clock(L.Callback):
        """Times the steps after the first (warm-up); stops the epoch past the budget."""

        start = 0.0
        cpu_start = 0.0
        steps = 0

        def on_train_batch_end(self, trainer, *args) -> None:
            now = time.perf_counter()
            if not self.start:
                self.start, self.cpu_start = now, time.process_time()
                return
            self.steps += 1
            if now - self.start > budget:
                trainer.should_stop = True

    clock = Clock()
    with loop._lightning_quiet(True):
        trainer = loop._trainer(cfg, [clock], None, True)
        trainer.fit(model, loader)
    per_batch = (time.perf_counter() - clock.start) / max(clock.steps, 1)
    cpu_per_batch = (time.process_time() - clock.cpu_start) / max(clock.steps, 1)
    # a loader batch may hold several optimiser steps (loop.train_loader)
    steps = -(-loader.batch_sampler.batch_size // cfg.trainer.batch_size)
    return {
        "wall_per_step_s": per_batch / steps,
        "cpu_per_step_s": cpu_per_batch / steps,
        "pairs": n_pairs,
        "epoch_s": per_batch * per_epoch,
        "measured": f"{clock.steps + 1} of {per_epoch} loader batches of {steps} steps "
        "(recfb train's loop)",
        "batch_size": cfg.trainer.batch_size,
    }


def quality_child(family: str, etl: str, epochs: int) -> dict:
    """Test NDCG@10 of a full fit (MF: early stopping on the valid window) on a split."""
    import torch

    torch.set_num_threads(_threads() or os.cpu_count() or 1)
    from recfb.train.data import Interactions
    from recfb.train.loop import fit_model

    data = Interactions.load(etl)
    if family == "bpr_implicit":  # implicit's defaults (100 iterations), recfb's dim
        from recfb.config import build_model
        from recfb.train.config import TrainConfig

        spec = {"data": etl, "model": {"family": family, "dim": DIM["mf"]}}
        cfg = build_model(TrainConfig, spec, "bench")
    else:
        cfg = _config(family, etl, _mf_overrides({"max_epochs": epochs, "patience": 3}))
    start = time.perf_counter()
    fitted = fit_model(cfg, data)
    return {
        "ndcg@10": fitted.metrics.get("test/ndcg@10"),
        "valid_ndcg@20": fitted.metrics.get("valid/ndcg@20"),
        "epochs": len(fitted.history) or None,
        "fit_s": time.perf_counter() - start,
    }


def profile_child(etl: str, steps: int) -> dict:
    """Where an MF step's time goes: sampling, forward, backward, optimiser (timed apart on
    the model's own methods), and the whole step under Lightning for the rest."""
    import torch

    torch.set_num_threads(_threads() or os.cpu_count() or 1)
    from recfb.models.base import _sole_sgd_rate
    from recfb.train import loop
    from recfb.train.data import Interactions

    data = Interactions.load(etl)
    cfg = _config("mf", etl, _mf_overrides({"max_epochs": 1}))
    model = loop.build_model(cfg, data)
    optimizers = model.configure_optimizers()
    optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
    model.train()
    loader = iter(loop._loader(model, cfg))
    parts = dict.fromkeys(("loader", "sampling", "forward", "backward", "optimizer"), 0.0)
    # one thread: CPU time, which other processes on a shared machine disturb least
    clock = time.process_time if torch.get_num_threads() == 1 else time.perf_counter
    sgd = _sole_sgd_rate(optimizers)
    kind = "autograd"
    for i in range(steps + 1):
        t0 = clock()
        idx = next(loader)
        t1 = clock()
        model.sample_negatives(model.pos_users[idx])
        t2 = clock()
        # samples again: forward = this - sampling; a closed-form step's forward holds its
        # scores and gradients, and it has no backward; a fused SGD step's forward is the
        # whole step (its update included), it has no optimiser step
        loss = None if sgd is None else model.sgd_step(idx, sgd)
        if loss is not None:
            kind = "fused sgd"
            t3 = t4 = t5 = clock()
        else:
            for opt in optimizers:
                opt.zero_grad()
            loss = model.closed_form_backward(idx)
            t3 = clock()
            kind = "autograd" if loss is None else "closed form"
            if loss is None:
                loss = model.batch_loss(idx)
                t3 = clock()
                loss.backward()
            t4 = clock()
            for opt in optimizers:
                opt.step()
            t5 = clock()
        if i:  # the first step warms up
            parts["loader"] += t1 - t0
            parts["sampling"] += t2 - t1
            parts["forward"] += (t3 - t2) - (t2 - t1)
            parts["backward"] += t4 - t3
            parts["optimizer"] += t5 - t4
    ms = {k: 1000 * v / steps for k, v in parts.items()}
    real = child("mf", etl, budget=30.0)
    per_step = real["cpu_per_step_s" if clock is time.process_time else "wall_per_step_s"]
    step_ms = 1000 * per_step
    ms["lightning and the rest"] = step_ms - sum(ms.values())
    ms["clock"] = "CPU" if clock is time.process_time else "wall"
    ms["step"] = kind
    return {"pairs": real["pairs"], "batch_size": cfg.trainer.batch_size, "step_ms": step_ms} | ms


def prepare(pairs: int, work: Path, split: bool = False) -> Path:
    from recfb.simulate import SimConfig

    events = int(pairs * 1.35)  # the simulator yields ~0.8 train pairs per event
    cfg = SimConfig(
        seed=2, n_events=events, n_users=max(2000, events // 40), n_items=max(2000, events // 400)
    )
    name = f"pairs-{pairs}"
    if split:  # the same simulation, split by time into train / valid / test
        base = work / name / "split"
        if not (base / "sim").exists():
            base.mkdir(parents=True, exist_ok=True)
            (base / "sim").symlink_to(prepare(pairs, work).parent / "sim")
        etl = base / "etl"
        if (etl / "stats.json").exists():
            return etl
        return simulated_etl(cfg, base)
    etl = work / name / "etl"
    if (etl / "stats.json").exists():
        return etl
    return simulated_etl(cfg, work / name, split={"method": "none"})


FAMILIES = ("mf", "lightgcn", "gnolr", "als", "bpr_implicit")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--work", type=Path, default=Path("/tmp/recfb-train-bench"))
    parser.add_argument("--budget", type=float, default=60.0, help="seconds of steps per model")
    parser.add_argument("--quality-max", type=int, default=1_000_000)
    parser.add_argument("--quality-epochs", type=int, default=10, help="MF epochs at most")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES))
    parser.add_argument("--profile", type=int, nargs="+", help="sizes to profile MF steps at")
    parser.add_argument("--out", default="train", help="results file name (no suffix)")
    parser.add_argument("--mf-batch", type=int, help="MF batch size (default: the config's)")
    parser.add_argument(
        "--mf-lr", type=float, help="MF learning rate (sgd: per example; default: the config's)"
    )
    parser.add_argument(
        "--mf-optim", choices=["adam", "adagrad", "sgd"], help="MF optimizer (default: adam)"
    )
    parser.add_argument(
        "--mf-negatives", type=int, help="MF negatives per positive (default: the config's)"
    )
    parser.add_argument(
        "--threads", type=int, help="threads per model, torch and implicit (default: all)"
    )
    parser.add_argument(
        "--autograd", action="store_true", help="MF steps through autograd (no closed form)"
    )
    parser.add_argument("--child")
    parser.add_argument("--quality")
    parser.add_argument("--profile-child", action="store_true")
    parser.add_argument("--etl")
    parser.add_argument("--prepare", type=int, help="(internal) simulate + ETL one size")
    parser.add_argument("--split", action="store_true")
    args = parser.parse_args()
    if args.mf_batch:
        os.environ["RECFB_BENCH_MF_BATCH"] = str(args.mf_batch)
    if args.mf_lr:
        os.environ["RECFB_BENCH_MF_LR"] = str(args.mf_lr)
    if args.mf_optim:
        os.environ["RECFB_BENCH_MF_OPTIM"] = args.mf_optim
    if args.mf_negatives:
        os.environ["RECFB_BENCH_MF_NEGATIVES"] = str(args.mf_negatives)
    if args.autograd:
        os.environ["RECFB_BENCH_AUTOGRAD"] = "1"
    if args.threads is not None:  # children inherit it (their own parse leaves it alone)
        os.environ["RECFB_BENCH_THREADS"] = str(args.threads)
    if args.child:
        print(json.dumps(child(args.child, args.etl, args.budget)))
        return
    if args.quality:
        print(json.dumps(quality_child(args.quality, args.etl, args.quality_epochs)))
        return
    if args.profile_child:
        print(json.dumps(profile_child(args.etl, steps=20)))
        return
    if args.prepare:
        print(json.dumps({"etl": str(prepare(args.prepare, args.work, args.split))}))
        return
    if args.profile:
        rows = []
        for size in args.profile:
            etl = run_child(__file__, ["--prepare", str(size), "--work", str(args.work)])["etl"]
            r = run_child(__file__, ["--profile-child", "--etl", str(etl)]) | {"size": size}
            rows.append(r)
            print(json.dumps(r), file=sys.stderr, flush=True)
        (ROOT / f"benchmarks/results/{args.out}.json").write_text(
            json.dumps({"machine": _machine(), "rows": rows}, indent=2) + "\n"
        )
        parts = ["loader", "sampling", "forward", "backward", "optimizer"]
        parts.append("lightning and the rest")
        print(
            "| train pairs | batch | step | clock | ms / step | "
            + " | ".join(parts)
            + " | CPU steal |"
        )
        print("|---:|---:|---|---|---:|" + "---:|" * len(parts) + "---:|")
        for r in rows:
            shares = " | ".join(f"{r[k]:.1f} ({r[k] / r['step_ms']:.0%})" for k in parts)
            print(
                f"| {r['pairs']:,} | {r['batch_size']} | {r['step']} | {r['clock']} | "
                f"{r['step_ms']:.1f} | "
                f"{shares} | "
                f"{r['cpu_steal_share']:.0%} |"
            )
        return
    rows = []
    for size in args.sizes:
        # data is prepared in a child too: a child's peak RSS starts from its parent's at
        # fork, so the parent must stay small for the children's figures to mean anything
        etl = run_child(__file__, ["--prepare", str(size), "--work", str(args.work)])["etl"]
        split_etl = None
        if size <= args.quality_max:
            split_etl = run_child(
                __file__, ["--prepare", str(size), "--work", str(args.work), "--split"]
            )["etl"]
        for family in args.families:
            r = run_child(
                __file__, ["--child", family, "--etl", str(etl), "--budget", str(args.budget)]
            )
            r |= {"size": size, "model": family}
            if split_etl and family in ("mf", "bpr_implicit"):
                q = run_child(
                    __file__,
                    [
                        "--quality",
                        family,
                        "--etl",
                        str(split_etl),
                        "--quality-epochs",
                        str(args.quality_epochs),
                    ],
                )
                r |= {f"quality_{k}": v for k, v in q.items()}
            rows.append(r)
            print(json.dumps(r), file=sys.stderr, flush=True)
    (ROOT / f"benchmarks/results/{args.out}.json").write_text(
        json.dumps({"machine": _machine(), "rows": rows}, indent=2) + "\n"
    )
    print(
        "| train pairs | model | s / epoch | peak RSS GiB | vs implicit ALS epoch "
        "| vs implicit BPR epoch | test NDCG@10 (split) | measured | CPU steal |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---|---:|")
    for r in rows:
        als = next((x for x in rows if x["size"] == r["size"] and x["model"] == "als"), None)
        bpr = next(
            (x for x in rows if x["size"] == r["size"] and x["model"] == "bpr_implicit"), None
        )
        ndcg = r.get("quality_ndcg@10")
        print(
            f"| {r['pairs']:,} | {r['model']} | {r['epoch_s']:.1f} | {r['peak_rss_gib']:.2f} | "
            f"{_ratio(r, als)} | {_ratio(r, bpr)} | "
            f"{'' if ndcg is None else f'{ndcg:.4f}'} | {r['measured']} | "
            f"{r['cpu_steal_share']:.0%} |"
        )


def _ratio(row: dict, peer: dict | None) -> str:
    return f"{row['epoch_s'] / peer['epoch_s']:.1f}x" if peer else ""


def _machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores"


if __name__ == "__main__":
    main()

"""Denoising and debiasing against the simulator's ground truth.

    python benchmarks/denoise.py --noise 0.2 0.4

For each share of preference-free positives, simulates a shop, runs the ETL, then trains the
same MF-BPR model plain, with PLD, with T-CE and with IPS (positives: clicks and deeper). Each
model is judged by NDCG@20 against the *true* affinity (graded gains = the simulator's true
affinity of the user's top-20, ideal = the 20 truly best unmasked items) on a sample of
users, and by the popularity bias of its lists (mean popularity percentile of the top-20).
Prints a Markdown table (means over seeds); writes benchmarks/results/denoise_<items>.json
and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import polars as pl
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import simulated_etl  # noqa: E402

# Denoisers are compared with plain BPR; IPS (Rel-MF, an unbiased pointwise estimator) with
# plain BCE, the loss it corrects.
VARIANTS = {
    "plain-bpr": {},
    "pld": {"denoise": {"method": "pld", "warmup_epochs": 5, "pool": 5, "tau": 0.1}},
    "tce": {"denoise": {"method": "tce", "warmup_epochs": 5, "max_drop": 0.2, "ramp_epochs": 3}},
    "ips-bpr": {"debias": {"ips": True, "eta": 0.5, "clip": 0.5}},
    "plain-bce": {"model": {"loss": "bce"}},
    "ips-bce": {"model": {"loss": "bce"}, "debias": {"ips": True, "eta": 0.5, "clip": 0.5}},
    "ips-bce-nonneg": {
        "model": {"loss": "bce"},
        "debias": {"ips": True, "eta": 0.5, "clip": 0.5, "nonnegative": True},
    },
}


def true_ndcg(model, etl: Path, truth: Path, n_users: int, k: int, seed: int = 0) -> dict:
    from recfb.evaluate import EvalConfig, popularity_percentile, topk_items
    from recfb.simulate import true_affinity
    from recfb.train.data import Interactions

    data = Interactions.load(etl)
    users = pl.read_parquet(etl / "users.parquet")
    items = pl.read_parquet(etl / "items.parquet")
    rng = np.random.default_rng(seed)
    active = data.train["user_idx"].unique().to_numpy()
    sample = np.sort(rng.choice(active, size=min(n_users, len(active)), replace=False))
    cfg = EvalConfig(exclude="any")
    top, _ = topk_items(model.score, data.n_items, torch.as_tensor(sample), data.train, cfg, k)
    user_ids = users["user_id"].to_numpy()[sample].astype(np.int64)
    item_ids = items["item_id"].to_numpy().astype(np.int64)
    # the ideal list: the truly best items that the exclusion rule leaves recommendable
    oracle_scores = lambda u: torch.as_tensor(  # noqa: E731
        true_affinity(
            truth, np.repeat(user_ids_of(u, users), len(item_ids)), np.tile(item_ids, len(u))
        ).reshape(len(u), -1)
    )
    ideal, ideal_aff = topk_items(
        oracle_scores, data.n_items, torch.as_tensor(sample), data.train, cfg, k
    )
    got_aff = true_affinity(
        truth, np.repeat(user_ids, k), item_ids[top.numpy().reshape(-1)]
    ).reshape(len(sample), k)
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    ndcg = (got_aff * discount).sum(1) / (ideal_aff.numpy() * discount).sum(1)
    pop = popularity_percentile(data.item_popularity())
    return {
        "true_ndcg": float(ndcg.mean()),
        "popularity": float(pop[top.numpy()].mean()),
        # what the true preferences warrant: the popularity of the ideal lists
        "ideal_popularity": float(pop[ideal.numpy()].mean()),
    }


def user_ids_of(idx: torch.Tensor, users: pl.DataFrame) -> np.ndarray:
    return users["user_id"].to_numpy()[idx.numpy()].astype(np.int64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--noise", type=float, nargs="+", default=[0.2, 0.4])
    parser.add_argument("--work", type=Path, default=Path("/tmp/recfb-denoise"))
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--eval-users", type=int, default=2000)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first..first+seeds-1")
    parser.add_argument("--noise-items", choices=["popularity", "uniform"], default="uniform")
    parser.add_argument(
        "--only", nargs="+", help="run only these of the built-in variants (rows are merged)"
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help='an extra variant, e.g. tce-bce=\'{"denoise":{"method":"tce"}}\'',
    )
    args = parser.parse_args()
    variants = {k: v for k, v in VARIANTS.items() if not args.only or k in args.only}
    for item in args.variant:  # extra variants always run
        name, _, spec = item.partition("=")
        variants[name] = json.loads(spec)

    from recfb.config import build_model
    from recfb.recommender import train
    from recfb.simulate import SimConfig
    from recfb.train.config import TrainConfig

    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{args.work / 'mlruns.db'}")
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for noise in args.noise:
        base = args.work / f"noise-{noise}-{args.noise_items}"
        sim_cfg = SimConfig(
            seed=11,
            n_users=10_000,
            n_items=2_000,
            n_events=args.events,
            noise_positive_share=noise,
            noise_positive_items=args.noise_items,
        )
        etl = simulated_etl(sim_cfg, base)
        for name, spec in variants.items():
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                data = {
                    "data": str(etl),
                    "experiment": "denoise",
                    "run_name": f"{name}-{noise}",
                    "train_min_label": 2,
                    "seed": seed,
                    "model": {"family": "mf", "dim": 32, "loss": "bpr"},
                    "trainer": {"max_epochs": args.epochs, "batch_size": 2048, "patience": 4},
                    "eval": {"ks": [20], "relevant_min_level": 2},
                }
                for key, value in spec.items():
                    data[key] = data.get(key, {}) | value if isinstance(value, dict) else value
                result = train(build_model(TrainConfig, data, name), quiet=True)
                row = {
                    "noise": noise,
                    "noise_items": args.noise_items,
                    "variant": name,
                    "seed": seed,
                    "test_ndcg@20": result.metrics.get("test/ndcg@20"),
                    **true_ndcg(result.model, etl, base / "sim" / "truth", args.eval_users, 20),
                }
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    out = ROOT / f"benchmarks/results/denoise_{args.noise_items}.json"
    if args.only or args.variant:  # a partial run replaces its own rows, keeps the rest
        done = {(r["noise"], r["variant"], r["seed"]) for r in rows}
        old = json.loads(out.read_text()) if out.exists() else []
        rows = [r for r in old if (r["noise"], r["variant"], r["seed"]) not in done] + rows
    out.write_text(json.dumps(rows, indent=2) + "\n")
    table = summary_table(rows)
    (out.with_suffix(".md")).write_text(table)
    print(table, end="")


def summary_table(rows: list[dict]) -> str:
    """Markdown: per noise level and variant, the mean over seeds (and the seeds' spread)."""
    frame = (
        pl.DataFrame(rows)
        .group_by("noise", "variant")
        .agg(
            pl.col("true_ndcg").mean().alias("ndcg"),
            pl.col("true_ndcg").std().fill_null(0).alias("sd"),
            pl.col("popularity").mean(),
            pl.col("ideal_popularity").mean(),
            pl.col("test_ndcg@20").mean().alias("test"),
            pl.len().alias("seeds"),
        )
        .sort("noise", "variant")
    )
    lines = [
        "| noisy positives | variant | true-affinity NDCG@20 (sd) | popularity@20 "
        "| ideal lists' popularity | test NDCG@20 | seeds |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in frame.iter_rows(named=True):
        lines.append(
            f"| {r['noise']:.0%} | {r['variant']} | {r['ndcg']:.4f} ({r['sd']:.4f}) | "
            f"{r['popularity']:.3f} | {r['ideal_popularity']:.3f} | {r['test']:.4f} | "
            f"{r['seeds']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

"""Which pruning makes topm's KuaiRand gain: user rows or item rows of the operator? Trains
LightGCN topm with an operator whose user rows come from one width and item rows from
another (m=8 vs 256, where 256 is exact here), and reports how much each model's top-10 overlaps
the non-personalised 1/train-degree list.

    python benchmarks/topm_kuairand_ablate.py --etl /tmp/topmcheck/etl --seed 0
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
import torch  # noqa: E402

from benchmarks.topm_kuairand_check import ndcg_at  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--etl", type=Path, default=Path("/tmp/topmcheck/etl"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    import recfb.models.lightgcn as lg
    from recfb.config import build_model
    from recfb.train.config import TrainConfig
    from recfb.train.data import Interactions
    from recfb.train.loop import fit_model

    data = Interactions.load(args.etl)
    n_u, n_i = data.n_users, data.n_items
    tr, te = data.train, data.test.filter(pl.col("label") >= 1)
    users = np.unique(te["user_idx"].to_numpy())
    deg = np.bincount(tr.filter(pl.col("label") >= 1)["item_idx"].to_numpy(), minlength=n_i)
    inv = np.where(deg > 0, 1 / np.maximum(deg, 1), -1e9) + 1e-9 * deg
    _, inv_top = ndcg_at(np.broadcast_to(inv, (n_u, n_i)), users, tr, te)
    original = lg.propagation_operator

    def mixed(user_m: int, item_m: int):
        def build(adjacency, layers, m):
            a = original(adjacency, layers, user_m).to_dense()
            b = original(adjacency, layers, item_m).to_dense()
            return torch.cat([a[:n_u], b[n_u:]]).to_sparse_csr()

        return build

    print(
        "| user rows m | item rows m | valid ndcg@20 | test ndcg@10 "
        "| top-10 overlap with 1/degree list |"
    )
    print("|---|---|---|---|---|")
    for user_m, item_m in [(8, 8), (8, 256), (256, 8), (256, 256)]:
        lg.propagation_operator = mixed(user_m, item_m)
        cfg = build_model(
            TrainConfig,
            {
                "data": str(args.etl),
                "experiment": "topmcheck",
                "run_name": f"ablate-{user_m}-{item_m}",
                "model": {"family": "lightgcn", "dim": 64, "propagation": "topm", "topm": 256},
                "trainer": {"max_epochs": 30, "batch_size": 1024, "patience": 4, "lr": 0.005},
                "eval": {"ks": [10, 20, 50], "exclude": "any"},
                "seed": args.seed,
            },
            "bench",
        )
        fitted = fit_model(cfg, data, quiet=True)
        uv, iv = fitted.model.vectors()
        v, top = ndcg_at((uv @ iv.T).numpy(), users, tr, te)
        overlap = np.mean(
            [
                len(set(a) & set(b)) / 10
                for a, b in zip(top.reshape(-1, 10), inv_top.reshape(-1, 10), strict=True)
            ]
        )
        m = fitted.metrics
        print(
            f"| {user_m} | {item_m} | {m['valid/ndcg@20']:.4f} | {v:.4f} | {overlap:.2f} |",
            flush=True,
        )
    lg.propagation_operator = original


if __name__ == "__main__":
    main()

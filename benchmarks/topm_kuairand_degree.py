"""Non-personalised lists by train degree on KuaiRand (the ETL that
benchmarks/topm_kuairand_check.py writes): does ranking items by few train likes alone give
what LightGCN topm (m=8) gets? Also test likes per item by train-degree bucket.

    python benchmarks/topm_kuairand_degree.py --etl /tmp/topmcheck/etl
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

from benchmarks.topm_kuairand_check import ndcg_at  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--etl", type=Path, default=Path("/tmp/topmcheck/etl"))
    args = p.parse_args()
    from recfb.train.data import Interactions

    d = Interactions.load(args.etl)
    tr = d.train
    te = d.test.filter(pl.col("label") >= 1)
    va = d.valid.filter(pl.col("label") >= 1)
    n_u, n_i = d.n_users, d.n_items
    pos = tr.filter(pl.col("label") >= 1)["item_idx"].to_numpy()
    deg = np.bincount(pos, minlength=n_i).astype(float)
    users, vusers = np.unique(te["user_idx"].to_numpy()), np.unique(va["user_idx"].to_numpy())
    lists = {
        "train degree (popularity)": deg,
        "1/degree, items with >= 1 train like": np.where(deg > 0, 1 / np.maximum(deg, 1), -1e9)
        + 1e-9 * deg,
        "min(d, 8)/sqrt(d) (topm's kept item mass)": np.minimum(deg, 8)
        / np.sqrt(np.maximum(deg, 1))
        + 1e-6 * deg,
    }
    print("| list | valid ndcg@10 | test ndcg@10 |\n|---|---|---|")
    for name, s in lists.items():
        scores = np.broadcast_to(s, (n_u, n_i))
        v, _ = ndcg_at(scores, vusers, tr, va)
        t, _ = ndcg_at(scores, users, tr, te)
        print(f"| {name} | {v:.4f} | {t:.4f} |")
    tp = np.bincount(te["item_idx"].to_numpy(), minlength=n_i)
    print("\n| train likes | items | test likes per item |\n|---|---|---|")
    for lo, hi in [(0, 0), (1, 4), (5, 7), (8, 10), (11, 15), (16, 30), (31, 60), (61, 10**6)]:
        m = (deg >= lo) & (deg <= hi)
        print(f"| {lo}-{hi} | {int(m.sum())} | {tp[m].mean():.2f} |")


if __name__ == "__main__":
    main()

"""Is LightGCN topm's KuaiRand figure real? Trains topm (m=8) and full LightGCN with
benchmarks/lightgcn_modes.py quality's settings, then checks the operator's inputs and
re-scores every model with an independent NDCG@10 (numpy, train pairs masked, relevant =
test pairs with label >= 1) next to popularity baselines (whole train window, last day of
train, and the test window itself as an oracle).

    python benchmarks/topm_kuairand_check.py --work /tmp/topmcheck --seed 0
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
import scipy.sparse as sp  # noqa: E402
import torch  # noqa: E402


def ndcg_at(
    scores: np.ndarray, users: np.ndarray, train: pl.DataFrame, test: pl.DataFrame, k: int = 10
) -> tuple[float, np.ndarray]:
    """Mean NDCG@k over test users with >= 1 relevant unmasked item; scores (n_users, n_items)."""
    seen = {}
    for u, i in zip(train["user_idx"].to_numpy(), train["item_idx"].to_numpy(), strict=True):
        seen.setdefault(int(u), set()).add(int(i))
    rel = {}
    for u, i in zip(test["user_idx"].to_numpy(), test["item_idx"].to_numpy(), strict=True):
        rel.setdefault(int(u), set()).add(int(i))
    out, tops = [], []
    for u in users:
        r = rel.get(int(u), set()) - seen.get(int(u), set())
        if not r:
            continue
        s = scores[u].astype(np.float64).copy()
        s[list(seen.get(int(u), ()))] = -np.inf
        top = np.argsort(-s, kind="stable")[:k]
        tops.append(top)
        dcg = sum(1 / np.log2(j + 2) for j, it in enumerate(top) if int(it) in r)
        idcg = sum(1 / np.log2(j + 2) for j in range(min(k, len(r))))
        out.append(dcg / idcg)
    ndcg_at.last = np.array(out)  # type: ignore[attr-defined]
    return float(np.mean(out)), np.concatenate(tops)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--work", type=Path, default=Path("/tmp/topmcheck"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--modes", nargs="+", default=["8", "full"])
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    from recfb.config import build_model, load_config
    from recfb.etl import EtlConfig, run_etl
    from recfb.models.lightgcn import normalized_adjacency, propagation_operator
    from recfb.train.config import TrainConfig
    from recfb.train.data import Interactions
    from recfb.train.loop import fit_model

    os.chdir(ROOT)
    etl = args.work / "etl"
    if not (etl / "train.parquet").exists() and not etl.exists():
        args.work.mkdir(parents=True, exist_ok=True)
        run_etl(load_config(EtlConfig, "conf/datasets/kuairand.yaml", [f"out={etl}"]), quiet=True)
    data = Interactions.load(etl)
    train, valid, test = data.train, data.valid, data.test
    report: dict = {
        "n_users": data.n_users,
        "n_items": data.n_items,
        "train": train.height,
        "valid": valid.height,
        "test": test.height,
    }
    print(json.dumps(report))
    print("train labels", train["label"].value_counts().sort("label").rows())
    print("test labels", test["label"].value_counts().sort("label").rows())
    test_pos = test.filter(pl.col("label") >= 1)
    users = np.unique(test_pos["user_idx"].to_numpy())
    n_u, n_i = data.n_users, data.n_items

    # baselines: popularity over train, over train's last day, over the test window (oracle)
    def pop_scores(frame: pl.DataFrame) -> np.ndarray:
        c = np.bincount(frame.filter(pl.col("label") >= 1)["item_idx"].to_numpy(), minlength=n_i)
        return np.broadcast_to(c.astype(np.float64) + 1e-9 * np.arange(n_i)[::-1], (n_u, n_i))

    last = train.filter(pl.col("last_ts") >= pl.col("last_ts").max() - pl.duration(days=1))
    base = {
        "pop_train": pop_scores(train),
        "pop_train_last_day": pop_scores(last),
        "pop_valid_window": pop_scores(valid),
        "pop_test_window_ORACLE": pop_scores(test),
    }
    tops = {}
    for name, s in base.items():
        v, t = ndcg_at(s, users, train, test_pos)
        tops[name] = t
        report[f"ndcg@10 {name}"] = v
        print(name, round(v, 4), flush=True)

    # the adjacency the models get, rebuilt independently from train positives only
    pos = train.filter(pl.col("label") >= 1)
    a = sp.coo_matrix(
        (np.ones(pos.height), (pos["user_idx"].to_numpy(), pos["item_idx"].to_numpy())),
        shape=(n_u, n_i),
    ).tocsr()
    a.data[:] = 1.0
    held = pl.concat([valid, test]).select("user_idx", "item_idx").unique()
    trainpairs = train.select("user_idx", "item_idx").unique()
    only_held = held.join(trainpairs, on=["user_idx", "item_idx"], how="anti")
    in_adj = np.asarray(
        a[only_held["user_idx"].to_numpy(), only_held["item_idx"].to_numpy()]
    ).ravel()
    report["heldout_only_pairs_in_train_adjacency"] = int((in_adj > 0).sum())
    print(
        "held-out-only pairs in train adjacency:", int((in_adj > 0).sum()), "of", only_held.height
    )

    per_user: dict = {}
    first = train.group_by("item_idx").agg(pl.col("first_ts").min())
    first_day = np.full(n_i, np.nan)
    t0 = train["first_ts"].max()
    first_day[first["item_idx"].to_numpy()] = (
        (t0 - first["first_ts"]).dt.total_seconds() / 86400
    ).to_numpy()
    for name, t in list(tops.items()):
        report[f"{name} mean days since item's first train pair (top-10)"] = float(
            np.nanmean(first_day[t])
        )
    for mode in args.modes:
        model_cfg = {"family": "lightgcn", "dim": 64}
        model_cfg |= (
            {"propagation": "full"}
            if mode == "full"
            else {"propagation": "topm", "topm": int(mode)}
        )
        cfg = build_model(
            TrainConfig,
            {
                "data": str(etl),
                "experiment": "topmcheck",
                "run_name": f"lightgcn-{mode}",
                "model": model_cfg,
                "trainer": {
                    "max_epochs": args.epochs,
                    "batch_size": 1024,
                    "patience": 4,
                    "lr": 0.005,
                },
                "eval": {"ks": [10, 20, 50], "exclude": "any"},
                "seed": args.seed,
            },
            "bench",
        )
        fitted = fit_model(cfg, data, quiet=True)
        m = fitted.model
        print(
            mode,
            {
                k: round(v, 4)
                for k, v in fitted.metrics.items()
                if k in ("valid/ndcg@20", "test/ndcg@10", "test/recall@20")
            },
            flush=True,
        )
        report[f"{mode} recfb test/ndcg@10"] = fitted.metrics["test/ndcg@10"]
        report[f"{mode} recfb valid/ndcg@20"] = fitted.metrics["valid/ndcg@20"]
        # the model's adjacency against the independent one
        adj = m.adjacency.to_dense()
        mine = normalized_adjacency(
            torch.as_tensor(pos["user_idx"].to_numpy().astype(np.int64)),
            torch.as_tensor(pos["item_idx"].to_numpy().astype(np.int64)),
            torch.ones(pos.height),
            n_u,
            n_i,
        ).to_dense()
        bip = (adj[:n_u, n_u:] > 0).numpy()
        report[f"{mode} adjacency == train-only adjacency"] = bool(torch.allclose(adj, mine))
        report[f"{mode} adjacency edges == train positives"] = bool(
            (bip == (a.toarray() > 0)).all()
        )
        with torch.no_grad():
            uv, iv = m.vectors()
            s_model = (uv @ iv.T).numpy()
            v_model, t_model = ndcg_at(s_model, users, train, test_pos)
            per_user[mode] = ndcg_at.last  # type: ignore[attr-defined]
            report[f"{mode} independent test ndcg@10"] = v_model
            if mode != "full":
                # rebuild scores from the layer-0 table and an operator built on my adjacency
                op = propagation_operator(
                    normalized_adjacency(
                        torch.as_tensor(pos["user_idx"].to_numpy().astype(np.int64)),
                        torch.as_tensor(pos["item_idx"].to_numpy().astype(np.int64)),
                        torch.ones(pos.height),
                        n_u,
                        n_i,
                    ),
                    m.cfg.model.layers,
                    int(mode),
                )
                final = op.to_dense() @ m.embedding.weight.detach()
                s2 = (final[:n_u] @ final[n_u:].T).numpy()
                report[f"{mode} max |score - rebuilt|"] = float(np.abs(s2 - s_model).max())
                # the same trained table propagated over the full graph (exact LightGCN)
                x = m.embedding.weight.detach()
                layers = [x]
                A = mine
                for _ in range(m.cfg.model.layers):
                    x = A @ x
                    layers.append(x)
                f3 = torch.stack(layers).mean(0)
                v3, _ = ndcg_at((f3[:n_u] @ f3[n_u:].T).numpy(), users, train, test_pos)
                report[f"{mode} table scored with full propagation ndcg@10"] = v3
                # operator stats: self weight share, item rows
        tops[mode] = t_model
        pop = np.bincount(pos["item_idx"].to_numpy(), minlength=n_i)
        pop_test = np.bincount(test_pos["item_idx"].to_numpy(), minlength=n_i)
        distinct = np.unique(t_model)
        report[f"{mode} distinct items in top-10"] = int(len(distinct))
        report[f"{mode} mean train pop of top-10 items"] = float(pop[t_model].mean())
        report[f"{mode} mean test pop of top-10 items"] = float(pop_test[t_model].mean())
        report[f"{mode} mean days since item's first train pair (top-10)"] = float(
            np.nanmean(first_day[t_model])
        )
        counts = np.bincount(t_model, minlength=n_i)
        top5 = np.argsort(-counts)[:8]
        report[f"{mode} most recommended (item, share of lists, train pop, test pop)"] = [
            (int(i), round(counts[i] / len(users), 3), int(pop[i]), int(pop_test[i])) for i in top5
        ]
        print(
            json.dumps({k: v for k, v in report.items() if k.startswith(mode)}, default=str),
            flush=True,
        )
    for name in list(tops):
        report[f"distinct top-10 items {name}"] = int(len(np.unique(tops[name])))
    report["test users with a relevant item"] = (
        int(len(next(iter(per_user.values())))) if per_user else None
    )
    if "full" in per_user:
        rng = np.random.default_rng(0)
        for mode, arr in per_user.items():
            if mode == "full":
                continue
            d = arr - per_user["full"]
            boots = [d[rng.integers(0, len(d), len(d))].mean() for _ in range(2000)]
            report[f"{mode} - full per-user ndcg@10 diff, 95% bootstrap"] = [
                float(d.mean()),
                float(np.percentile(boots, 2.5)),
                float(np.percentile(boots, 97.5)),
            ]
            report[f"{mode} users with a hit in top-10"] = int((arr > 0).sum())
        report["full users with a hit in top-10"] = int((per_user["full"] > 0).sum())
    out = args.work / f"report_seed{args.seed}.json"
    out.write_text(json.dumps(report, indent=1, default=str))
    print(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()

"""The two-stage recommender against its own sources, ALS and MF-BPR, per dataset.

    python benchmarks/two_stage.py                          # all four datasets, one by one
    python benchmarks/two_stage.py --datasets taobao_lastbuy movielens

Per dataset: runs its ETL config (conf/datasets/<name>.yaml) into a work directory, trains
MF-BPR (conf/models/mf.yaml with eval.refit true) and runs `fit_two_stage` with MF as the
extra scorer "mf" and the feature/source ablation. The `embedding` method is implicit's ALS
fitted inside the rank stage ("als" in the tables). Writes benchmarks/results/two_stage_<name>
.json per dataset and benchmarks/results/two_stage.md from every two_stage_*.json there.

`fit_two_stage` evaluates only the test-snapshot scorer of `extra` (the train-snapshot one is
not a ranker source or feature), so by default the refit MF model fills both slots; with
--mf-two-runs a second MF run without refit supplies the train-snapshot scorer.
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
RESULTS = ROOT / "benchmarks" / "results"
# dataset -> (ETL config, RankConfig overrides)
DATASETS = {
    "taobao": ("conf/datasets/taobao.yaml", []),  # temporal: Dec 2 validates, Dec 3 tests
    # last buy tests, the one before validates. No time cut: the rank stage then uses naive
    # item rates from the snapshot (delay-corrected ones would count the held-out buys)
    "taobao_lastbuy": ("conf/datasets/taobao_lastbuy.yaml", []),
    "movielens": ("conf/datasets/movielens.yaml", []),
    "kuairand": ("conf/datasets/kuairand.yaml", []),
}
# table row -> fit_two_stage method
METHODS = {
    "two_stage": "two_stage",
    "history": "history",
    "cascade": "cascade",
    "als": "embedding",
    "popularity": "popularity",
    "history_then_als": "history_then_embedding",
    "mf": "mf",
    "history_then_mf": "history_then_mf",
}


def train_mf(etl: Path, name: str, refit: bool) -> tuple[object, dict]:
    from recfb.config import load_config
    from recfb.recommender import train
    from recfb.train.config import TrainConfig

    overrides = [f"data={etl}", f"eval.refit={str(refit).lower()}"]
    overrides += [f"experiment=two-stage-{name}", f"run_name=mf-bpr{'-refit' * refit}"]
    result = train(load_config(TrainConfig, ROOT / "conf/models/mf.yaml", overrides), quiet=True)
    m = result.metrics
    info = {
        "epochs": len(result.history),
        "refit_epochs": m.get("refit_epochs"),
        "run_id": result.run_id,
        "test/ndcg@10": m.get("test/ndcg@10"),
    }
    return result.model, info


def run_dataset(name: str, args: argparse.Namespace) -> dict | None:
    from recfb.config import load_config
    from recfb.etl import EtlConfig, run_etl
    from recfb.rank.config import RankConfig
    from recfb.rank.twostage import fit_two_stage

    etl = args.work / name / "etl"
    conf, rank_overrides = DATASETS[name]
    rank_overrides = list({o.split("=")[0]: o for o in rank_overrides + args.set}.values())
    etl_cfg = load_config(EtlConfig, ROOT / conf, [f"out={etl}"])
    missing = [p for p in etl_cfg.input.paths if not (ROOT / p).exists()]
    if missing:
        print(f"[{name}] skipped: input {', '.join(map(str, missing))} not found", file=sys.stderr)
        return None
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    stats = run_etl(etl_cfg, quiet=True).stats
    seconds["etl"] = time.perf_counter() - start
    levels = {int(k): v for k, v in stats["levels"].items() if int(k) > 0}
    deepest = levels[max(levels)]
    notes = []

    start = time.perf_counter()
    mf_test, mf_info = train_mf(etl, name, refit=True)
    mf_train, mf_note = mf_test, "refit model (train+valid) for both snapshots"
    if args.mf_two_runs:
        mf_train, mf_info["train_run"] = train_mf(etl, name, refit=False)
        mf_note = "no-refit run for the train snapshot, refit run for the test snapshot"
    seconds["mf"] = time.perf_counter() - start
    print(f"[{name}] MF-BPR: {mf_info}", file=sys.stderr)

    start = time.perf_counter()
    base = [f"data={etl}", f"experiment=two-stage-{name}"]
    cfg = load_config(RankConfig, None, base + rank_overrides)
    if cfg.delay_corrected_rates and stats["split"].get("method") != "temporal":
        notes.append("no time cut: naive item rates from the snapshot (no held-out buy counted)")
    r = fit_two_stage(cfg, extra={"mf": (mf_train, mf_test)}, ablation=not args.no_ablation)
    seconds["two_stage"] = time.perf_counter() - start
    test_cands = r.test_stage.candidates if r.test_stage is not None else None
    history_empty = test_cands is not None and test_cands["history_rank"].is_null().all()
    keys = ["hr@10", "ndcg@10", f"hr@10/{deepest}", f"ndcg@10/{deepest}", "n_users"]
    pick = r.metrics
    if history_empty:
        notes.append("history source is empty (the signal map hides every engaged item)")
    best = r.metrics["two_stage"]
    rivals = [(row, pick.get(m)) for row, m in METHODS.items() if row != "two_stage"]
    rivals += [(f"ablation {row}", m) for row, m in r.ablation.items()]
    for row, m in rivals:
        won = [k.upper() for k in ("hr@10", "ndcg@10") if m and m.get(k, 0) > best.get(k, 0)]
        if won:
            notes.append(f"{row} beats two_stage on {' and '.join(won)}")
    return {
        "dataset": name,
        "tag": args.tag,
        "config": conf,
        "rank_overrides": rank_overrides,
        "split": stats["split"],
        "deepest_level": deepest,
        "keys": keys,
        "metrics": {row: pick[m] for row, m in METHODS.items() if m in pick},
        "metrics_all": r.metrics,
        "ablation": r.ablation,
        "candidate_recall": r.candidate_recall,
        "history_empty": history_empty,
        "ranker_best_iteration": getattr(r.ranker, "best_iteration", None),
        "mf": mf_info | {"snapshots": mf_note},
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "notes": notes,
    }


def fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "-" if v is None else str(v)


def table(head: list[str], rows: list[list[object]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return out + ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]


def markdown(result: dict) -> list[str]:
    keys, deep = result["keys"], result["deepest_level"]
    head = ["method", "HR@10", "NDCG@10", f"HR@10 {deep}", f"NDCG@10 {deep}", "users"]
    title = result["dataset"] + (f" [{result['tag']}]" if result.get("tag") else "")
    sets = " ".join(result.get("rank_overrides", []))
    split = result["split"].get("method")
    lines = [
        f"## {title}",
        "",
        f"{result['config']}, split {split}; rank: {sets or 'defaults'}",
        "",
    ]
    metrics = result["metrics"].items()
    if result["history_empty"]:  # no own items: history = its popularity fill, h_then_x = x
        metrics = [(f"{n} (history empty)" if "history" in n else n, m) for n, m in metrics]
    rows = [[n] + [m.get(k) for k in keys[:4]] + [int(m["n_users"])] for n, m in metrics]
    lines += table(head, rows) + [""]
    if result["ablation"]:
        base = result["metrics"]["two_stage"]
        head = ["ablation", "HR@10", "Δ HR@10", "NDCG@10", "Δ NDCG@10", f"Δ NDCG@10 {deep}"]
        rows = []
        for name, m in result["ablation"].items():
            d = {k: m.get(k, 0.0) - base.get(k, 0.0) for k in keys[:4]}
            rows.append(
                [
                    name,
                    m.get(keys[0]),
                    f"{d[keys[0]]:+.4f}",
                    m.get(keys[1]),
                    f"{d[keys[1]]:+.4f}",
                    f"{d[keys[3]]:+.4f}",
                ]
            )
        lines += table(head, rows) + [""]
    recall = ", ".join(f"{k} {v:.3f}" for k, v in result["candidate_recall"].items())
    secs = ", ".join(f"{k} {v:.0f}" for k, v in result["seconds"].items())
    lines += [
        f"Candidate recall (test positives proposed): {recall or 'none'}.",
        "",
        f"MF-BPR: {result['mf']['snapshots']}; epochs {result['mf']['epochs']}, "
        f"refit epochs {int(result['mf']['refit_epochs'] or 0)}. "
        f"Ranker best iteration {fmt(result['ranker_best_iteration'])}.",
        "",
        f"Seconds: {secs}.",
        "",
    ]
    lines += [f"- note: {n}" for n in result["notes"]] + ([""] if result["notes"] else [])
    return lines


def write_markdown() -> Path:
    order = list(DATASETS)
    results = [json.loads(p.read_text()) for p in RESULTS.glob("two_stage_*.json")]
    results = [r for r in results if isinstance(r, dict) and "dataset" in r]  # not latency files
    results.sort(
        key=lambda r: (order.index(r["dataset"]) if r["dataset"] in order else 99, r.get("tag", ""))
    )
    lines = [
        "# Two-stage ranker vs its sources, ALS and MF-BPR",
        "",
        "Generated by `benchmarks/two_stage.py`. Full-ranking metrics on the test split; "
        "`als` is the rank stage's implicit ALS (the `embedding` source); deltas are "
        "ablation minus two_stage.",
        "",
    ]
    for r in results:
        lines += markdown(r)
    out = RESULTS / "two_stage.md"
    out.write_text("\n".join(lines))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="*", choices=sorted(DATASETS), default=list(DATASETS))
    parser.add_argument("--work", type=Path, default=Path("/tmp/recfb-two-stage"))
    parser.add_argument(
        "--mf-two-runs",
        action="store_true",
        help="train MF twice: without refit (train snapshot) and with refit",
    )
    parser.add_argument("--no-ablation", action="store_true", help="skip the ablation")
    parser.add_argument("--set", nargs="*", default=[], help="KEY=VALUE RankConfig overrides")
    parser.add_argument("--tag", default="", help="suffix of the results file")
    args = parser.parse_args()
    os.chdir(ROOT)
    os.environ.setdefault("MLFLOW_TRACKING_URI", "sqlite:////tmp/bench-mlruns.db")
    RESULTS.mkdir(parents=True, exist_ok=True)
    for name in args.datasets:
        result = run_dataset(name, args)
        if result is None:
            continue
        out = RESULTS / f"two_stage_{name}{'_' * bool(args.tag)}{args.tag}.json"
        out.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print("\n".join(markdown(result)))
    print(f"wrote {write_markdown()}", file=sys.stderr)


if __name__ == "__main__":
    main()

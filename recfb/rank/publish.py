"""The rank stage's outputs: a fitted ranker logged to MLflow, and its files in a bundle.

`fit_rank_stage` fits the two-stage recommender on an ETL output (the embedding source is the
training run's vectors, what the bundle will serve), logs the same-run comparison, the
feature importances (plot) and the model file to MLflow, and writes `ranker.txt` + `rank.json`
into a directory. `write_rank_files` adds to a bundle what the service needs to rank online:
the item statistics, recent history and cascade candidates of the snapshot at the end of the
log (so the served state includes the test window too).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from recfb.rank.config import RankConfig
from recfb.rank.features import item_stats, recent_events
from recfb.rank.state import cut_points, snapshot_at


def fit_rank_stage(cfg: RankConfig, run_id: str | None = None) -> tuple[Path, dict[str, Any]]:
    """Fit, compare and log; returns the directory with `ranker.txt` and `rank.json`."""
    from recfb import tracking
    from recfb.rank.twostage import fit_two_stage
    from recfb.tracking.plots import plt

    embedding = None
    if cfg.embedding == "run":
        from recfb.train.runs import load_run

        if not (cfg.embedding_run or run_id):
            raise ValueError("rank.embedding=run needs rank.embedding_run (an MLflow run id)")
        _, embedding = load_run(cfg.embedding_run or run_id)
    result = fit_two_stage(cfg, embedding, embedding)
    out = save_ranker(result, cfg, Path(cfg.out or tempfile.mkdtemp(prefix="recfb-rank-")))
    importances = result.ranker.importances()
    with tracking.run(cfg.experiment, cfg.run_name, {"model_family": "two_stage"}) as rank_run:
        tracking.log_params(cfg.model_dump(mode="json"))
        flat = {
            f"test/{method}/{key}": value
            for method, metrics in result.metrics.items()
            for key, value in metrics.items()
        }
        flat |= {f"candidate_recall/{k}": v for k, v in result.candidate_recall.items()}
        flat["ranker/best_iteration"] = float(result.ranker.best_iteration)
        tracking.log_metrics(flat)
        tracking.log_json(result.metrics, "two_stage_metrics.json")
        tracking.log_json(importances, "feature_importance.json")
        tracking.log_file(out / "ranker.txt", "ranker")
        tracking.log_file(out / "rank.json", "ranker")
        top = sorted(importances.items(), key=lambda kv: kv[1])[-25:]
        fig, ax = plt.subplots(figsize=(7, 6))
        ax.barh([k for k, _ in top], [v for _, v in top])
        ax.set(title="ranker feature importance (total gain)", xlabel="gain")
        fig.tight_layout()
        tracking.log_figure(fig, "feature_importance.png")
        plt.close(fig)
    return out, {"run_id": rank_run, "metrics": result.metrics["two_stage"], "dir": str(out)}


def save_ranker(result: Any, cfg: RankConfig, out: Path) -> Path:
    """`ranker.txt` (LightGBM's text model) and `rank.json` (columns, sources, config)."""
    out.mkdir(parents=True, exist_ok=True)
    result.ranker.save(out / "ranker.txt")
    meta = {
        "columns": result.ranker.columns,
        "sources": cfg.sources.model_dump(),
        "config": cfg.model_dump(mode="json"),
        "best_iteration": result.ranker.best_iteration,
        "candidate_recall": result.candidate_recall,
    }
    (out / "rank.json").write_text(json.dumps(meta, indent=2))
    return out


def write_rank_files(
    etl: Any, rank_dir: Path, target: Path, n_users: int, now_ms: int | None = None
) -> list[str]:
    """Write the rank files into a bundle directory being built (the state at the end of
    the log, or at `now_ms`) from `etl` (an `Interactions` or its directory); returns
    their names."""
    from recfb.etl.interactions import as_interactions
    from recfb.rank.candidates import topn_candidates, trending_scores
    from recfb.rank.online import RANK_FILES
    from recfb.rank.twostage import delayed_rates, fit_cascade

    meta = json.loads((rank_dir / "rank.json").read_text())
    cfg = RankConfig.model_validate(meta["config"])
    etl = as_interactions(etl)
    _, _, end_ms = cut_points(etl.stats)
    end_ms = end_ms if now_ms is None else int(now_ms)
    snap = snapshot_at(etl, end_ms)
    rates = delayed_rates(etl, end_ms, snap.n_items) if cfg.delay_corrected_rates else None
    items = item_stats(snap, cfg.item_windows_days, rates).with_columns(
        pl.Series("trend_score", trending_scores(snap, max(cfg.item_windows_days)))
    )
    items.write_parquet(target / "item_stats.parquet")
    # the window of history the ranker's features were trained on (`cfg.history_days`)
    recent_events(snap.events, end_ms, cfg.history_days, cfg.history_per_user).write_parquet(
        target / "history.parquet"
    )
    frames = []
    if cfg.sources.cascade:
        cascade = fit_cascade(snap, cfg)
        users = np.arange(min(n_users, snap.n_users), dtype=np.int64)
        for start in range(0, len(users), 4096):
            frames.append(
                topn_candidates(
                    cascade.score, users[start : start + 4096], snap, cfg.sources.cascade, "cascade"
                )
            )
    cand = (
        pl.concat(frames)
        if frames
        else pl.DataFrame(
            schema={
                "user_idx": pl.Int64,
                "item_idx": pl.Int64,
                "cascade_score": pl.Float32,
                "cascade_rank": pl.Int32,
            }
        )
    )
    cand.write_parquet(target / "cascade_candidates.parquet")
    shutil.copy(rank_dir / "ranker.txt", target / "ranker.txt")
    meta |= {"now_ms": end_ms, "n_users": n_users}
    (target / "rank.json").write_text(json.dumps(meta, indent=2))
    return list(RANK_FILES)

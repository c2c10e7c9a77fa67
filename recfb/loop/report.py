"""Several policies x seeds: the runs, one MLflow run per policy, and a Markdown report.

Why one report: the questions (does the re-rank raise net purchases, does the delay
correction matter, does exposure-aware debiasing reduce concentration, does MF retrained on
its own exposures amplify popularity) are answered by comparing policies side by side, with
the seed-to-seed spread next to every mean and the curves over days.
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl

from recfb.loop.config import LoopConfig
from recfb.loop.run import LoopResult, run_loop

log = logging.getLogger("recfb.loop")

TABLE_COLUMNS = (
    ("net_purchases_per_1k", "net purchases / 1k impr.", 2),
    ("refunds_per_1k", "refunds / 1k", 2),
    ("true_ndcg", "true-affinity NDCG", 3),
    ("gini", "Gini of impressions", 3),
    ("top1pct_share", "top-1% items' share", 3),
    ("coverage", "coverage", 3),
    ("new_item_discovery_days", "new-item discovery (days)", 2),
    ("new_item_netcvr_mae", "new-item NetCVR MAE (corrected)", 4),
    ("new_item_netcvr_naive_mae", "(naive)", 4),
)
CURVES = (
    "net_purchases_per_1k",
    "refunds_per_1k",
    "true_ndcg",
    "gini",
    "top1pct_share",
    "coverage",
)


def run_policies(
    cfg: LoopConfig,
    policies: list[str],
    seeds: list[int],
    out_dir: str | Path,
    *,
    http: bool = False,
    track: bool = True,
    progress: Callable[[str], None] | None = None,
) -> tuple[list[LoopResult], Path]:
    """Every policy for every seed (work directories under `out_dir/work`), then the daily
    table (`daily.csv`), the curves (PNG), `report.md`, and one MLflow run per policy."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: list[LoopResult] = []
    for policy in policies:
        for seed in seeds:
            if progress:
                progress(f"{policy} seed {seed}")
            tell = (
                (lambda m, p=policy, s=seed: progress(f"{p} seed {s}: {m}")) if progress else None
            )
            result = run_loop(
                cfg, policy, seed, out / "work" / f"{policy}-{seed}", http=http, progress=tell
            )
            results.append(result)
            _write(cfg, results, out, [])  # partial results survive an interrupted table
            if result.skipped:
                break  # the same config fails for every seed
    daily = daily_table(results)
    if not daily.is_empty():
        daily.write_csv(out / "daily.csv")
    plots = plot_curves(daily, out)
    path = out / "report.md"
    path.write_text(markdown(cfg, results, daily, plots))
    if track:
        _track(cfg, results, daily, plots)
    return results, path


def _write(cfg: LoopConfig, results: list[LoopResult], out: Path, plots: list[Path]) -> None:
    daily = daily_table(results)
    if not daily.is_empty():
        daily.write_csv(out / "daily.csv")
    (out / "report.md").write_text(markdown(cfg, results, daily, plots))


def daily_table(results: list[LoopResult]) -> pl.DataFrame:
    frames = [
        r.daily.with_columns(pl.lit(r.policy).alias("policy"), pl.lit(r.seed).alias("seed"))
        for r in results
        if not r.skipped and not r.daily.is_empty()
    ]
    return pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame()


def policy_table(daily: pl.DataFrame) -> pl.DataFrame:
    """Per policy: the mean over seeds of each seed's mean over days, and the spread (sd
    over seeds) beside it."""
    if daily.is_empty():
        return daily
    cols = [c for c, _, _ in TABLE_COLUMNS if c in daily.columns]
    per_seed = _seed_means(daily, cols)
    return per_seed.group_by("policy", maintain_order=True).agg(
        [pl.len().alias("seeds")]
        + [pl.col(c).mean().alias(c) for c in cols]
        + [pl.col(c).std().alias(f"{c}_sd") for c in cols]
    )


def _seed_means(daily: pl.DataFrame, cols: list[str]) -> pl.DataFrame:
    """Per (policy, seed): the mean over days of each column (NaN days left out)."""
    return daily.group_by("policy", "seed", maintain_order=True).agg(
        [pl.col(c).fill_nan(None).mean() for c in cols]
    )


def _fmt(mean: float | None, sd: float | None, digits: int) -> str:
    if mean is None or (isinstance(mean, float) and np.isnan(mean)):
        return "–"
    text = f"{mean:.{digits}f}"
    if sd is not None and not np.isnan(sd):
        text += f" ± {sd:.{digits}f}"
    return text


def markdown(
    cfg: LoopConfig, results: list[LoopResult], daily: pl.DataFrame, plots: list[Path]
) -> str:
    """The report: setup, the policy table (mean ± sd over seeds), skips, curves."""
    ran = [r for r in results if not r.skipped]
    walls = [r.wall_s for r in ran]
    seeds = sorted({r.seed for r in ran})
    lines = [
        "# Closed-loop evaluation",
        "",
        f"{cfg.days} simulated days after {cfg.warmup_days} warm-up days; "
        f"{cfg.world.get('n_users')} users, {cfg.world.get('n_items')} items "
        f"({cfg.new_item_share:.0%} launched during the loop), k = {cfg.k}, "
        f"{cfg.sessions_per_day} requests per user-day at activity 1, retrain every "
        f"{cfg.retrain_every_days} day(s), rates every {cfg.rates_every_hours} hour(s); "
        f"seeds {seeds}.",
        "",
        f"Wall time of one loop (policy x seed) on this machine ({platform.machine()}, "
        f"{_cores()} cores): median {np.median(walls):.0f} s, max {max(walls):.0f} s."
        if walls
        else "No loop ran.",
        "",
        "Per-day values are averaged over the loop's days, then over seeds (± sd over seeds).",
        "",
    ]
    walls_by_policy: dict[str, list[float]] = {}
    for r in ran:
        walls_by_policy.setdefault(r.policy, []).append(r.wall_s)
    lines += table_lines(daily, {p: float(np.mean(w)) for p, w in walls_by_policy.items()})
    for reference in ("two_stage", "mf"):
        lines += paired_lines(daily, reference)
    for r in results:
        if r.skipped:
            lines.append(f"- **{r.policy}** skipped: {r.skipped}")
    if plots:
        lines += ["", "## Curves over days (mean over seeds)", ""]
        lines += [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(lines) + "\n"


def table_lines(daily: pl.DataFrame, walls: dict[str, float]) -> list[str]:
    """The policy table as Markdown lines (mean ± sd over seeds), with each policy's mean
    wall seconds per loop where `walls` has it."""
    table = policy_table(daily)
    if table.is_empty():
        return []
    head = ["policy", "seeds", *(label for _, label, _ in TABLE_COLUMNS), "wall s / loop"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table.iter_rows(named=True):
        cells = [row["policy"], str(row["seeds"])]
        for col, _, digits in TABLE_COLUMNS:
            cells.append(_fmt(row.get(col), row.get(f"{col}_sd"), digits))
        wall = walls.get(row["policy"])
        cells.append("–" if wall is None else f"{wall:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


PAIRED_COLUMNS = (
    ("net_purchases_per_1k", "net purchases / 1k", 2),
    ("refunds_per_1k", "refunds / 1k", 2),
    ("gini", "Gini", 3),
    ("coverage", "coverage", 3),
)


def paired_lines(daily: pl.DataFrame, reference: str) -> list[str]:
    """Each policy minus `reference` on the same seed (same users, same world), mean ± sd
    of the per-seed differences and on how many seeds it was higher. Seeds share most of
    their variance (a seed's world sets how much anyone buys), so the paired difference
    says more than two means with overlapping spreads."""
    if daily.is_empty() or reference not in set(daily["policy"]):
        return []
    cols = [(c, label, d) for c, label, d in PAIRED_COLUMNS if c in daily.columns]
    per_seed = _seed_means(daily, [c for c, _, _ in cols])
    ref = per_seed.filter(pl.col("policy") == reference).drop("policy")
    diff = (
        per_seed.filter(pl.col("policy") != reference)
        .join(ref, on="seed", suffix="_ref")
        .select("policy", "seed", *[(pl.col(c) - pl.col(f"{c}_ref")).alias(c) for c, _, _ in cols])
    )
    if diff.is_empty():
        return []
    head = ["policy", "seeds", *(f"Δ {label} (higher on)" for _, label, _ in cols)]
    lines = [
        f"Paired by seed against **{reference}** (each policy minus {reference} on the same "
        "seed; mean ± sd over seeds, and on how many seeds the policy was higher):",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for policy, group in diff.group_by("policy", maintain_order=True):
        cells = [str(policy[0]), str(group.height)]
        for c, _, digits in cols:
            values = group[c].drop_nulls()
            if values.is_empty():
                cells.append("–")
                continue
            sd = values.std() if values.len() > 1 else None
            cells.append(
                f"{_fmt(values.mean(), sd, digits)} ({int((values > 0).sum())}/{values.len()})"
            )
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def plot_curves(daily: pl.DataFrame, out: Path) -> list[Path]:
    """One PNG per measure: each policy's mean over seeds by day."""
    if daily.is_empty():
        return []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no curves")
        return []
    means = daily.group_by("policy", "day", maintain_order=True).agg(
        [pl.col(c).fill_nan(None).mean() for c in CURVES]
    )
    paths = []
    for col in CURVES:
        fig, ax = plt.subplots(figsize=(7, 4))
        for policy in means["policy"].unique(maintain_order=True).to_list():
            part = means.filter(pl.col("policy") == policy).sort("day")
            ax.plot(part["day"].to_list(), part[col].to_list(), marker="o", ms=3, label=policy)
        ax.set_xlabel("simulated day")
        ax.set_ylabel(col)
        ax.set_title(col.replace("_", " "))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = out / f"loop_{col}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _track(cfg: LoopConfig, results: list[LoopResult], daily: pl.DataFrame, plots: list[Path]):
    """One MLflow run per policy: its seed-mean metrics by day (step = day), each seed's
    summary, the config, the daily table and the curves."""
    from recfb import tracking

    tracking.configure()
    for policy in dict.fromkeys(r.policy for r in results):
        runs = [r for r in results if r.policy == policy]
        tags = {"recfb.kind": "loop", "loop.policy": policy}
        if runs[0].skipped:
            tags["loop.skipped"] = runs[0].skipped[:5000]
        with tracking.run(cfg.experiment, f"loop-{policy}", tags):
            spec = cfg.policies[policy].model_dump(mode="json")
            tracking.log_params(
                {"policy": spec, "days": cfg.days, "warmup_days": cfg.warmup_days, "k": cfg.k}
                | {"world": cfg.world, "seeds": [r.seed for r in runs]}
            )
            if runs[0].skipped:
                continue
            part = daily.filter(pl.col("policy") == policy)
            cols = [c for c in part.columns if c not in ("policy", "seed", "day")]
            means = part.group_by("day").agg([pl.col(c).fill_nan(None).mean() for c in cols])
            for row in means.sort("day").iter_rows(named=True):
                values = {k: v for k, v in row.items() if k != "day" and v is not None}
                tracking.log_metrics(values, step=int(row["day"]))
            for r in runs:
                tracking.log_metrics(r.summary | {"wall_s": r.wall_s}, prefix=f"seed{r.seed}/")
            tracking.log_frame(part, "daily.parquet")
            for path in plots:
                tracking.log_file(path, "plots")

"""The closed-loop policy table (recfb loop) with the wall time of each loop and the CPU
steal share while it ran: writes benchmarks/results/loop.md (+ loop.json, curves).

    flock /tmp/recfb-bench.lock python benchmarks/loop.py --days 14 --seeds 1,2,3
    python benchmarks/loop.py --policies random,oracle,mf --days 3 --seeds 1   # quick
    python benchmarks/loop.py --merge loop_14d loop_14d_rest --name loop_14d_all

`--merge` joins earlier results files (runs stopped part-way, or policies run apart) into
one table: the daily rows of each (policy, seed) come from the last file that has them; the
loop is deterministic by seed, so a rerun of the same loop gives the same rows.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import cpu_steal, steal_share  # noqa: E402
from recfb.loop.config import load_loop_config  # noqa: E402
from recfb.loop.report import paired_lines, plot_curves, run_policies, table_lines  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "conf/loop.yaml"))
    ap.add_argument("--policies", default=None, help="comma-separated; default all")
    ap.add_argument("--days", type=int, default=None)
    ap.add_argument("--seeds", default=None)
    ap.add_argument("--set", action="append", default=[], help="LoopConfig override")
    ap.add_argument("--work", default="/tmp/recfb-loop-bench")
    ap.add_argument("--name", default="loop", help="results file stem")
    ap.add_argument("--merge", nargs="+", help="results file stems to join into --name")
    args = ap.parse_args()
    if args.merge:
        merge(args.merge, args.name)
        return
    extra = [f"days={args.days}"] if args.days else []
    cfg = load_loop_config(args.config, [*args.set, *extra])
    policies = args.policies.split(",") if args.policies else list(cfg.policies)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else cfg.seeds
    steal0, started = cpu_steal(), time.perf_counter()
    results, report = run_policies(
        cfg, policies, seeds, args.work, track=False, progress=lambda m: print(m, flush=True)
    )
    wall = time.perf_counter() - started
    steal = steal_share(steal0, cpu_steal())
    out = ROOT / "benchmarks" / "results"
    command = " ".join(["python benchmarks/loop.py", *sys.argv[1:]])
    head = (
        f"Command: `{command}` (config {Path(args.config).name}); total wall {wall:.0f} s, "
        f"CPU steal share {steal:.1%} while it ran; other agents' jobs shared the 2 cores.\n\n"
    )
    text = report.read_text().replace("](loop_", f"]({args.name}_curves/loop_")
    (out / f"{args.name}.md").write_text(text.replace("\n\n", "\n\n" + head, 1))
    curves = out / f"{args.name}_curves"
    curves.mkdir(exist_ok=True)
    for png in Path(args.work).glob("loop_*.png"):
        shutil.copy(png, curves / png.name)
    shutil.copy(Path(args.work) / "daily.csv", out / f"{args.name}_daily.csv")
    summary = [
        {"policy": r.policy, "seed": r.seed, "wall_s": round(r.wall_s, 1), "skipped": r.skipped}
        | {k: round(v, 5) for k, v in r.summary.items()}
        for r in results
    ]
    (out / f"{args.name}.json").write_text(
        json.dumps({"command": command, "wall_s": wall, "steal": steal, "runs": summary}, indent=1)
    )
    print(json.dumps({"wall_s": round(wall, 1), "steal": steal}))


def _walls(stem: str) -> dict[tuple[str, int], float] | dict[str, float]:
    """Wall seconds per loop: per (policy, seed) from `<stem>.json`, else per policy from the
    report's table (a run stopped part-way wrote no json)."""
    js = RESULTS / f"{stem}.json"
    if js.exists():
        return {(r["policy"], r["seed"]): r["wall_s"] for r in json.loads(js.read_text())["runs"]}
    walls: dict[str, float] = {}
    for line in (RESULTS / f"{stem}.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) > 2 and cells[1].isdigit() and cells[-1].replace(".", "").isdigit():
            walls[cells[0]] = float(cells[-1])
    return walls


def _gini_by_day(daily: pl.DataFrame, policies: list[str]) -> list[str]:
    """Popularity amplification: the Gini of impressions by loop day, mean over seeds."""
    policies = [p for p in policies if p in set(daily["policy"])]
    if not policies:
        return []
    by_day = (
        daily.filter(pl.col("policy").is_in(policies))
        .group_by("day", "policy")
        .agg(pl.col("gini").mean())
        .pivot("policy", index="day", values="gini")
        .sort("day")
    )
    lines = [
        "Popularity amplification, Gini of impressions over items by loop day (mean over "
        "seeds; the models retrained nightly on their own exposures):",
        "",
        "| day | " + " | ".join(policies) + " |",
        "|---:|" + "---:|" * len(policies),
    ]
    for row in by_day.iter_rows(named=True):
        cells = [f"{row[p]:.3f}" if row[p] is not None else "–" for p in policies]
        lines.append(f"| {row['day']} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def merge(stems: list[str], name: str) -> None:
    """One table (and curves, daily rows) from several results files."""
    daily, walls = None, {}
    for stem in stems:
        part = pl.read_csv(RESULTS / f"{stem}_daily.csv")
        if daily is not None:
            runs = part.select("policy", "seed").unique()
            daily = daily.join(runs, on=["policy", "seed"], how="anti")
            daily = pl.concat([daily, part], how="diagonal_relaxed")
        else:
            daily = part
        for key, wall in _walls(stem).items():
            policy = key[0] if isinstance(key, tuple) else key
            walls.setdefault(policy, {})[key] = wall
    assert daily is not None
    order: list[str] = []  # the policies in the order the files first ran them
    for stem in stems:
        for p in pl.read_csv(RESULTS / f"{stem}_daily.csv")["policy"].unique(maintain_order=True):
            order += [] if p in order else [p]
    rank = pl.col("policy").replace_strict(order, list(range(len(order))))
    daily = daily.sort(rank, "seed", "day")
    mean_wall = {p: sum(w.values()) / len(w) for p, w in walls.items()}
    curves = RESULTS / f"{name}_curves"
    curves.mkdir(exist_ok=True)
    plots = plot_curves(daily, curves)
    lines = [
        f"# Closed-loop policy table: {', '.join(stems)} joined",
        "",
        f"Command: `python benchmarks/loop.py --merge {' '.join(stems)} --name {name}`. "
        "Each (policy, seed)'s daily rows come from the last file that has them; see each "
        "file for its run's command, machine load and setup. Wall seconds per loop: the mean "
        "of the loops' walls as each file recorded them (per policy where a run was stopped "
        "part-way).",
        "",
        *table_lines(daily, mean_wall),
        *paired_lines(daily, "two_stage"),
        *paired_lines(daily, "mf"),
        *_gini_by_day(daily, ["random", "mf", "two_stage"]),
        "## Curves over days (mean over seeds)",
        "",
        *[f"![{p.stem}]({name}_curves/{p.name})" for p in plots],
    ]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    daily.write_csv(RESULTS / f"{name}_daily.csv")
    print(f"wrote {RESULTS / f'{name}.md'}")


if __name__ == "__main__":
    main()

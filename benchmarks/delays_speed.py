"""Wall time and peak memory of `recfb delays` on a 30-day simulated stream of about 3M clicks,
for this checkout and (optionally) a checkout of the code before the speed-up, with every fitted
parameter of the two delays.json compared.

The stream is simulated once into --work (the delayed-feedback benchmark's shop, 30 days, a
higher click rate so that ~16M events hold ~3M clicks) and ETL'd there; later runs reuse it.
Each `recfb delays` runs as a child process (peak RSS from wait4, CPU steal share of the
machine while it ran). The peer row, measured in the same run, is a bare Polars read of what
the fit needs (clock, purchase and refund rows of events.parquet with their times) followed by
one scipy.stats.lognorm.fit of the observed click -> purchase delays (the uncensored MLE of one
family, no cure, no segments): the figures are ratios against it.

    # the base commit's code checked out at /work/wt-delays-base (git worktree add --detach)
    flock /tmp/recfb-bench.lock python benchmarks/delays_speed.py \
        --base-worktree /work/wt-delays-base --name delays_speed

Parameters are compared on their natural scale (p, scale = exp(log_scale), shape =
exp(log_shape), median hours, log-likelihood, AIC; n_trials and n_events exactly), over the
overall fit, every family's candidate and every segment of both stages.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, cpu_steal, simulated_etl, steal_share  # noqa: E402

RESULTS = Path(__file__).parent / "results"
PEER_ROW = "peer: Polars read + scipy lognorm.fit"

PEER = r"""
import json, sys, time
import numpy as np, polars as pl
from scipy import stats
t0 = time.perf_counter()
ev = (
    pl.scan_parquet(sys.argv[1] + "/events.parquet")
    .with_columns(pl.col("event").cast(pl.String))
    .filter(pl.col("event").is_in(["click", "purchase"]))
    .select("user_idx", "item_idx", "event", pl.col("ts").dt.epoch("ms"),
            pl.col("cancelled_at").dt.epoch("ms"))
    .collect()
)
t1 = time.perf_counter()
first = (
    ev.group_by("user_idx", "item_idx")
    .agg(pl.col("ts").filter(pl.col("event") == "click").min().alias("c"),
         pl.col("ts").filter(pl.col("event") == "purchase").min().alias("b"))
    .drop_nulls()
    .filter(pl.col("b") >= pl.col("c"))
)
d = np.maximum((first["b"] - first["c"]).to_numpy() / 1000.0, 1.0)
shape, _, scale = stats.lognorm.fit(d, floc=0)
print(json.dumps({"read_s": t1 - t0, "rows": ev.height, "delays": int(d.size),
                  "lognorm_shape": shape, "lognorm_scale_h": scale / 3600}))
"""


def sim_config(n_events: int):
    """benchmarks/delayed.py's shop over 30 days with ~19% of events clicks."""
    from benchmarks.delayed import sim_config as delayed_config

    return delayed_config(n_events).model_copy(update={"days": 30.0, "click_logit": -1.8})


def run_child(cmd: list[str], env: dict[str, str], cwd: Path, timeout: float | None) -> dict:
    """Run one child: wall time, its own peak RSS (wait4, so earlier children do not count) and
    the machine's CPU steal share while it ran; stdout kept. Past ``timeout`` seconds it is
    killed and the row says so (its time is then a lower bound)."""
    steal0 = cpu_steal()
    start = time.perf_counter()
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.DEVNULL, env=env, cwd=cwd)
        timer = threading.Timer(timeout, proc.kill) if timeout else None
        if timer:
            timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = status  # reaped here: keep Popen from waiting on it again
        if timer:
            timer.cancel()
        wall = time.perf_counter() - start
        out.seek(0)
        text = out.read().decode()
    timed_out = bool(timeout) and os.WIFSIGNALED(status) and wall >= timeout
    if status != 0 and not timed_out:
        raise RuntimeError(f"{cmd} failed with status {status}")
    return {
        "seconds": round(wall, 2),
        "timed_out": timed_out,
        "peak_rss_gib": round(usage.ru_maxrss / 1024**2, 3),
        "cpu_steal_share": steal_share(steal0, cpu_steal()),
        "stdout": text,
    }


# `recfb delays` with the likelihood's log-time binning switched off: the same optimiser on the
# raw arrays, to show what the binning changes at full size
UNBINNED = (
    "import sys, recfb.delayed.survival as s; s.BIN_FROM = sys.maxsize; "
    "from recfb.cli import main; sys.argv[0] = 'recfb'; main()"
)


def run_delays(
    code: Path, etl: Path, cutoff: str, out: Path, timeout: float | None, unbinned: bool = False
) -> dict:
    """`recfb delays` of the checkout at ``code`` (PYTHONPATH wins over the installed one)."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    entry = ["-c", UNBINNED] if unbinned else ["-m", "recfb.cli"]
    args = ["delays", "--etl", str(etl), "--cutoff", cutoff, "-o", str(out)]
    res = run_child([sys.executable, *entry, *args], env, code, timeout)
    res.pop("stdout")
    return res


def _models(d: dict):
    """Every fitted model in a delays.json, by a path name."""
    for stage in ("conversion", "refund"):
        s = d.get(stage)
        if not s:
            continue
        yield f"{stage}.overall", s["overall"]
        for fam, m in s["candidates"].items():
            yield f"{stage}.candidates.{fam}", m
        for key, m in s["segments"].items():
            yield f"{stage}.segments.{key}", m


def _natural(m: dict) -> dict[str, float]:
    return {
        "p": m["p"],
        "scale": math.exp(m["log_scale"]),
        "shape": math.exp(m["log_shape"]),
        "median_hours": m["median_hours"],
        "log_likelihood": m.get("log_likelihood"),
        "aic": m.get("aic"),
        "n_trials": m["n_trials"],
        "n_events": m["n_events"],
    }


def compare(base: dict, new: dict) -> dict:
    """Max relative difference over every parameter of every model; models or families that
    are in one file only are listed (a mismatch, not a number)."""
    a, b = dict(_models(base)), dict(_models(new))
    only = sorted(set(a) ^ set(b))
    worst, where, n = 0.0, None, 0
    for name in sorted(set(a) & set(b)):
        if a[name]["family"] != b[name]["family"]:
            only.append(f"{name}: family {a[name]['family']} vs {b[name]['family']}")
            continue
        na, nb = _natural(a[name]), _natural(b[name])
        for key, x in na.items():
            y = nb[key]
            if x is None or y is None or (isinstance(x, float) and math.isnan(x)):
                continue
            n += 1
            rel = abs(y - x) / max(abs(x), 1e-300)
            if rel > worst:
                worst, where = rel, f"{name}.{key}"
    return {"max_rel_diff": worst, "at": where, "n_compared": n, "mismatched": only}


def prepare(n_events: int, work: str) -> None:
    """Simulate and ETL the stream into ``work`` (run in its own process by ``main``)."""
    simulated_etl(sim_config(n_events), Path(work), split={"method": "none"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--events", type=int, default=16_000_000)
    ap.add_argument("--work", default="/tmp/recfb-delays-bench")
    ap.add_argument("--base-worktree", type=Path, help="checkout of the code before the change")
    ap.add_argument("--base-timeout", type=float, help="kill the base run after this (seconds)")
    ap.add_argument(
        "--base-json", type=Path, help="delays.json of an earlier base run on the same stream"
    )
    ap.add_argument("--unbinned", action="store_true", help="also run the new code unbinned")
    ap.add_argument("--name", default="delays_speed", help="results/<name>.json and .md")
    args = ap.parse_args()

    work = Path(args.work)
    cfg = sim_config(args.events)
    etl = work / "etl"
    if not (etl / "events.parquet").exists():
        # in a child: a child's peak RSS (wait4) starts at its parent's size at fork time
        prep = f"from benchmarks.delays_speed import prepare; prepare({args.events}, {str(work)!r})"
        subprocess.run([sys.executable, "-c", prep], cwd=ROOT, check=True)
    cutoff = cfg.end_iso()
    import polars as pl

    counts = dict(
        pl.scan_parquet(etl / "events.parquet")
        .group_by(pl.col("event").cast(pl.String))
        .len()
        .collect()
        .iter_rows()
    )
    rows: dict[str, dict] = {}
    peer = run_child([sys.executable, "-c", PEER, str(etl)], dict(os.environ), ROOT, None)
    rows[PEER_ROW] = {
        **{k: v for k, v in peer.items() if k != "stdout"},
        **json.loads(peer["stdout"].strip().splitlines()[-1]),
    }
    runs = [("new", ROOT, False, None)]
    if args.unbinned:
        runs.append(("new, unbinned", ROOT, True, args.base_timeout))
    if args.base_worktree:
        runs.append(("base", args.base_worktree, False, args.base_timeout))
    fits: dict[str, dict] = {}
    for label, code, unbinned, timeout in runs:
        out = work / f"delays-{label.replace(', ', '-')}"
        (out / "delays.json").unlink(missing_ok=True)
        rows[f"recfb delays ({label})"] = run_delays(code, etl, cutoff, out, timeout, unbinned)
        if not rows[f"recfb delays ({label})"]["timed_out"]:
            fits[label] = json.loads((out / "delays.json").read_text())
    if args.base_json:
        fits["base (earlier run)"] = json.loads(args.base_json.read_text())
    peer_s = rows[PEER_ROW]["seconds"]
    for row in rows.values():
        row["ratio_to_peer"] = round(row["seconds"] / peer_s, 2)
    result = {
        "config": cfg.model_dump(mode="json"),
        "events": counts,
        "cutoff": cutoff,
        "base_worktree": str(args.base_worktree) if args.base_worktree else None,
        "rows": rows,
        "param_diff": {
            f"new vs {label}": compare(fits[label], fits["new"]) for label in fits if label != "new"
        },
        "fits_new": fits["new"],
    }
    print(json.dumps({k: v for k, v in result.items() if k not in ("config", "fits_new")}))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    (RESULTS / f"{args.name}.md").write_text(markdown(result, " ".join(sys.argv[1:])))


def markdown(result: dict, argv: str) -> str:
    """The before/after table of one run."""
    ev = result["events"]
    lines = [
        f"`python benchmarks/delays_speed.py {argv}`: {sum(ev.values()):,} events, "
        f"{ev.get('click', 0):,} clicks, {ev.get('purchase', 0):,} purchases, "
        f"{ev.get('refund', 0):,} refunds; cut-off {result['cutoff']}.",
        "",
        "| run | seconds | peak RSS GiB | ratio to peer | CPU steal share |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in result["rows"].items():
        secs = (
            f"> {row['seconds']:.1f} (killed)" if row.get("timed_out") else f"{row['seconds']:.1f}"
        )
        ratio = f"> {row['ratio_to_peer']}" if row.get("timed_out") else f"{row['ratio_to_peer']}"
        lines.append(
            f"| {name} | {secs} | {row['peak_rss_gib']:.2f} | {ratio} | {row['cpu_steal_share']} |"
        )
    lines.append("")
    for name, diff in result["param_diff"].items():
        lines.append(
            f"Max relative parameter difference, {name}: {diff['max_rel_diff']:.2e} "
            f"(at {diff['at']}, {diff['n_compared']} values; mismatched: "
            f"{diff['mismatched'] or 'none'})."
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

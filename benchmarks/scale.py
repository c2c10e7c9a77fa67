"""The Ray engine against the local one: ETL and batch-scoring throughput with 1 and 2 Ray
workers (a private `ray start --head` cluster with that many CPUs) at each size of simulated
events, the peak memory of the driver and of each Ray worker process, and the CPU steal share
beside each figure. Every command is the user's (`recfb etl`, `recfb recommend`), run in its
own process; the Ray ETL's output is checked equal to the local one's (stats, row counts).

    python benchmarks/scale.py --sizes 10000000 50000000 --workers 1 2 \
        --sim-root /tmp/recfb-bench --score-users 50000 --out benchmarks/results/scale.json

`--etl-only` times the ETL alone and keeps the scoring rows `--out` already holds (marked
`scoring_from_earlier_run`). The simulated events are `<sim-root>/sim-<size>/events` (made
with `recfb simulate` if absent). Each ETL row carries the ETL's own stage timings. What
the figures imply for 1B events on N machines is worked out in the README.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import polars as pl
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import cpu_steal, steal_share  # noqa: E402
from recfb.distributed.local import ENV, LocalCluster  # noqa: E402

RECFB = [sys.executable, "-m", "recfb.cli"]


class MemoryWatch:
    """Peak RSS (GiB) of a command's process tree and of each Ray worker process, sampled
    every 100 ms while it runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.driver = 0.0
        self.workers: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                root = psutil.Process(self.pid)
                tree = [root, *root.children(recursive=True)]
                self.driver = max(self.driver, sum(_rss(p) for p in tree) / 1024**3)
            except psutil.Error:
                pass
            for proc in psutil.process_iter(["cmdline"]):
                cmd = " ".join(proc.info["cmdline"] or [])
                if cmd.startswith("ray::") or "default_worker.py" in cmd:
                    rss = _rss(proc) / 1024**3
                    self.workers[proc.pid] = max(self.workers.get(proc.pid, 0.0), rss)
            self._stop.wait(0.1)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        peaks = sorted(self.workers.values(), reverse=True)
        return {
            "driver_peak_rss_gib": round(self.driver, 3),
            "worker_peak_rss_gib": round(peaks[0], 3) if peaks else 0.0,
            "worker_processes": len(peaks),
        }


def _rss(proc: psutil.Process) -> int:
    try:
        return proc.memory_info().rss
    except psutil.Error:
        return 0


def timed(cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run a command; wall seconds, steal share, memory peaks."""
    steal0 = cpu_steal()
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=os.environ | env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    watch = MemoryWatch(proc.pid)
    out, err = proc.communicate()
    memory = watch.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err.decode()[-3000:]}")
    return {
        "wall_s": round(time.perf_counter() - start, 2),
        "cpu_steal_share": steal_share(steal0, cpu_steal()),
        **memory,
        "stdout_tail": out.decode().strip().splitlines()[-1:],
    }


def ensure_sim(root: Path, size: int) -> Path:
    events = root / f"sim-{size}" / "events"
    if not events.exists():
        sets = ["--set", f"n_events={size}", "--set", f"n_users={max(1000, size // 50)}"]
        subprocess.run([*RECFB, "simulate", "-o", str(events.parent), *sets, "-q"], check=True)
    return events


def etl_cmd(events: Path, out: Path, engine: list[str]) -> list[str]:
    return [
        *RECFB,
        "etl",
        "-i",
        str(events),
        "-o",
        str(out),
        "--set",
        "input.format=parquet",
        "-q",
        *engine,
    ]


def same_etl(a: Path, b: Path) -> bool:
    sa, sb = (json.loads((d / "stats.json").read_text()) for d in (a, b))
    for s in (sa, sb):
        s.pop("timings_s", None), s.pop("engine", None)
    counts = all(
        pl.scan_parquet(a / f).select(pl.len()).collect().item()
        == pl.scan_parquet(b / f).select(pl.len()).collect().item()
        for f in ("events.parquet", "train.parquet", "valid.parquet", "test.parquet")
    )
    return sa == sb and counts


def same_lists(a_path: Path, b_path: Path, tie: float = 1e-5) -> dict[str, Any]:
    """Whether two runs' lists agree: the same items for every user, and every row where
    the order differs a swap of scores within `tie` of each other (float32 sums in another
    order: one thread per actor against a multi-threaded process)."""
    a, b = pl.read_parquet(a_path), pl.read_parquet(b_path)
    pairs = a.height == b.height and a.select("user_id", "item_id").sort(
        "user_id", "item_id"
    ).equals(b.select("user_id", "item_id").sort("user_id", "item_id"))
    moved = (a["user_id"] != b["user_id"]) | (a["item_id"] != b["item_id"])
    gap = (a["score"] - b["score"]).abs().max() if a.height == b.height else None
    return {
        "same_as_local": bool(pairs and gap is not None and gap < tie),
        "rows_swapped_at_ties": int(moved.sum()) if a.height == b.height else None,
    }


def table(results: dict[str, Any]) -> str:
    """The results as the markdown table of docs/measurements.md."""
    lines = [
        "| events | job | engine | wall s | throughput | vs local | driver peak GiB | "
        "worker peak GiB | steal | same as local |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for size, row in results["sizes"].items():
        for job, unit in (("etl", "events_per_s"), ("scoring", "users_per_s")):
            for name, r in row[job].items():
                if not isinstance(r, dict) or "wall_s" not in r:
                    continue
                rate = row[job][unit][name]
                what = "events/s" if job == "etl" else "users/s"
                lines.append(
                    f"| {int(size):,} | {job} | {name} | {r['wall_s']} | {rate:,} {what} | "
                    f"{r['vs_local']}x | {r['driver_peak_rss_gib']} | "
                    f"{r['worker_peak_rss_gib'] or '-'} | {r['cpu_steal_share']:.2%} | "
                    f"{r.get('same_as_local', '-')} |"
                )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000_000, 50_000_000])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--sim-root", type=Path, default=Path("/tmp/recfb-bench"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/recfb-scale"))
    parser.add_argument("--score-users", type=int, default=50_000)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/scale.json")
    parser.add_argument("--table", action="store_true", help="print --out's table and stop")
    parser.add_argument(
        "--etl-only",
        action="store_true",
        help="time the ETL only; keep the scoring figures --out already holds (marked so)",
    )
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(args.out.read_text())))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    store = f"sqlite:///{args.work / 'mlruns.db'}"
    env = ENV | {"MLFLOW_TRACKING_URI": store}
    results: dict[str, Any] = {"host_cpus": os.cpu_count(), "sizes": {}}
    earlier = json.loads(args.out.read_text()) if args.etl_only and args.out.exists() else {}
    for size in args.sizes:
        events = ensure_sim(args.sim_root, size)
        row: dict[str, Any] = {"etl": {}, "scoring": {}}
        local_out = args.work / f"etl-{size}-local"
        row["etl"]["local"] = timed(etl_cmd(events, local_out, []), env)
        row["etl"]["local"]["stages_s"] = stages(local_out)
        print(size, "etl local", row["etl"]["local"], flush=True)
        if args.etl_only:
            row["scoring"] = earlier.get("sizes", {}).get(str(size), {}).get("scoring", {})
            row["scoring_from_earlier_run"] = True
            for workers in args.workers:
                row["etl"][f"ray{workers}"] = ray_etl(
                    events, size, local_out, args.work, workers, env
                )
            finish(row, size)
            results["sizes"][str(size)] = row
            args.out.write_text(json.dumps(results, indent=1))
            continue
        # a model to score with: MF, one epoch, on the same events split with a tiny holdout
        # (training evaluates every holdout user against every item: at 50M events, 1M users
        # by 100k items, that took longer than everything else here)
        model_data = args.work / f"etl-{size}-model"
        holdout = ["--set", "split.valid_frac=0.001", "--set", "split.test_frac=0.001"]
        timed(etl_cmd(events, model_data, holdout), env)
        trained = timed(
            [
                *RECFB,
                "train",
                "--set",
                f"data={model_data}",
                "--set",
                "trainer.max_epochs=1",
                "--set",
                "eval.ks=[20]",
                "--set",
                "trainer.monitor=ndcg@20",
                "-q",
            ],
            env,
        )
        run_id = trained["stdout_tail"][0].split()[-1]
        users = pl.read_parquet(local_out / "users.parquet")["user_id"].head(args.score_users)
        user_file = args.work / f"users-{size}.txt"
        user_file.write_text("\n".join(map(str, users.to_list())) + "\n")
        score = [*RECFB, "recommend", "--run-id", run_id, "--users", str(user_file), "-k", "20"]
        local_recs = args.work / f"recs-{size}-local.parquet"
        row["scoring"]["local"] = timed([*score, "-o", str(local_recs)], env)
        row["scoring"]["users"] = users.len()
        print(size, "scoring local", row["scoring"]["local"], flush=True)
        for workers in args.workers:
            cluster = LocalCluster(cpus=workers, object_store_bytes=4 << 30)
            try:
                engine = ["--engine", "ray", "--address", cluster.address]
                row["etl"][f"ray{workers}"] = ray_etl(
                    events, size, local_out, args.work, workers, env, cluster
                )
                recs = args.work / f"recs-{size}-ray{workers}.parquet"
                result = timed([*score, "-o", str(recs), *engine, "--workers", str(workers)], env)
                result |= same_lists(local_recs, recs)
                row["scoring"][f"ray{workers}"] = result
                print(size, f"scoring ray{workers}", result, flush=True)
            finally:
                cluster.stop()
        finish(row, size)
        results["sizes"][str(size)] = row
        args.out.write_text(json.dumps(results, indent=1))
    print(table(results))


def ray_etl(
    events: Path,
    size: int,
    local_out: Path,
    work: Path,
    workers: int,
    env: dict[str, str],
    cluster: LocalCluster | None = None,
) -> dict[str, Any]:
    """`recfb etl --engine ray` on a cluster of `workers` CPUs (started here unless given),
    timed and checked equal to the local output."""
    own = cluster is None
    cluster = cluster or LocalCluster(cpus=workers, object_store_bytes=4 << 30)
    try:
        engine = ["--engine", "ray", "--address", cluster.address]
        ray_out = work / f"etl-{size}-ray{workers}"
        cmd = etl_cmd(events, ray_out, [*engine, "--set", f"ray.workers={workers}"])
        result = timed(cmd, env)
        result["same_as_local"] = same_etl(local_out, ray_out)
        result["stages_s"] = stages(ray_out)
        print(size, f"etl ray{workers}", result, flush=True)
        return result
    finally:
        if own:
            cluster.stop()


def stages(out: Path) -> dict[str, float]:
    """The ETL's own stage timings (its stats.json)."""
    return json.loads((out / "stats.json").read_text())["timings_s"]


def finish(row: dict[str, Any], size: int) -> None:
    """Ratios against the local engine and throughputs."""
    for part in ("etl", "scoring"):
        runs = {k: v for k, v in row[part].items() if isinstance(v, dict) and "wall_s" in v}
        if "local" not in runs:
            continue
        for value in runs.values():
            value["vs_local"] = round(runs["local"]["wall_s"] / value["wall_s"], 3)
        per = size if part == "etl" else row[part]["users"]
        unit = "events_per_s" if part == "etl" else "users_per_s"
        row[part][unit] = {name: round(per / value["wall_s"]) for name, value in runs.items()}


if __name__ == "__main__":
    main()

"""What the benchmark scripts share: child-process measurement and simulated ETL inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SIGNALS = ROOT / "conf" / "signals" / "simulator.yaml"


def cpu_steal() -> tuple[int, int]:
    """(steal, total) jiffies of the machine so far (Linux /proc/stat): how much CPU other
    tenants of a shared VM took, so a phase's figures can be read with its noise."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    return (fields[7] if len(fields) > 7 else 0), sum(fields)


def steal_share(before: tuple[int, int], after: tuple[int, int]) -> float:
    return round((after[0] - before[0]) / max(1, after[1] - before[1]), 4)


def run_child(script: str, args: list[str]) -> dict[str, Any]:
    """Run `script` with `args` in its own process; its last stdout line is JSON. Adds the
    wall time, the CPU steal share while it ran and the child's own peak RSS (from wait4, so
    earlier runs do not count)."""
    steal0 = cpu_steal()
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, script, *args], stdout=subprocess.PIPE, cwd=ROOT, text=True
    )
    assert proc.stdout is not None
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise RuntimeError(f"child {script} {args} failed with status {status}")
    result = json.loads(output.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - start
    result["cpu_steal_share"] = steal_share(steal0, cpu_steal())
    result["peak_rss_gib"] = usage.ru_maxrss / 1024**2  # ru_maxrss is KiB on Linux
    return result


def sim_etl_config(events: str | Path, out: str | Path, split: dict | None = None) -> Any:
    """The ETL config the benchmarks run on simulated events (parquet files, the simulator's
    signal map)."""
    from recfb.config import build_model
    from recfb.etl import EtlConfig

    data: dict[str, Any] = {
        "input": {"paths": [str(events)], "format": "parquet"},
        "signals": str(SIGNALS),
        "out": str(out),
    }
    if split is not None:
        data["split"] = split
    return build_model(EtlConfig, data, "benchmark")


def run_in_checkout(checkout: str | Path, code: str, args: list[str]) -> str:
    """Run Python `code` with `args` in its own process on another checkout's recfb
    (PYTHONPATH=<checkout>, cwd there); returns its stdout. For A/Bs across checkouts."""
    checkout = Path(checkout).resolve()
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        env=os.environ | {"PYTHONPATH": str(checkout)},
        cwd=checkout,
        stdout=subprocess.PIPE,
        text=True,
        check=True,
    )
    return done.stdout


def simulated_etl(sim_config: Any, base: Path, split: dict | None = None) -> Path:
    """Simulate into base/sim (unless there) and run the ETL into base/etl; returns base/etl."""
    from recfb.etl import run_etl
    from recfb.simulate import simulate

    if not (base / "sim" / "events").exists():
        simulate(sim_config, base / "sim", overwrite=True)
    etl = base / "etl"
    run_etl(sim_etl_config(base / "sim" / "events", etl, split), quiet=True)
    return etl

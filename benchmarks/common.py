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


def simulated_etl(sim_config: Any, base: Path, split: dict | None = None) -> Path:
    """Simulate into base/sim (unless there) and run the ETL into base/etl; returns base/etl."""
    from recfb.config import build_model
    from recfb.etl import EtlConfig, run_etl
    from recfb.simulate import simulate

    if not (base / "sim" / "events").exists():
        simulate(sim_config, base / "sim", overwrite=True)
    etl = base / "etl"
    data: dict[str, Any] = {
        "input": {"paths": [str(base / "sim" / "events")]},
        "signals": str(SIGNALS),
        "out": str(etl),
    }
    if split is not None:
        data["split"] = split
    run_etl(build_model(EtlConfig, data, "benchmark"), quiet=True)
    return etl

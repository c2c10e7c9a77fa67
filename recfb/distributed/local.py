"""A private Ray cluster on this host: `ray start --head` on 127.0.0.1 from this environment's
`ray` command, stopped (and its processes checked gone) by `stop`. What the tests and
benchmarks run the Ray engine on, as a user would run a real cluster's head. Token auth is off
for this loopback-only cluster (drivers joining it need RAY_AUTH_MODE=disabled too: `ENV`)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    """A started head node with `cpus` CPUs; `address` is what drivers join."""

    def __init__(self, cpus: int = 2, object_store_bytes: int = 1 << 30) -> None:
        self.ray = str(Path(sys.executable).with_name("ray"))
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.temp = tempfile.mkdtemp(prefix="recfb-ray-", dir="/tmp")
        self.env = os.environ | ENV
        proc = subprocess.run(
            [
                self.ray,
                "start",
                "--head",
                "--node-ip-address",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--num-cpus",
                str(cpus),
                "--object-store-memory",
                str(object_store_bytes),
                "--include-dashboard",
                "false",
                "--disable-usage-stats",
                "--temp-dir",
                self.temp,
            ],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"ray start failed: {proc.stdout[-2000:]}{proc.stderr[-2000:]}")

    def stop(self) -> None:
        """`ray stop` (every Ray process of this host), then wait until this cluster's are
        gone; its temp dir removed."""
        subprocess.run(
            [self.ray, "stop", "--force"], env=self.env, capture_output=True, timeout=120
        )
        deadline = time.time() + 30  # its processes are gone before the next test starts one
        while time.time() < deadline and _ray_processes(self.temp):
            time.sleep(0.5)
        shutil.rmtree(self.temp, ignore_errors=True)


def _ray_processes(marker: str) -> list[int]:
    """Processes whose command line names this cluster's temp dir."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found

"""A real local Ray cluster for the tests: `ray start --head` on 127.0.0.1 with 2 CPUs, from
this environment's `ray` command, stopped (and checked gone) at the end. Token auth is off for
this private loopback cluster (drivers get RAY_AUTH_MODE=disabled too)."""

from __future__ import annotations

import os
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


class RayCluster:
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
        subprocess.run(
            [self.ray, "stop", "--force"], env=self.env, capture_output=True, timeout=120
        )
        deadline = time.time() + 30  # its processes are gone before the next test starts one
        while time.time() < deadline and _ray_processes(self.temp):
            time.sleep(0.5)


def _ray_processes(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found

"""Stage progress on the terminal (rich) with the time each stage took."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console

console = Console(stderr=True, log_path=False)


class StageTimer:
    """`with timer.stage("validate"): ...` shows a spinner and records seconds per stage."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        if self.quiet:
            yield
        else:
            with console.status(f"[bold]{name}[/] ..."):
                yield
        took = time.perf_counter() - start
        self.seconds[name] = round(took, 3)
        if not self.quiet:
            console.log(f"{name} done in {took:.1f} s")

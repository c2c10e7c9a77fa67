"""Run a pipeline: stages in order, each skipped when its inputs did not change, resumed after a
failure, one run per pipeline at a time, recorded as an MLflow parent run with a child per stage.

State lives in ``<work_dir>/<name>/state.json``: per stage the fingerprint of its inputs (its
resolved config plus the fingerprints of the stages it reads, and for the ETL the size and
modification time of every input file) and what it produced. A stage whose fingerprint matches
its last success is skipped and its outputs reused, so a rerun with unchanged inputs skips
every stage, and a rerun after a failure starts at the failed stage.

Exit codes (``recfb pipeline run``): 0 done (the gate's verdict is in the log and in MLflow),
1 a stage failed (rerun to resume), 2 bad definition or input, 75 another run of the same
pipeline holds the lock (try later).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from recfb.errors import RecfbError
from recfb.io import write_json
from recfb.pipeline.context import Context
from recfb.pipeline.definition import PipelineSpec

log = logging.getLogger("recfb.pipeline")
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_BUSY = 0, 1, 2, 75


class PipelineBusy(RecfbError):
    """Another run of this pipeline holds its lock."""


class StageFailed(RecfbError):
    """A stage raised; the state keeps what succeeded before it."""


@contextmanager
def pipeline_lock(state_dir: Path) -> Iterator[None]:
    """An exclusive, non-blocking flock on <state_dir>/.lock (released if the process dies)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    handle = (state_dir / ".lock").open("w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        handle.close()
        raise PipelineBusy(
            f"pipeline {state_dir.name} is already running (lock {state_dir}/.lock)"
        ) from exc
    try:
        handle.write(str(os.getpid()))
        handle.flush()
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


@dataclass
class StageRecord:
    status: str  # ran | skipped | failed
    fingerprint: str
    outputs: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None


@dataclass
class PipelineResult:
    name: str
    parent_run_id: str
    stages: dict[str, StageRecord]
    report: Path | None = None

    @property
    def ok(self) -> bool:
        return all(r.status != "failed" for r in self.stages.values())


def _load_state(path: Path) -> dict[str, dict]:
    return json.loads(path.read_text()) if path.is_file() else {}


def run_pipeline(spec: PipelineSpec, definition_text: str = "") -> PipelineResult:
    """Run every stage of ``spec`` (see the module doc for skipping, resuming and locking)."""
    from mlflow import MlflowClient

    from recfb import tracking
    from recfb.pipeline import stages as stage_impl

    state_dir = spec.state_dir()
    with pipeline_lock(state_dir):
        tracking.configure()
        client = MlflowClient()
        tracking.set_experiment(spec.experiment)  # created as a model-training experiment
        exp_id = client.get_experiment_by_name(spec.experiment).experiment_id
        started = datetime.now(UTC)
        tags = {"recfb.pipeline": spec.name}
        commit = tracking.git_commit()
        if commit:
            tags["git_commit"] = commit
        parent = client.create_run(
            exp_id, run_name=f"{spec.name} {started:%Y-%m-%d %H:%M}", tags=tags
        ).info.run_id
        if definition_text:
            client.log_text(parent, definition_text, "pipeline.yaml")
        ctx = Context(spec, client, exp_id, parent)
        state_path = state_dir / "state.json"
        state = _load_state(state_path)
        ctx.state = state
        records: dict[str, StageRecord] = {}
        failed = False
        for name, stage_spec in spec.ordered():
            fn = getattr(stage_impl, f"stage_{name}")
            fp = stage_impl.stage_fingerprint(name, stage_spec, ctx)
            ctx.fingerprints[name] = fp
            prev = state.get(name)
            if prev and prev.get("status") in ("ran", "skipped") and prev.get("fingerprint") == fp:
                records[name] = StageRecord("skipped", fp, prev.get("outputs", {}))
                ctx.outputs[name] = records[name].outputs
                run_id = ctx.child_run(name, {"recfb.status": "skipped"})
                client.set_terminated(run_id)
                log.info("stage %s: skipped (inputs unchanged, %s)", name, fp)
                state[name] = {**prev, "status": "skipped"}
                continue
            t0 = time.perf_counter()
            log.info("stage %s: running (%s)", name, fp)
            try:
                outputs = fn(stage_spec, ctx)
            except Exception as exc:  # recorded, then the pipeline stops here
                seconds = time.perf_counter() - t0
                err = f"{type(exc).__name__}: {exc}"
                records[name] = StageRecord("failed", fp, {}, seconds, err)
                state[name] = {"status": "failed", "fingerprint": fp, "error": err}
                write_json(state_path, state)
                run_id = ctx.child_run(name, {"recfb.status": "failed"})
                client.log_text(run_id, traceback.format_exc(), "error.txt")
                client.set_terminated(run_id, "FAILED")
                log.error("stage %s: failed after %.1f s: %s", name, seconds, err)
                failed = True
                failure = StageFailed(f"stage {name} failed: {err} (rerun to resume there)")
                break
            seconds = time.perf_counter() - t0
            records[name] = StageRecord("ran", fp, outputs, seconds)
            ctx.outputs[name] = outputs
            state[name] = {
                "status": "ran",
                "fingerprint": fp,
                "outputs": outputs,
                "seconds": seconds,
                "finished_at": datetime.now(UTC).isoformat(),
            }
            write_json(state_path, state)
            log.info("stage %s: ran in %.1f s", name, seconds)
        for name, rec in records.items():
            client.log_metric(parent, f"stage_seconds/{name}", rec.seconds)
        write_json(state_path, state)
        result = PipelineResult(spec.name, parent, records)
        if not failed:
            result.report = stage_impl.write_report(ctx, records)
        client.set_terminated(parent, "FAILED" if failed else "FINISHED")
        if failed:
            raise failure
        return result

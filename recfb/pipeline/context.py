"""What a pipeline's stages share with its runner: the run context and input fingerprints.

Apart from the runner so that the stages (which the runner loads) import only this, never the
runner itself.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from recfb.pipeline.definition import PipelineSpec


def fingerprint(*parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def files_fingerprint(paths: list[str]) -> list[tuple[str, int, int]]:
    """(path, size, mtime_ns) of every input file, directories walked; (URI, events, last
    seq) of a PostgreSQL event log; (URI, size, ETag) of an object in a store."""
    from recfb import pglog
    from recfb.etl.objectstore import ObjectFile
    from recfb.etl.readers import DatabaseLog, resolve_paths

    out: list = []
    for p in resolve_paths(paths):
        if isinstance(p, DatabaseLog):  # a log on a server: (URI, events, last seq)
            out.append(pglog.log_fingerprint(p.uri))
            continue
        if isinstance(p, ObjectFile):
            out.append(p.fingerprint())
            continue
        st = p.stat()
        out.append((str(p), st.st_size, st.st_mtime_ns))
    return sorted(out)


class Context:
    """What stages share: the spec, the MLflow client and parent run, outputs so far."""

    def __init__(self, spec: PipelineSpec, client: Any, experiment_id: str, parent: str) -> None:
        self.spec, self.client, self.experiment_id, self.parent = (
            spec,
            client,
            experiment_id,
            parent,
        )
        self.outputs: dict[str, dict[str, Any]] = {}
        self.state: dict[str, dict] = {}  # the last runs' records (state.json)
        self.fingerprints: dict[str, str] = {}
        self.dir = spec.state_dir()

    def child_run(self, stage: str, tags: dict[str, str] | None = None) -> str:
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"{self.spec.name}:{stage}",
            tags={"mlflow.parentRunId": self.parent, "recfb.stage": stage, **(tags or {})},
        )
        if stage in self.fingerprints:
            self.client.log_param(run.info.run_id, "inputs_fingerprint", self.fingerprints[stage])
        return run.info.run_id

    def adopt(self, run_id: str, stage: str) -> None:
        """Make a run a stage has started itself (train) a child of the pipeline run."""
        self.client.set_tag(run_id, "mlflow.parentRunId", self.parent)
        self.client.set_tag(run_id, "recfb.stage", stage)
        self.client.set_tag(run_id, "recfb.inputs_fingerprint", self.fingerprints.get(stage, ""))

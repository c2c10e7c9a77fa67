"""Scheduled offline pipelines: definitions, the runner (skip, resume, lock, MLflow parent and
child runs), the stages, and the promotion gate."""

from recfb.pipeline.definition import GateSpec, PipelineSpec, StageSpec, load_pipeline
from recfb.pipeline.runner import PipelineBusy, PipelineResult, StageFailed, run_pipeline

__all__ = [
    "GateSpec",
    "PipelineBusy",
    "PipelineResult",
    "PipelineSpec",
    "StageFailed",
    "StageSpec",
    "load_pipeline",
    "run_pipeline",
]

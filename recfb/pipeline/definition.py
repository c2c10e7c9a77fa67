"""A pipeline definition (`pipelines/<name>.yaml`): which stages run with which conf overrides.

The stage order is fixed (etl -> train -> rank -> evaluate -> index -> register -> promote); a
definition lists the stages it runs, each with a conf file and ``key=value`` overrides in the
CLI's ``--set`` syntax. See pipelines/nightly.yaml.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from recfb.config import build_model, read_yaml
from recfb.distributed.config import Engine, RayConfig

STAGES = ("etl", "train", "rank", "evaluate", "index", "register", "promote")
Stage = Literal["etl", "train", "rank", "evaluate", "index", "register", "promote"]


class StageSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    config: str | None = Field(None, description="conf file of the stage (etl, train, rank, index)")
    set: list[str] = Field(default_factory=list, description="overrides, `key=value`")
    init_from: Literal["production"] | None = Field(
        None, description="train: warm-start from the production model's vectors, by id"
    )


class GateSpec(BaseModel):
    """When a candidate may take the alias `production`."""

    model_config = ConfigDict(extra="forbid")

    k: int = Field(10, ge=1)
    split: str = Field("test", description="the recent holdout of the candidate's ETL output")
    primary: str = Field("ndcg", description="ndcg | recall (at k)")
    tolerance: float = Field(0.002, ge=0, description="how much worse than production is ok")
    negative_share_tolerance: float = Field(
        0.0, ge=0, description="how much more disliked/refunded items in the lists is ok"
    )
    max_users: int | None = Field(
        20_000, ge=1, description="holdout users scored (the first by id); None: all of them"
    )
    engine: Engine = Field("local", description="local, or ray: the users scored as Ray tasks")
    ray: RayConfig = Field(default_factory=RayConfig, description="the cluster of engine: ray")


class PipelineSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    experiment: str = "recfb"
    registered_model: str = "recfb"
    work_dir: str = Field(
        "data/pipelines", description="stage outputs and state: <work_dir>/<name>"
    )
    stages: dict[Stage, StageSpec]
    gate: GateSpec = Field(default_factory=GateSpec)

    def ordered(self) -> list[tuple[str, StageSpec]]:
        return [(s, self.stages[s]) for s in STAGES if s in self.stages]

    def state_dir(self) -> Path:
        return Path(self.work_dir) / self.name


def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> PipelineSpec:
    from recfb.config import apply_overrides

    return build_model(PipelineSpec, apply_overrides(read_yaml(path), overrides), str(path))

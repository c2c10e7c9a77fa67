"""Scale-out engine: the stages' work on a Ray cluster (`--engine ray --address ADDR`), behind
the same commands and the same outputs as the local engine, which stays the default.

What the stages share lives here: `config` (which engine, which cluster), `cluster.connect`
(joins or, without an address, starts a cluster and hands the workers the environment the
local code reads: registry, caches, bundle keys), `local.LocalCluster` (a private head node on
this host), and `recommend` (users scored on a pool of Ray actors). Each stage's own Ray path
sits in its package, beside the local code it reuses: `recfb.etl.on_ray`, `recfb.train.on_ray`,
the gate in `recfb.pipeline.gate`. The `ray` extra installs Ray.
"""

from recfb.distributed.config import Engine, RayConfig

__all__ = ["Engine", "RayConfig"]

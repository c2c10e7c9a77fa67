"""Scale-out engine: the stages' work on a Ray cluster (`--engine ray --address ADDR`), behind
the same commands and the same outputs as the local engine, which stays the default.

`cluster.connect` joins (or, without an address, starts) a cluster and hands the workers the
environment the local code reads (registry, caches, bundle keys); `recommend` scores users on
a pool of Ray actors, each holding one loaded model. The `ray` extra installs Ray.
"""

from recfb.distributed.config import Engine, RayConfig

__all__ = ["Engine", "RayConfig"]

"""Closed-loop evaluation: a served policy decides what simulated users see, their feedback
flows back through the service's event log and the retrains, and the simulator's truth
measures net purchases, refunds and popularity amplification day by day.

    from recfb.loop import load_loop_config, run_loop
    cfg = load_loop_config("conf/loop.yaml")
    result = run_loop(cfg, "mf", seed=1, work_dir="data/loop/mf-1")
    result.daily        # one row per simulated day

`recfb loop` runs several policies and seeds and writes the report (`recfb.loop.report`).
"""

from recfb.loop.config import LoopConfig, PolicySpec, load_loop_config
from recfb.loop.run import LoopResult, run_loop

__all__ = ["LoopConfig", "LoopResult", "PolicySpec", "load_loop_config", "run_loop"]

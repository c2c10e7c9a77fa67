"""ETL stage: raw multi-signal events -> ordinal, denoised, split training data.

`run(events, signal_map)` runs it in memory (a frame or paths in, `Interactions` out);
`run_etl(cfg)` is `recfb etl`: files in, an output directory out.
"""

from recfb.etl.config import EtlConfig, FilterConfig, InputConfig, SplitConfig
from recfb.etl.engine import run_etl
from recfb.etl.interactions import Interactions, as_interactions
from recfb.etl.pipeline import EtlResult, run
from recfb.etl.signals import SignalMap, load_signal_map

__all__ = [
    "EtlConfig",
    "EtlResult",
    "FilterConfig",
    "InputConfig",
    "Interactions",
    "SignalMap",
    "SplitConfig",
    "as_interactions",
    "load_signal_map",
    "run",
    "run_etl",
]

"""ETL stage: raw multi-signal events -> ordinal, denoised, split training data."""

from recfb.etl.config import EtlConfig, FilterConfig, InputConfig, SplitConfig
from recfb.etl.pipeline import EtlResult, run_etl
from recfb.etl.signals import SignalMap, load_signal_map

__all__ = [
    "EtlConfig",
    "EtlResult",
    "FilterConfig",
    "InputConfig",
    "SignalMap",
    "SplitConfig",
    "load_signal_map",
    "run_etl",
]

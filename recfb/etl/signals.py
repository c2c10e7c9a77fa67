"""The signal map now lives in `recfb.signals`; this module keeps the old imports working."""

from recfb.signals.map import (
    Attribution,
    Level,
    Signal,
    SignalMap,
    as_signal_map,
    exclusion_labels,
    load_signal_map,
)

__all__ = [
    "Attribution",
    "Level",
    "Signal",
    "SignalMap",
    "as_signal_map",
    "exclusion_labels",
    "load_signal_map",
]

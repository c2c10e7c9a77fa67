"""The signal map (what each raw event name means) and the fold of events into pair states:
one definition, read by the ETL, evaluation, the gate and the service."""

from recfb.signals.fold import PairState, SignalFold
from recfb.signals.map import (
    EXCLUSION_RULES,
    Attribution,
    Level,
    Signal,
    SignalMap,
    as_signal_map,
    exclusion_labels,
    load_signal_map,
    rule_labels,
)

__all__ = [
    "EXCLUSION_RULES",
    "Attribution",
    "Level",
    "PairState",
    "Signal",
    "SignalFold",
    "SignalMap",
    "as_signal_map",
    "exclusion_labels",
    "load_signal_map",
    "rule_labels",
]

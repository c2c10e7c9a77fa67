"""Delayed feedback: delay models of the click -> purchase -> refund cascade, rates corrected
for outcomes that have not arrived yet, and NetCVR training under delay.

Public surface: ``fit_delays`` (an ETL output -> ``DelayFits``), ``click_trials`` /
``purchase_trials`` (trials at a cut-off), ``item_rates`` (naive and corrected per-item
rates), ``emit`` (training samples per mode) and ``run_continuous`` (day-by-day replay) in
``recfb.delayed.cvr`` (it imports torch, so it is not re-exported here).
"""

from recfb.delayed.fit import DelayFits, fit_delays
from recfb.delayed.observations import click_trials, purchase_trials
from recfb.delayed.rates import item_rates
from recfb.delayed.stream import MODES, emit
from recfb.delayed.survival import DelayModel, SegmentedDelays

__all__ = [
    "MODES",
    "DelayFits",
    "DelayModel",
    "SegmentedDelays",
    "click_trials",
    "emit",
    "fit_delays",
    "item_rates",
    "purchase_trials",
]

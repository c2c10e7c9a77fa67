"""One user's events folded into per-item states, with the ETL's meaning, in plain Python.

The ETL folds millions of events with Polars (`recfb.etl.link` matches cancellations,
`recfb.etl.aggregate.aggregate_pairs` folds pairs); the service folds a few dozen logged
events per request. Both must give a pair the same state, so this fold follows the ETL rule
for rule (tests/test_signals.py checks it against the ETL on random histories):

- a row whose `value` is negative or not finite is dropped (the ETL quarantines it);
- repeats of (item, event, ts) are dropped, the first copy wins (the ETL's de-duplication);
- an event whose signal has `min_dwell_s` and whose value is below it is noise, dropped;
- cancellations of one target signal (refund -> purchase, unlike -> like) match targets of
  the same item: first those carrying an `order_id` to targets with that order id, then those
  without one to any target not claimed yet; each takes the latest unclaimed target at or
  before it (a target and its cancellation in the same millisecond pair up); a cancellation
  with nothing left to cancel is an orphan;
- level: the deepest level of the positive events not cancelled, raised to the fallback
  level of any cancellation of the item (matched or orphan);
- negative: the newest negative evidence (a negative event not cancelled, or a cancellation
  whose fallback is 'negative') is at least as new as the newest positive event not cancelled;
- label: -1 if negative else level; last_ts: the newest kept event of the item.

All cancellations count (the ETL's cut-off is after every event it folds).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from recfb.signals.map import SignalMap, as_signal_map


class PairState(NamedTuple):
    """What the fold knows about one item of one user."""

    level: int  # deepest active positive level, 0 = none
    negative: bool  # an explicit negative newer than (or as new as) every active positive
    label: int  # -1 if negative else level: the ETL's ordinal label
    last_ts: int  # newest kept event on the item, epoch ms


@dataclass(frozen=True, slots=True)
class _Rule:
    level: int
    negative: bool
    target: str | None  # the signal this one cancels
    fallback_level: int
    fallback_negative: bool
    min_dwell_s: float | None


class SignalFold:
    """A signal map compiled for folding: build once (per bundle), call per request."""

    def __init__(self, smap: SignalMap | dict | str | Path) -> None:
        smap = as_signal_map(smap)
        self.rules: dict[str, _Rule] = {}
        for name, sig in smap.signals.items():
            fb = sig.fallback
            self.rules[name] = _Rule(
                level=smap.level_index(sig.level) if sig.level else 0,
                negative=sig.negative,
                target=sig.cancels,
                fallback_level=smap.level_index(fb) if fb and fb != "negative" else 0,
                fallback_negative=fb == "negative",
                min_dwell_s=sig.min_dwell_s,
            )
        # target signal -> the signals that cancel it: they share one stack of targets
        self.cancellers: dict[str, frozenset[str]] = {}
        for name, rule in self.rules.items():
            if rule.target is not None:
                self.cancellers[rule.target] = self.cancellers.get(rule.target, frozenset()) | {
                    name
                }

    def keeps(self, event: str, value: float | None) -> bool:
        """The event is one the ETL folds: a known signal, a valid value, not dwell noise."""
        rule = self.rules.get(event)
        if rule is None:
            return False
        if value is None:
            return True
        if not (math.isfinite(value) and value >= 0):
            return False
        return rule.min_dwell_s is None or value >= rule.min_dwell_s

    def fold(
        self, events: Iterable[tuple[Hashable, str, int, float | None, str | None]]
    ) -> dict[Hashable, PairState]:
        """Per item, the state of one user's events `(item, event, ts_ms, value, order_id)`
        (any order; on equal (item, event, ts) the first one given wins)."""
        seen: set[tuple] = set()
        by_item: dict[Hashable, list[tuple[int, str, str | None]]] = {}
        for item, event, ts, value, order_id in events:
            rule = self.rules.get(event)
            if rule is None or (value is not None and not (math.isfinite(value) and value >= 0)):
                continue
            key = (item, event, ts)
            if key in seen:
                continue
            seen.add(key)
            if rule.min_dwell_s is not None and value is not None and value < rule.min_dwell_s:
                continue
            by_item.setdefault(item, []).append((ts, event, order_id))
        return {item: self._fold_item(evs) for item, evs in by_item.items()}

    def _fold_item(self, evs: list[tuple[int, str, str | None]]) -> PairState:
        rules = self.rules
        cancelled: set[int] = set()  # positions in evs of the targets that were cancelled
        if self.cancellers:
            present = {event for _, event, _ in evs}
            for target, names in self.cancellers.items():
                if target in present and not names.isdisjoint(present):
                    cancelled |= _match(evs, target, names)
        level = 0
        last_pos = last_neg = None
        last_ts = evs[0][0]
        for i, (ts, event, _) in enumerate(evs):
            rule = rules[event]
            last_ts = max(last_ts, ts)
            if rule.level and i not in cancelled:
                level = max(level, rule.level)
                last_pos = ts if last_pos is None else max(last_pos, ts)
            if (rule.negative and i not in cancelled) or rule.fallback_negative:
                last_neg = ts if last_neg is None else max(last_neg, ts)
            if rule.fallback_level:
                level = max(level, rule.fallback_level)
        negative = last_neg is not None and (last_pos is None or last_neg >= last_pos)
        return PairState(level, negative, -1 if negative else level, last_ts)


def _match(evs: list[tuple[int, str, str | None]], target: str, names: frozenset[str]) -> set[int]:
    """Positions of the `target` events that the events named `names` cancel (see the module
    docstring: order ids first, then the latest unclaimed target at or before)."""
    cancels = sorted((ts, i) for i, (ts, event, _) in enumerate(evs) if event in names)
    if not cancels:
        return set()
    targets = sorted((ts, i) for i, (ts, event, _) in enumerate(evs) if event == target)
    claimed: set[int] = set()
    for with_order in (True, False):
        for c_ts, c in cancels:
            order = evs[c][2]
            if (order is not None) != with_order:
                continue
            best = None
            for t_ts, t in targets:  # ascending: the last fitting one is the latest
                if t_ts > c_ts:
                    break
                if t not in claimed and (order is None or evs[t][2] == order):
                    best = t
            if best is not None:
                claimed.add(best)
    return claimed

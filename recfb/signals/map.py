"""The signal map: what every raw event name means.

A deployment (or dataset) names its ordered positive levels, maps each raw event name to a
level, an explicit negative, a cancellation of another event (refund cancels purchase,
unlike cancels like), or an exposure-only event that carries no preference. The ETL never
guesses: an event name that is not in the map is quarantined (or an error, by config).

This module is the one definition of the map; the ETL, evaluation and the service read it
from here (`recfb.etl.signals` re-exports it for older imports).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from recfb.config import build_model, read_yaml
from recfb.errors import ConfigError

_NAME = re.compile(r"^[A-Za-z0-9_]+$")


class Level(BaseModel):
    """One positive level; levels are listed shallow -> deep and numbered 1..T."""

    model_config = ConfigDict(extra="forbid")
    name: str
    weight: float = Field(1.0, gt=0, description="sample weight of a pair at this level")
    repeats: bool | None = Field(
        None,
        description="a pair at this level may be recommended again (re-buying groceries); "
        "default: every level but the deepest repeats, so what was bought (and not refunded) "
        "is hidden and what was only viewed, clicked, carted or liked is kept",
    )


class Signal(BaseModel):
    """Meaning of one raw event name. Exactly one of level / negative / cancels / exposure."""

    model_config = ConfigDict(extra="forbid")
    level: str | None = None
    negative: bool = False
    cancels: str | None = Field(None, description="raw event name this event cancels")
    fallback: str | None = Field(
        None,
        description="for a cancellation: 'negative' (the pair becomes an explicit negative) or "
        "a level name the pair falls back to; null = the cancelled event simply stops counting",
    )
    exposure: bool = Field(False, description="an impression: kept in sequences, no label")
    min_dwell_s: float | None = Field(
        None, ge=0, description="an event whose value (dwell seconds) is below this is noise"
    )

    @model_validator(mode="after")
    def _one_meaning(self) -> Signal:
        meanings = [self.level is not None, self.negative, self.cancels is not None, self.exposure]
        if sum(meanings) != 1:
            raise ValueError("set exactly one of: level, negative: true, cancels, exposure: true")
        if self.fallback is not None and self.cancels is None:
            raise ValueError("'fallback' only applies to a signal that 'cancels' another")
        return self


class Attribution(BaseModel):
    """Windows that decide when a label has matured (no more feedback is expected)."""

    model_config = ConfigDict(extra="forbid")
    clock_signals: list[str] = Field(
        default_factory=list,
        description="signals that start the conversion clock (click->purchase delay)",
    )
    click_to_purchase_hours: float = Field(0.0, ge=0)
    purchase_to_refund_hours: float = Field(0.0, ge=0)


class SignalMap(BaseModel):
    """A complete signal map. Load it with `load_signal_map(path)`."""

    model_config = ConfigDict(extra="forbid")
    name: str
    levels: list[Level] = Field(min_length=1)
    signals: dict[str, Signal] = Field(min_length=1)
    attribution: Attribution = Field(default_factory=Attribution)
    unknown_events: Literal["quarantine", "error"] = "quarantine"
    negative_weight: float = Field(1.0, gt=0, description="sample weight of explicit negatives")
    immature_weight: float = Field(
        1.0, ge=0, le=1, description="multiplier on the weight of pairs whose label may change"
    )

    @model_validator(mode="after")
    def _consistent(self) -> SignalMap:
        level_names = [lv.name for lv in self.levels]
        if len(set(level_names)) != len(level_names):
            raise ValueError(f"levels: names must be unique, got {level_names}")
        for name, sig in self.signals.items():
            if not _NAME.match(name):
                raise ValueError(f"signals.{name}: names may use letters, digits and '_' only")
            if sig.level is not None and sig.level not in level_names:
                raise ValueError(f"signals.{name}.level: '{sig.level}' is not one of {level_names}")
            if sig.cancels is not None:
                target = self.signals.get(sig.cancels)
                if target is None:
                    raise ValueError(f"signals.{name}.cancels: '{sig.cancels}' is not a signal")
                if target.cancels is not None:
                    raise ValueError(f"signals.{name}.cancels: cannot cancel a cancellation")
            if sig.fallback not in (None, "negative") and sig.fallback not in level_names:
                raise ValueError(
                    f"signals.{name}.fallback: expected 'negative' or one of {level_names}"
                )
        for name in self.attribution.clock_signals:
            if name not in self.signals:
                raise ValueError(f"attribution.clock_signals: '{name}' is not a signal")
        return self

    # --- derived views used by the ETL and the online fold -------------------------------
    @property
    def n_levels(self) -> int:
        return len(self.levels)

    def level_index(self, name: str) -> int:
        """1-based index of a level (0 means no positive level)."""
        return [lv.name for lv in self.levels].index(name) + 1

    @property
    def purchase_signals(self) -> list[str]:
        """Signals at the deepest level: their cancellations are refunds."""
        deepest = self.levels[-1].name
        return [n for n, s in self.signals.items() if s.level == deepest]

    def hidden_labels(self) -> tuple[int, ...]:
        """Pair labels that are never recommended to their user again: explicit negatives
        (-1) and the levels that do not repeat (see `exclusion_labels`)."""
        return exclusion_labels(self.model_dump(mode="json"))

    def signal_table(self) -> dict[str, list]:
        """Columns of a lookup table: one row per raw event name with its meaning as ints."""
        rows: dict[str, list] = {
            "event": [],
            "code": [],
            "level": [],
            "is_negative": [],
            "is_exposure": [],
            "cancels": [],
            "fallback_level": [],
            "fallback_negative": [],
            "min_dwell_s": [],
            "is_clock": [],
            "is_purchase": [],
            "is_refund": [],
            "is_cancel": [],
        }
        purchases = set(self.purchase_signals)
        for code, (name, sig) in enumerate(self.signals.items()):
            rows["event"].append(name)
            rows["code"].append(code)
            rows["level"].append(self.level_index(sig.level) if sig.level else 0)
            rows["is_negative"].append(sig.negative)
            rows["is_exposure"].append(sig.exposure)
            rows["cancels"].append(sig.cancels)
            fb = sig.fallback
            rows["fallback_level"].append(self.level_index(fb) if fb and fb != "negative" else 0)
            rows["fallback_negative"].append(fb == "negative")
            rows["min_dwell_s"].append(sig.min_dwell_s)
            rows["is_clock"].append(name in self.attribution.clock_signals)
            rows["is_purchase"].append(name in purchases)
            rows["is_refund"].append(sig.cancels in purchases)
            rows["is_cancel"].append(sig.cancels is not None)
        return rows


def exclusion_labels(spec: dict) -> tuple[int, ...]:
    """The one exclusion rule (evaluation, the gate and serving), from a signal map as a dict
    (the ETL's resolved `signal_map_spec`, a bundle's `signals.json`): the pair labels whose
    items are hidden from their user. -1 (an explicit negative, a refund that falls back to
    negative) always; a level when it does not repeat; by default only the deepest level
    (bought and not refunded) does not. A refund that falls back to a shallower level lifts
    the pair out of the deepest level, so a refunded item may be shown again."""
    levels = spec["levels"]
    deepest = len(levels)
    hidden = [-1]
    for t, level in enumerate(levels, start=1):
        repeats = level.get("repeats")
        if repeats is None:
            repeats = t < deepest
        if not repeats:
            hidden.append(t)
    return tuple(hidden)


EXCLUSION_RULES = ("signals", "purchased", "any", "none")


def rule_labels(spec: dict, rule: str) -> tuple[int, ...]:
    """The pair labels an exclusion rule hides from their user: `signals` (the map's own
    rule, `exclusion_labels`), `purchased` (the deepest level), `any` (every level), `none`
    (no level); explicit negatives (-1) under every rule. The service's `serve.exclude` and
    the library's `recommend(exclude=...)` both read it."""
    deepest = len(spec["levels"])
    if rule == "signals":
        return exclusion_labels(spec)
    levels = {"purchased": (deepest,), "any": tuple(range(1, deepest + 1)), "none": ()}
    if rule not in levels:
        raise ValueError(f"exclusion rule {rule!r}: one of {EXCLUSION_RULES}")
    return (-1, *levels[rule])


def load_signal_map(path: str | Path) -> SignalMap:
    """Read and validate a signal map YAML; errors name the file and the field."""
    return build_model(SignalMap, read_yaml(path), str(path))


def as_signal_map(obj: SignalMap | dict | str | Path, source: str | None = None) -> SignalMap:
    """A validated SignalMap from a SignalMap, a dict (a bundle's `signals.json`, the ETL's
    `signal_map_spec`) or a YAML path, so every caller resolves a map the same way; errors
    name `source` (default: the path, or 'signal map') and the field."""
    if isinstance(obj, SignalMap):
        return obj
    if isinstance(obj, str | Path):
        return load_signal_map(obj)
    if isinstance(obj, dict):
        return build_model(SignalMap, obj, source or "signal map")
    raise ConfigError(
        f"{source or 'signal map'}: expected a SignalMap, a dict or a YAML path, "
        f"got {type(obj).__name__}"
    )

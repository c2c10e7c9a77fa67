"""Fit the cascade's delay models (click -> purchase, purchase -> refund) from an ETL output.

``fit_delays(etl)`` reads the ETL's events and the signal map it recorded in its stats (``etl``
is an output directory or an in-memory ``Interactions``), builds the trials at the cut-off
(default: the end of the log) and fits a censored cure model per stage, globally and per item
segment (default: ``category`` when the ETL carries it). The result is JSON-serialisable
(``delays.json`` in a bundle).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from recfb.delayed.observations import click_links, purchase_trials
from recfb.delayed.survival import FAMILIES, Family, SegmentedDelays, fit_best, fit_segments
from recfb.errors import InputError
from recfb.etl.interactions import Interactions, as_interactions, source_label
from recfb.etl.signals import SignalMap


@dataclass(frozen=True)
class CascadeSignals:
    """Which raw events start the clock, convert and refund (from the ETL's signal map)."""

    clock: list[str]
    purchase: list[str]
    refund: dict[str, str]  # refund event -> the purchase event it cancels

    @classmethod
    def from_spec(cls, spec: dict) -> CascadeSignals:
        smap = SignalMap.model_validate(spec)
        purchases = list(smap.purchase_signals)
        refunds = {n: s.cancels for n, s in smap.signals.items() if s.cancels in purchases}
        return cls(clock=list(smap.attribution.clock_signals), purchase=purchases, refund=refunds)


@dataclass
class DelayFits:
    """Delay models of both stages (refund is None where the log has no refunds)."""

    conversion: SegmentedDelays
    refund: SegmentedDelays | None
    cutoff_ms: int
    segment: str | None
    # the trials the fits saw ("conversion", "refund"), for plots; not serialised
    trials: dict[str, pl.DataFrame] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        return {
            "cutoff_ms": self.cutoff_ms,
            "segment": self.segment,
            "conversion": self.conversion.to_dict(),
            "refund": self.refund.to_dict() if self.refund else None,
        }

    @classmethod
    def from_dict(cls, d: dict) -> DelayFits:
        return cls(
            conversion=SegmentedDelays.from_dict(d["conversion"]),
            refund=SegmentedDelays.from_dict(d["refund"]) if d.get("refund") else None,
            cutoff_ms=int(d["cutoff_ms"]),
            segment=d.get("segment"),
        )


def load_cascade(etl: str | Path | Interactions) -> tuple[pl.LazyFrame, CascadeSignals]:
    """The ETL's events (lazy) and the cascade signals of its signal map."""
    data = as_interactions(etl)
    where = source_label(data)
    if "signal_map_spec" not in data.stats:
        raise InputError("field 'signal_map_spec' missing; rerun `recfb etl`", file=where)
    signals = CascadeSignals.from_spec(data.stats["signal_map_spec"])
    if not signals.clock or not signals.purchase:
        raise InputError(
            "the signal map names no clock signal (attribution.clock_signals) or no purchase "
            "level: there is no conversion to model",
            file=where,
            field="signal_map_spec",
        )
    return data.events, signals


def item_segments(events: pl.LazyFrame, column: str, n_items: int) -> np.ndarray:
    """Each item's segment value (its first non-null), -1 where unknown."""
    seg = (
        events.select("item_idx", column)
        .drop_nulls(column)
        .group_by("item_idx")
        .agg(pl.col(column).first())
        .collect()
    )
    out = np.full(n_items, -1, dtype=np.int64)
    out[seg["item_idx"].to_numpy()] = seg[column].cast(pl.Int64, strict=False).fill_null(-1)
    return out


def _stage_fit(
    delays: np.ndarray,
    w_delay: np.ndarray,
    delay_items: np.ndarray,
    trials: pl.DataFrame,
    seg_of: np.ndarray | None,
    families: tuple[Family, ...],
    min_events: int,
    shrink_events: float,
) -> SegmentedDelays:
    """Global best-family fit plus shrunk per-segment fits of one stage."""
    open_w = 1.0 - trials["outcome"].to_numpy()
    keep = open_w > 0
    ages, w_age = trials["age_s"].to_numpy()[keep], open_w[keep]
    best, fits = fit_best(delays, ages, families, w_delay, w_age)
    out = SegmentedDelays(overall=best, candidates=fits)
    if seg_of is not None:
        age_items = trials["item_idx"].to_numpy().astype(np.int64)[keep]
        out.segments = fit_segments(
            best,
            delays,
            ages,
            seg_of[delay_items],
            seg_of[age_items],
            w_delay,
            w_age,
            min_events,
            shrink_events,
        )
    return out


def fit_delays(
    etl: str | Path | Interactions,
    cutoff_ms: int | None = None,
    segment: str | None = "category",
    min_events: int = 30,
    shrink_events: float = 200.0,
    families: tuple[Family, ...] = FAMILIES,
    attribution_rounds: int = 3,
) -> DelayFits:
    """Fit both stages at ``cutoff_ms`` (default: one millisecond after the last event).

    Conversion alternates fit and attribution: purchases go to clicks by the stack rule first,
    then ``attribution_rounds`` times to their candidate clicks in proportion to the fitted
    delay density, refitting after each (an EM over the unlogged click a purchase came from).
    ``etl`` is an ETL output directory or an ``Interactions``."""
    data = as_interactions(etl)
    events, signals = load_cascade(data)
    if cutoff_ms is None:
        last = events.select(pl.col("ts").max().cast(pl.Datetime("ms")).dt.epoch("ms")).collect()
        cutoff_ms = int(last.item()) + 1
    if segment is not None and segment not in events.collect_schema():
        segment = None
    n_items = data.n_items
    seg_of = item_segments(events, segment, n_items) if segment else None

    links = click_links(events, signals.clock, signals.purchase, cutoff_ms)
    click_item = links.clicks["item_idx"].to_numpy().astype(np.int64)
    n_bought = links.links["buy"].n_unique()
    if n_bought < 2:
        raise InputError(
            f"only {n_bought} purchases follow a clock event ({signals.clock}) before the "
            "cut-off: too few to fit a delay model",
            file=source_label(data),
        )
    model, conversion, clicks = None, None, None
    for round_ in range(1 + attribution_rounds):
        weighted = links.weighted(model)
        clicks = links.trials_of(weighted)
        weighted = weighted.filter(pl.col("weight") > 0)
        last = round_ == attribution_rounds
        conversion = _stage_fit(
            weighted["delay_s"].to_numpy(),
            weighted["weight"].to_numpy(),
            click_item[weighted["row"].to_numpy()],
            clicks,
            seg_of if last else None,  # only the global fit feeds the next attribution
            families,
            min_events,
            shrink_events,
        )
        model = conversion.overall
    trials = {"conversion": clicks}
    refund = None
    if signals.refund:
        buys = purchase_trials(events, signals.purchase, cutoff_ms)
        hit = buys["outcome"].to_numpy() > 0
        if hit.sum() >= 2:
            refund = _stage_fit(
                buys["delay_s"].to_numpy()[hit],
                np.ones(int(hit.sum())),
                buys["item_idx"].to_numpy().astype(np.int64)[hit],
                buys,
                seg_of,
                families,
                min_events,
                shrink_events,
            )
            trials["refund"] = buys
    return DelayFits(conversion, refund, cutoff_ms, segment, trials)


def recent_cascade_events(
    etl: str | Path | Interactions, cutoff_ms: int, horizon_days: float
) -> pl.DataFrame:
    """The clock, purchase and refunded-purchase events of the last ``horizon_days`` before the
    cut-off (``user_idx, item_idx, event, ts, cancelled_at``): the history the service's online
    rates start from."""
    events, signals = load_cascade(etl)
    since = cutoff_ms - int(horizon_days * 86_400_000)
    return (
        events.filter(
            pl.col("event").cast(pl.String).is_in(signals.clock + signals.purchase)
            & (pl.col("ts").cast(pl.Datetime("ms")).dt.epoch("ms") >= since)
            & (pl.col("ts").cast(pl.Datetime("ms")).dt.epoch("ms") < cutoff_ms)
        )
        .select(
            "user_idx",
            "item_idx",
            pl.col("event").cast(pl.String),
            pl.col("ts").cast(pl.Datetime("ms")),
            pl.col("cancelled_at").cast(pl.Datetime("ms")),
        )
        .sort("ts")
        .collect()
    )

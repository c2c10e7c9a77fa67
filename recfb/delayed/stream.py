"""Training samples emitted from the event stream the way delayed-feedback methods see it.

Every sample carries its emission time, so training can be replayed day by day:

* ``naive``  - wait ``wait`` after each click, label what arrived by then (late purchases are
  never seen: every delayed positive stays a fake negative). The lower bound.
* ``fnw``    - every click is emitted at once as a negative; a purchase re-emits the click as a
  positive when it arrives (Ktena et al. 2019, fake negative weighted).
* ``esdfm``  - wait ``wait``; a purchase inside the window is an immediate positive, otherwise
  the click goes out as a (possibly fake) negative and a later purchase re-emits it as a late
  positive (Yang et al. 2021, elapsed-time sampling).
* ``wait``   - each click emitted once it has matured (``mature`` after it) with the label
  known by then: correct labels, but the newest week of data is always missing.
* ``oracle`` - each click emitted at once with its eventual label; it knows the future, so it
  is the upper bound.

Trials may carry ``cancel_ms`` (e.g. the refund of a purchase, for a direct NetCVR label): an
outcome cancelled before the label is read counts as no outcome.

The refund stage uses the same emission over purchases (trials) and refunds (outcomes).
"""

from __future__ import annotations

from typing import Literal

import polars as pl

from recfb.delayed.observations import click_links

Mode = Literal["naive", "fnw", "esdfm", "wait", "oracle"]
MODES: tuple[Mode, ...] = ("naive", "fnw", "esdfm", "wait", "oracle")
PAIR = ["user_idx", "item_idx"]


def click_outcomes(
    events: pl.LazyFrame | pl.DataFrame,
    clock_events: list[str],
    purchase_events: list[str],
    end_ms: int,
) -> pl.DataFrame:
    """One row per click before ``end_ms``: ``user_idx, item_idx, trial_ms, outcome_ms``
    (the purchase the one-to-one stack gives it, null if none) and, for that purchase,
    ``next_ms`` (its refund time, null if none before end_ms)."""
    links = click_links(events, clock_events, purchase_events, end_ms)
    stack = links.links.filter(pl.col("stack"))
    buys = (
        events.lazy()
        .filter(pl.col("event").cast(pl.String).is_in(purchase_events))
        .select(
            *PAIR,
            pl.col("ts").cast(pl.Datetime("ms")).dt.epoch("ms").alias("buy_ms"),
            pl.col("cancelled_at").cast(pl.Datetime("ms")).dt.epoch("ms").alias("refund_ms"),
        )
        .filter(pl.col("buy_ms") < end_ms)
        .unique(subset=[*PAIR, "buy_ms"], keep="first")
        .collect()
    )
    out = links.clicks.join(stack.select("row", "delay_s"), on="row", how="left").with_columns(
        (pl.col("ts_ms") + (pl.col("delay_s") * 1000).round().cast(pl.Int64)).alias("buy_ms")
    )
    out = out.join(buys, on=[*PAIR, "buy_ms"], how="left").select(
        *PAIR,
        pl.col("ts_ms").alias("trial_ms"),
        pl.col("buy_ms").alias("outcome_ms"),
        pl.when(pl.col("refund_ms") < end_ms).then(pl.col("refund_ms")).alias("next_ms"),
    )
    return out.sort("trial_ms")


def emit(
    trials: pl.DataFrame, mode: Mode, wait_ms: int, end_ms: int, mature_ms: int = 0
) -> pl.DataFrame:
    """Samples of one stage: the trial's columns plus ``emit_ms``, ``label`` (0/1), ``kind``
    (``positive`` inside the window, ``negative`` at the window's end, ``late`` re-emitted
    positive, ``matured`` for wait and oracle) and ``delay_s`` where the outcome is known at
    emission. ``trials`` need ``trial_ms`` and ``outcome_ms`` (null: no outcome before end_ms)."""
    if mode not in MODES:
        raise ValueError(f"delayed-feedback mode {mode!r}: expected one of {MODES}")
    t, o = pl.col("trial_ms"), pl.col("outcome_ms")
    if "cancel_ms" in trials.columns:  # an outcome cancelled by then is no outcome
        c = pl.col("cancel_ms")
        trials = trials.with_columns(
            pl.when(c.is_not_null() & (c <= t + (mature_ms if mode == "wait" else 10**15)))
            .then(None)
            .otherwise(o)
            .alias("outcome_ms")
        )
    if mode in ("oracle", "wait"):
        at = t if mode == "oracle" else t + mature_ms
        seen = o.is_not_null() if mode == "oracle" else o.is_not_null() & (o <= at)
        return trials.with_columns(
            at.alias("emit_ms"),
            seen.cast(pl.Int8).alias("label"),
            pl.lit("matured").alias("kind"),
            pl.when(seen).then((o - t) / 1000.0).alias("delay_s"),
        ).filter(pl.col("emit_ms") < end_ms)
    wait = 0 if mode == "fnw" else wait_ms
    inside = o.is_not_null() & (o - t <= wait)
    first = trials.with_columns(
        pl.when(inside).then(o).otherwise(t + wait).alias("emit_ms"),
        inside.cast(pl.Int8).alias("label"),
        pl.when(inside).then(pl.lit("positive")).otherwise(pl.lit("negative")).alias("kind"),
        pl.when(inside).then((o - t) / 1000.0).alias("delay_s"),
    )
    parts = [first]
    if mode != "naive":  # late positives come back when they arrive
        late = trials.filter(o.is_not_null() & (o - t > wait)).with_columns(
            o.alias("emit_ms"),
            pl.lit(1, pl.Int8).alias("label"),
            pl.lit("late").alias("kind"),
            ((o - t) / 1000.0).alias("delay_s"),
        )
        parts.append(late)
    return pl.concat(parts).filter(pl.col("emit_ms") < end_ms).sort("emit_ms")


def refund_trials(clicks: pl.DataFrame) -> pl.DataFrame:
    """The refund stage's trials: purchases (``trial_ms`` = purchase time, ``outcome_ms`` =
    refund time) with the click -> purchase delay they already know."""
    return clicks.filter(pl.col("outcome_ms").is_not_null()).select(
        *PAIR,
        ((pl.col("outcome_ms") - pl.col("trial_ms")) / 1000.0).alias("buy_delay_s"),
        pl.col("outcome_ms").alias("trial_ms"),
        pl.col("next_ms").alias("outcome_ms"),
    )

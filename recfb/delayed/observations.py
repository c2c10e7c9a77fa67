"""Trials and their (possibly pending) outcomes at a cut-off time, from the ETL's event table.

Two stages of the cascade, one shape: a *trial* (a click, or a purchase) either saw its outcome
(a purchase attributed to that click, or the refund of that purchase) before the cut-off, with a
delay, or has an age (cut-off minus trial time) and may still see it. Which click a purchase
came from is not logged when a user clicked the item several times before buying (on the
simulator, purchased pairs have ~3 clicks). Attribution is therefore soft: a purchase is shared
among the clicks of its pair at or before it in proportion to the delay density ``f(d)`` of
each candidate delay (the posterior under the delay model), or, before a delay model exists,
given to the latest click no earlier purchase took (a stack). "Latest click wins, one purchase
per click" would lose 12% of the simulator's conversions; the stack keeps them but shortens some
delays and lengthens others, which biases the delay fit (see ``fit.py``: fits alternate with
re-attribution).

Input columns (the ETL's ``events.parquet``; the service builds the same from its log):
``user_idx, item_idx, event, ts`` (datetime[ms]) and ``cancelled_at`` (the refund's time).
Output columns: ``user_idx, item_idx, ts_ms, outcome, delay_s, age_s``: ``outcome`` is the
share of an outcome attributed to the trial (0..1; refunds are linked one to one, so 0 or 1),
``delay_s`` its (most likely) delay, null without one, ``age_s`` the time to the cut-off.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import polars as pl

from recfb.delayed.survival import DelayModel
from recfb.etl.link import bracket_match

PAIR = ["user_idx", "item_idx"]
TRIAL_COLUMNS = ["user_idx", "item_idx", "ts_ms", "outcome", "delay_s", "age_s"]


def _ms(col: str) -> pl.Expr:
    return pl.col(col).cast(pl.Datetime("ms")).dt.epoch("ms")


def _window(
    frame: pl.LazyFrame, cutoff_ms: int, since_ms: int | None, before_ms: int | None
) -> pl.LazyFrame:
    keep = pl.col("ts_ms") < min(cutoff_ms, before_ms if before_ms is not None else cutoff_ms)
    if since_ms is not None:
        keep = keep & (pl.col("ts_ms") >= since_ms)
    return frame.filter(keep)


def _finish(trials: pl.LazyFrame, cutoff_ms: int) -> pl.DataFrame:
    return trials.select(
        "user_idx",
        "item_idx",
        "ts_ms",
        pl.col("outcome").cast(pl.Float64),
        "delay_s",
        ((cutoff_ms - pl.col("ts_ms")) / 1000.0).alias("age_s"),
    ).collect()


@dataclass(frozen=True)
class ClickLinks:
    """Clicks before the cut-off (``row, user_idx, item_idx, ts_ms``) and, per purchase
    (``buy``), its candidate clicks: the latest ``max_candidates`` of its pair at or before it
    (``row, delay_s``, ``stack``: the one-to-one stack match)."""

    clicks: pl.DataFrame
    links: pl.DataFrame
    cutoff_ms: int

    def weighted(self, delay: DelayModel | None) -> pl.DataFrame:
        """Links with ``weight``: the stack match (delay None) or each candidate's posterior
        share ``f(d_j) / sum_k f(d_k)`` under the delay model (summing to 1 per purchase)."""
        if delay is None or self.links.height == 0:
            return self.links.with_columns(pl.col("stack").cast(pl.Float64).alias("weight"))
        logf = delay.logpdf(self.links["delay_s"].to_numpy())
        return (
            self.links.with_columns(pl.Series("logf", logf))
            .with_columns((pl.col("logf") - pl.col("logf").max().over("buy")).exp().alias("w"))
            .with_columns((pl.col("w") / pl.col("w").sum().over("buy")).alias("weight"))
            .drop("logf", "w")
        )

    def trials(
        self,
        delay: DelayModel | None = None,
        since_ms: int | None = None,
        before_ms: int | None = None,
    ) -> pl.DataFrame:
        """Per click in [since, before): ``outcome`` = the share of a purchase attributed to it
        (0..1), ``delay_s`` = its most likely delay, ``age_s`` at the cut-off."""
        return self.trials_of(self.weighted(delay), since_ms, before_ms)

    def trials_of(
        self, weighted: pl.DataFrame, since_ms: int | None = None, before_ms: int | None = None
    ) -> pl.DataFrame:
        """``trials`` from links already weighted (``weighted``), so a caller that needs both
        computes the weights once."""
        links = weighted.filter(pl.col("weight") > 0)
        per_click = links.group_by("row").agg(
            pl.col("weight").sum().clip(upper_bound=1.0).alias("outcome"),
            pl.col("delay_s").sort_by("weight").last(),
        )
        trials = self.clicks.join(per_click, on="row", how="left").with_columns(
            pl.col("outcome").fill_null(0.0)
        )
        return _finish(_window(trials.lazy(), self.cutoff_ms, since_ms, before_ms), self.cutoff_ms)


def click_links(
    events: pl.LazyFrame | pl.DataFrame,
    clock_events: Iterable[str],
    purchase_events: Iterable[str],
    cutoff_ms: int,
    max_candidates: int = 10,
) -> ClickLinks:
    """Every purchase before the cut-off with the clicks of its pair that may have caused it."""
    lf = events.lazy().with_columns(_ms("ts").alias("ts_ms"), pl.col("event").cast(pl.String))
    lf = lf.filter(pl.col("ts_ms") < cutoff_ms)
    clicks = (
        lf.filter(pl.col("event").is_in(list(clock_events)))
        .select(*PAIR, "ts_ms")
        .collect()
        .with_row_index("row")
    )
    buys = (
        lf.filter(pl.col("event").is_in(list(purchase_events)))
        .select(*PAIR, "ts_ms")
        .collect()
        .with_row_index("buy")
    )
    stack = bracket_match(
        clicks.rename({"ts_ms": "ts"}), buys.rename({"buy": "row", "ts_ms": "ts"}), PAIR
    ).select(pl.col("cancel_row").alias("buy"), pl.col("target_row").alias("row"))
    links = (
        buys.join(clicks.rename({"ts_ms": "click_ms"}), on=PAIR, how="inner")
        .filter(pl.col("click_ms") <= pl.col("ts_ms"))
        .with_columns(((pl.col("ts_ms") - pl.col("click_ms")) / 1000.0).alias("delay_s"))
        .sort("buy", "delay_s")
        .group_by("buy", maintain_order=True)
        .head(max_candidates)
        .select("buy", "row", "delay_s")
        .join(stack.with_columns(pl.lit(True).alias("stack")), on=["buy", "row"], how="left")
        .with_columns(pl.col("stack").fill_null(False))
    )
    return ClickLinks(clicks, links, cutoff_ms)


def click_trials(
    events: pl.LazyFrame | pl.DataFrame,
    clock_events: Iterable[str],
    purchase_events: Iterable[str],
    cutoff_ms: int,
    since_ms: int | None = None,
    before_ms: int | None = None,
    delay: DelayModel | None = None,
) -> pl.DataFrame:
    """One row per clock event in [since, before) (``before`` defaults to the cut-off): how
    much of a purchase before the cut-off is attributed to it (``ClickLinks.trials``)."""
    links = click_links(events, clock_events, purchase_events, cutoff_ms)
    return links.trials(delay, since_ms, before_ms)


def purchase_trials(
    events: pl.LazyFrame | pl.DataFrame,
    purchase_events: Iterable[str],
    cutoff_ms: int,
    since_ms: int | None = None,
    before_ms: int | None = None,
) -> pl.DataFrame:
    """One row per purchase in [since, before): was it refunded before the cut-off?"""
    lf = events.lazy().with_columns(_ms("ts").alias("ts_ms"), pl.col("event").cast(pl.String))
    buys = lf.filter(pl.col("event").is_in(list(purchase_events))).with_columns(
        _ms("cancelled_at").alias("refund_ms")
    )
    buys = _window(buys, cutoff_ms, since_ms, before_ms).with_columns(
        pl.when(pl.col("refund_ms") < cutoff_ms)
        .then((pl.col("refund_ms") - pl.col("ts_ms")) / 1000.0)
        .alias("delay_s")
    )
    return _finish(buys.with_columns(pl.col("delay_s").is_not_null().alias("outcome")), cutoff_ms)

"""Online item rates (CVR, refund rate, NetCVR) corrected for feedback that has not arrived yet.

The bundle carries the fitted delay models and the recent clock/purchase events of the training
log; the service adds what its own event log received since. A refresh (at bundle load, then in
the background when the table is older than ``rates.refresh_s``) rebuilds the trials at "now"
with the same code the offline fits use (``recfb.delayed``): clicks of the last
``click_window_days``, purchases of the last ``purchase_window_days``, a refund in the log
cancelling the latest purchase of its (user, item) (or the one with its ``order_id``).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from recfb.delayed.fit import CascadeSignals, DelayFits
from recfb.delayed.observations import click_trials, purchase_trials
from recfb.delayed.rates import item_rates
from recfb.etl.link import link_cancellations
from recfb.serving.config import RatesConfig
from recfb.serving.eventlog import EventLog

log = logging.getLogger("recfb.serving")
DAY_MS = 86_400_000


@dataclass(frozen=True)
class RatesTable:
    """One refresh: per-item arrays (``item_rates`` columns) and when it was computed."""

    frame: pl.DataFrame
    as_of_ms: int  # the "now" the rates describe
    netcvr: np.ndarray  # corrected NetCVR by item row, for re-ranking
    computed_at: float = field(default_factory=time.time)  # wall clock, for staleness


class OnlineRates:
    """Per-item rates of one bundle, refreshed from the bundle history plus the event log."""

    def __init__(
        self,
        delays: dict,
        history: pl.DataFrame,
        signals: dict,
        item_row: dict[str, int],
        user_row: dict[str, int],
        item_segment: np.ndarray | None,
        cfg: RatesConfig,
    ) -> None:
        self.fits = DelayFits.from_dict(delays)
        self.cascade = CascadeSignals.from_spec(signals)
        self.cfg = cfg
        self.item_row, self.user_row = item_row, user_row
        self.n_items = len(item_row)
        self.segment = item_segment
        self.history = history.select(
            "user_idx",
            "item_idx",
            "event",
            pl.col("ts").dt.epoch("ms").alias("ts"),
            pl.col("cancelled_at").dt.epoch("ms").alias("cancelled_at"),
        ).with_columns(pl.col("user_idx").cast(pl.Int64), pl.col("item_idx").cast(pl.Int64))
        self.table: RatesTable | None = None
        self._lock = threading.Lock()

    def _log_frame(self, log_: EventLog, since_ms: int) -> pl.DataFrame:
        """The event log's cascade events since ``since_ms``, on the bundle's item rows; users
        the bundle does not know get rows past its last one."""
        names = self.cascade.clock + self.cascade.purchase + list(self.cascade.refund)
        rows = log_.events_since(names, since_ms)
        new_users: dict[str, int] = {}
        base = len(self.user_row)
        keep = []
        for user_id, item_id, event, ts, order_id in rows:
            item = self.item_row.get(item_id)
            if item is None:
                continue  # not in the catalogue this bundle serves
            user = self.user_row.get(user_id)
            if user is None:
                user = new_users.setdefault(user_id, base + len(new_users))
            keep.append((user, item, event, ts, order_id))
        return pl.DataFrame(
            keep,
            schema={
                "user_idx": pl.Int64,
                "item_idx": pl.Int64,
                "event": pl.String,
                "ts": pl.Int64,
                "order_id": pl.String,
            },
            orient="row",
        )

    def compute(self, log_: EventLog, now_ms: int) -> RatesTable:
        """Rates at ``now_ms`` from the bundle history and the log."""
        horizon = max(self.cfg.click_window_days, self.cfg.purchase_window_days) * DAY_MS
        since = now_ms - int(horizon)
        online = self._log_frame(log_, since)
        refunds = list(self.cascade.refund)
        frame = pl.concat(
            [
                self.history.with_columns(pl.lit(None, pl.String).alias("order_id")),
                online.with_columns(pl.lit(None, pl.Int64).alias("cancelled_at")),
            ],
            how="diagonal_relaxed",
        ).with_row_index("row")
        if refunds and online.height and online["event"].is_in(refunds).any():
            # a logged refund cancels the latest uncancelled purchase of its pair (or its order)
            candidates = frame.filter(
                (pl.col("event").is_in(self.cascade.purchase) & pl.col("cancelled_at").is_null())
                | pl.col("event").is_in(refunds)
            ).drop("cancelled_at")
            linked = link_cancellations(candidates, self.cascade.refund)
            frame = frame.join(
                linked.select("row", pl.col("cancelled_at").alias("_linked")), on="row", how="left"
            ).with_columns(pl.coalesce("cancelled_at", "_linked").alias("cancelled_at"))
        frame = frame.filter(~pl.col("event").is_in(refunds)).with_columns(
            pl.col("ts").cast(pl.Datetime("ms")), pl.col("cancelled_at").cast(pl.Datetime("ms"))
        )
        c = self.cascade
        since = now_ms - int(self.cfg.click_window_days * DAY_MS)
        clicks = click_trials(
            frame, c.clock, c.purchase, now_ms, since, delay=self.fits.conversion.overall
        )
        buys = purchase_trials(
            frame, c.purchase, now_ms, now_ms - int(self.cfg.purchase_window_days * DAY_MS)
        )
        rates = item_rates(
            clicks,
            buys,
            self.fits.conversion,
            self.fits.refund,
            self.n_items,
            self.segment,
            self.cfg.cvr_prior_strength,
            self.cfg.refund_prior_strength,
        )
        return RatesTable(rates, now_ms, rates["netcvr_corrected"].to_numpy())

    def now_ms(self, log_: EventLog) -> int:
        """The wall clock, or (clock 'data') the newest event the bundle or the log holds."""
        if self.cfg.clock == "wall":
            return int(time.time() * 1000)
        return max(self.fits.cutoff_ms, (log_.newest_ts() or 0) + 1)

    def refresh(self, log_: EventLog, now_ms: int | None = None) -> RatesTable:
        started = time.perf_counter()
        with self._lock:
            self.table = self.compute(log_, now_ms or self.now_ms(log_))
        log.info("item rates refreshed", extra={"seconds": round(time.perf_counter() - started, 3)})
        return self.table

    def current(self, log_: EventLog) -> RatesTable | None:
        """The latest table; starts a background refresh when it is older than refresh_s."""
        table = self.table
        stale = table is None or time.time() - table.computed_at > self.cfg.refresh_s
        if stale and not self._lock.locked():
            threading.Thread(target=self.refresh, args=(log_,), daemon=True).start()
        return table

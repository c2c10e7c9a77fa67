"""`recfb netcvr`: replay an ETL'd event stream day by day and train the NetCVR models in one
delayed-feedback mode, recorded as an MLflow run (config, metrics per test day, pooled)."""

from __future__ import annotations

from pathlib import Path

import polars as pl
from pydantic import BaseModel, ConfigDict, Field

from recfb.delayed.cvr import DAY_MS, ContinuousResult, CvrConfig, run_continuous
from recfb.delayed.fit import fit_delays, load_cascade
from recfb.delayed.stream import Mode, click_outcomes, refund_trials
from recfb.errors import InputError
from recfb.etl.interactions import Interactions, as_interactions, source_label


class ReplayConfig(BaseModel):
    """What to replay (conf/netcvr.yaml; every key overridable)."""

    model_config = ConfigDict(extra="forbid")

    data: str = Field("data/etl", description="ETL output directory")
    mode: Mode = "esdfm"
    direct: bool = Field(False, description="one head on the net label instead of the cascade")
    first_test_day: int = Field(14, ge=1, description="days after the log's first day")
    test_days: int = Field(7, ge=1)
    cvr: CvrConfig = Field(default_factory=CvrConfig)
    experiment: str = "recfb-netcvr"
    run_name: str | None = None


def replay(cfg: ReplayConfig, data: str | Path | Interactions | None = None) -> ContinuousResult:
    """Build the click and purchase trials of the ETL output and run the day-by-day replay;
    labels for testing are those known at the end of the log. `data` (a directory or an
    `Interactions`) replaces `cfg.data` when given."""
    etl = as_interactions(cfg.data if data is None else data)
    events, signals = load_cascade(etl)
    bounds = events.select(
        pl.col("ts").min().cast(pl.Datetime("ms")).dt.epoch("ms").alias("lo"),
        pl.col("ts").max().cast(pl.Datetime("ms")).dt.epoch("ms").alias("hi"),
    ).collect()
    lo, hi = int(bounds["lo"][0]), int(bounds["hi"][0]) + 1
    first = (lo // DAY_MS + cfg.first_test_day) * DAY_MS
    days = [first + d * DAY_MS for d in range(cfg.test_days)]
    if days[-1] + DAY_MS > hi:
        raise InputError(
            f"the log spans {(hi - lo) / DAY_MS:.1f} days: first_test_day {cfg.first_test_day} "
            f"+ test_days {cfg.test_days} run past its end",
            file=source_label(etl),
            field="first_test_day",
        )
    clicks = click_outcomes(events, signals.clock, signals.purchase, hi)
    n_users, n_items = etl.n_users, etl.n_items
    delay = None
    if cfg.cvr.fast_weight > 0:  # the weight needs a delay model, fitted before the first day
        delay = fit_delays(etl, cutoff_ms=days[0], segment=None).conversion.overall
    return run_continuous(
        clicks,
        refund_trials(clicks),
        cfg.mode,
        cfg.cvr,
        n_users,
        n_items,
        days,
        hi,
        direct=cfg.direct,
        conversion_delay=delay,
    )


def replay_tracked(cfg: ReplayConfig) -> tuple[str, ContinuousResult]:
    """``replay`` inside an MLflow run: params, per-day metrics (step = day), pooled metrics
    and the full result as JSON. Returns the run id and the result."""
    from recfb import tracking

    tags = {"stage": "netcvr", "mode": cfg.mode, "model": "direct" if cfg.direct else "cascade"}
    with tracking.run(cfg.experiment, cfg.run_name, tags) as run_id:
        tracking.log_params(cfg.model_dump(mode="json"))
        result = replay(cfg)
        for step, row in enumerate(result.by_day):
            for target, metrics in row.items():
                if isinstance(metrics, dict):
                    tracking.log_metrics(metrics, step=step, prefix=f"day/{target}/")
        for target, metrics in result.pooled.items():
            tracking.log_metrics(metrics, prefix=f"{target}/")
        tracking.log_json({"by_day": result.by_day, "pooled": result.pooled}, "netcvr.json")
    return run_id, result

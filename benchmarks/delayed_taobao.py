"""Real view -> purchase delays on Taobao UserBehavior, and the corrected rate of a recent day.

The log (../shared/data/taobao_userbehavior_84k.csv) covers 25 Nov - 3 Dec 2017. Standing at
the end of 2 Dec (UTC) as if it were "now": the delay models are fitted on everything before
it (right-censored), and the purchase rate of 2 Dec's views is computed naively (purchases seen
by then / views) and corrected for purchases still to come; the same views seen at the end of
the log (one more day of follow-up) give the matured rate to compare with.

    python benchmarks/delayed_taobao.py     # writes benchmarks/results/delayed_taobao.{json,png}
"""

from __future__ import annotations

import json
import sys
import tempfile
from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "taobao_userbehavior_84k.csv"
RESULTS = Path(__file__).parent / "results"


def epoch_ms(day: str) -> int:
    return int((datetime.fromisoformat(day) - datetime(1970, 1, 1)).total_seconds() * 1000)


def day_rate(etl: Path, fits, cutoff_ms: int, day: tuple[int, int]) -> dict:
    """Naive and corrected purchase rate of the views in `day`, seen at `cutoff_ms`."""
    from recfb.delayed.observations import click_trials
    from recfb.delayed.rates import corrected_rates

    events = pl.scan_parquet(etl / "events.parquet")
    model = fits.conversion.overall
    trials = click_trials(events, ["pv"], ["buy"], cutoff_ms, *day, delay=model)
    one = np.zeros(trials.height, dtype=np.int64)  # the whole day as one "item"
    rates = corrected_rates(
        one, trials["outcome"].to_numpy(), model.survival(trials["age_s"].to_numpy()), 1, 0, 0
    )
    return {
        "views": int(trials.height),
        "purchases_attributed": float(rates.outcomes[0]),
        "naive": float(rates.naive[0]),
        "corrected": float(rates.corrected[0]),
    }


def main() -> None:
    if not DATA.exists():
        sys.exit(f"skipped: {DATA} is absent (the real datasets live in ../shared/data/)")
    from recfb.config import build_model, read_yaml
    from recfb.delayed.fit import fit_delays
    from recfb.delayed.plots import delay_curves
    from recfb.etl import EtlConfig, run_etl
    from recfb.tracking.plots import plt

    work = Path(tempfile.mkdtemp(prefix="recfb-taobao-delays-"))
    cfg = read_yaml(ROOT / "conf" / "datasets" / "taobao.yaml")
    etl_cfg = {
        "input": {"paths": [str(DATA)], **cfg["input"]},
        "signals": str(ROOT / "conf" / "signals" / "taobao.yaml"),
        "out": str(work / "etl"),
        "split": {"method": "none"},
    }
    run_etl(build_model(EtlConfig, etl_cfg, "taobao"), quiet=True)
    etl = work / "etl"
    now, end = epoch_ms("2017-12-03T00:00:00"), epoch_ms("2017-12-04T00:00:00")
    day = (epoch_ms("2017-12-02T00:00:00"), now)

    fits = fit_delays(etl, cutoff_ms=now)
    at_now = day_rate(etl, fits, now, day)
    matured = day_rate(etl, fits, end, day)
    conv = fits.conversion.overall
    out = {
        "fit_at": "2017-12-03T00:00:00",
        "conversion": {
            "chosen": conv.to_dict(),
            "candidates": {k: m.to_dict() for k, m in fits.conversion.candidates.items()},
            "share_within_1h": float(conv.cdf(np.array([3600.0]))[0]),
            "share_after_24h": float(conv.survival(np.array([86_400.0]))[0]),
        },
        "day": "2017-12-02",
        "at_end_of_day": at_now,
        "one_day_later": matured,
        "naive_error_vs_matured": at_now["naive"] / matured["naive"] - 1,
        "corrected_error_vs_matured": at_now["corrected"] / matured["naive"] - 1,
    }
    print(json.dumps(out, indent=2))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "delayed_taobao.json").write_text(json.dumps(out, indent=2))
    fig = delay_curves(fits)
    fig.axes[0].set_title("Taobao: purchase after view (fitted at 3 Dec 00:00 UTC)")
    fig.savefig(RESULTS / "delayed_taobao.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()

"""The delay models' review figure: fitted curves beside the censoring-aware empirical one."""

from __future__ import annotations

import numpy as np

from recfb.delayed.survival import kaplan_meier
from recfb.tracking.plots import Figure, plt


def delay_curves(fits, max_points: int = 200_000) -> Figure:
    """Per cascade stage: the Kaplan-Meier share of trials with an outcome by time since the
    trial (non-parametric, censoring-aware) beside each family's fitted ``p F(t)``."""
    stages = [(name, fits.trials[name]) for name in ("conversion", "refund") if name in fits.trials]
    fig, axes = plt.subplots(1, max(len(stages), 1), figsize=(6 * max(len(stages), 1), 3.8))
    axes = np.atleast_1d(axes)
    rng = np.random.default_rng(0)
    for ax, (name, trials) in zip(axes, stages, strict=False):
        model = fits.conversion if name == "conversion" else fits.refund
        if trials.height > max_points:
            trials = trials[np.sort(rng.choice(trials.height, max_points, replace=False))]
        hit = trials["outcome"].to_numpy() >= 0.5  # the click's (most of a) purchase
        durations = np.where(hit, trials["delay_s"].fill_null(0).to_numpy(), trials["age_s"])
        times, surv = kaplan_meier(durations, hit)
        ax.step(times / 3600, 1 - surv, where="post", color="black", label="Kaplan-Meier")
        grid = np.geomspace(max(times[times > 0].min(), 1.0), times.max(), 200) / 3600
        for fam, fit in model.candidates.items():
            style = "-" if fam == model.overall.family else ":"
            ax.plot(
                grid,
                fit.p * fit.cdf(grid * 3600),
                style,
                label=f"{fam} (AIC {fit.aic:,.0f}, median {fit.median_s() / 3600:.1f} h)",
            )
        ax.set_xscale("log")
        what = "purchase after click" if name == "conversion" else "refund after purchase"
        ax.set(title=f"{what}: share with an outcome", xlabel="hours since the trial")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig

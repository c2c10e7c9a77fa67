"""PNG plots for run review: learning curves and metrics per ordinal level."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # no display on servers
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def learning_curves(history: list[dict[str, float]], monitor: str) -> Figure:
    """Training loss and the monitored validation metric per epoch."""
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    epochs = [h["epoch"] for h in history]
    ax[0].plot(epochs, [h.get("train/loss", float("nan")) for h in history], marker="o")
    ax[0].set(title="train loss", xlabel="epoch")
    ax[1].plot(epochs, [h.get(f"valid/{monitor}", float("nan")) for h in history], marker="o")
    ax[1].set(title=f"valid {monitor}", xlabel="epoch")
    fig.tight_layout()
    return fig


def metrics_by_level(metrics: dict[str, float], levels: list[str], k: int) -> Figure:
    """NDCG@k and recall@k on held-out pairs at least as deep as each level."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = range(len(levels))
    for offset, name in ((-0.2, "ndcg"), (0.2, "recall")):
        values = [metrics.get(f"{name}@{k}/{lv}", float("nan")) for lv in levels]
        ax.bar([x + offset for x in xs], values, width=0.4, label=f"{name}@{k}")
    ax.set_xticks(list(xs), levels)
    ax.set(title="held-out metrics by level (label >= level)")
    ax.legend()
    fig.tight_layout()
    return fig


def delay_curves(fits, max_points: int = 200_000) -> Figure:
    """Per cascade stage: the Kaplan-Meier share of trials with an outcome by time since the
    trial (non-parametric, censoring-aware) beside each family's fitted ``p F(t)``."""
    import numpy as np

    from recfb.delayed.survival import kaplan_meier

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

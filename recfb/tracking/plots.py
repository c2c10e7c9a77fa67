"""PNG plots for run review: learning curves, metrics per ordinal level, the shared pyplot."""

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

"""Conversion-rate models under delayed feedback, trained with Lightning, replayed day by day.

A *head* scores one binary outcome of a (user, item) trial: ``b + b_u + b_i + <u, i>`` (+ a
learned offset per bucket of a known delay). The cascade NetCVR model has a CVR head over
clicks and a refund head over purchases (with the click -> purchase delay as a feature, hidden
at random during training so the head also predicts at click time, before the delay is known):
``NetCVR = P(purchase | click) x (1 - P(refund | purchase))``. The direct model is one head on
the net label (purchased and never refunded).

Importance weights for the fake-negative problem (``recfb.delayed.stream`` emits the samples):
* ``fnw``:   ``w+ = 1 + p``, ``w- = (1 - p)(1 + p)``, ``p`` = the model's own prediction
  (no gradient through it);
* ``esdfm``: ``w+ = 1 + p_dp``, ``w- = (1 + p_dp) p_rn``, with auxiliary heads trained on
  matured trials: ``p_dp`` = P(outcome after the wait window), ``p_rn`` = P(no outcome ever |
  none inside the window);
* ``naive``, ``wait`` and ``oracle``: weight 1.

``run_continuous`` trains on everything emitted up to the end of day t, tests on the trials of
day t+1 against their eventual labels, and steps through the days.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import lightning as L
import numpy as np
import polars as pl
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torchmetrics.functional.classification import binary_auroc, binary_average_precision

from recfb.delayed.stream import Mode, emit
from recfb.delayed.survival import DelayModel

DAY_MS = 86_400_000
N_DELAY_BUCKETS = 12  # bucket 0 = delay unknown; then log2-spaced from 1 minute


class CvrConfig(BaseModel):
    """Training of the delayed-feedback CVR models (one pass over each day's samples)."""

    model_config = ConfigDict(extra="forbid")

    dim: int = Field(16, ge=1)
    lr: float = Field(0.01, gt=0)
    weight_decay: float = Field(1e-6, ge=0)
    batch_size: int = Field(2048, ge=1)
    epochs_per_day: int = Field(1, ge=1)
    wait_hours: float = Field(1.0, ge=0, description="ES-DFM / naive wait window after a click")
    refund_wait_hours: float = Field(24.0, ge=0, description="same, after a purchase")
    mature_days: float = Field(7.0, gt=0, description="a click this old has its final label")
    refund_mature_days: float = Field(14.0, gt=0, description="a purchase this old, likewise")
    delay_dropout: float = Field(
        0.5,
        ge=0,
        le=1,
        description="share of samples trained with "
        "the delay hidden, so the refund head works at click time",
    )
    fast_weight: float = Field(
        0.0,
        ge=0,
        description="delay-aware ranking weight: a positive "
        "weighs 1 + fast_weight x S(delay) (fast conversions weigh more)",
    )
    seed: int = 0


def delay_bucket(delay_s: torch.Tensor) -> torch.Tensor:
    """0 for an unknown delay (NaN), else 1 + floor(log2(delay / 1 min)), clipped."""
    known = ~torch.isnan(delay_s)
    b = torch.floor(torch.log2(torch.clamp(torch.nan_to_num(delay_s, nan=60.0), min=60.0) / 60))
    return torch.where(known, 1 + b.clamp(0, N_DELAY_BUCKETS - 2), 0).long()


class Head(nn.Module):
    """Logit of one binary outcome of a (user, item) trial."""

    def __init__(self, n_users: int, n_items: int, dim: int) -> None:
        super().__init__()
        self.user = nn.Embedding(n_users, dim)
        self.item = nn.Embedding(n_items, dim)
        self.user_bias = nn.Embedding(n_users, 1)
        self.item_bias = nn.Embedding(n_items, 1)
        self.delay = nn.Embedding(N_DELAY_BUCKETS, 1)
        self.bias = nn.Parameter(torch.tensor(0.0))
        self.initialised = False  # fit_head sets the bias from the first data it sees
        for emb in (self.user, self.item):
            nn.init.normal_(emb.weight, std=0.01)
        for emb in (self.user_bias, self.item_bias, self.delay):
            nn.init.zeros_(emb.weight)

    def forward(self, u: torch.Tensor, i: torch.Tensor, bucket: torch.Tensor) -> torch.Tensor:
        dot = (self.user(u) * self.item(i)).sum(-1)
        extra = self.user_bias(u).squeeze(-1) + self.item_bias(i).squeeze(-1)
        return self.bias + dot + extra + self.delay(bucket).squeeze(-1)


class HeadTrainer(L.LightningModule):
    """Weighted binary cross-entropy on one head; ``fnw`` weights come from the head itself."""

    def __init__(self, head: Head, cfg: CvrConfig, fnw: bool = False) -> None:
        super().__init__()
        self.head, self.cfg, self.fnw = head, cfg, fnw

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        u, i, bucket, label, weight = batch
        if self.cfg.delay_dropout > 0:
            hide = torch.rand(bucket.shape, device=bucket.device) < self.cfg.delay_dropout
            bucket = torch.where(hide, 0, bucket)
        logit = self.head(u, i, bucket)
        if self.fnw:
            p = torch.sigmoid(logit).detach()
            weight = weight * torch.where(label > 0, 1 + p, (1 - p) * (1 + p))
        loss = nn.functional.binary_cross_entropy_with_logits(logit, label, weight=weight)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(
            self.head.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay
        )


def _tensors(df: pl.DataFrame, label: str, weight: np.ndarray | None, delay: str | None):
    u = torch.as_tensor(df["user_idx"].to_numpy().astype(np.int64))
    i = torch.as_tensor(df["item_idx"].to_numpy().astype(np.int64))
    d = df[delay].to_numpy().astype(np.float64) if delay else np.full(df.height, np.nan)
    bucket = delay_bucket(torch.as_tensor(d, dtype=torch.float32))
    y = torch.as_tensor(df[label].to_numpy().astype(np.float32))
    w = torch.as_tensor(weight if weight is not None else np.ones(df.height), dtype=torch.float32)
    return u, i, bucket, y, w


def fit_head(
    head: Head,
    df: pl.DataFrame,
    cfg: CvrConfig,
    label: str = "label",
    weight: np.ndarray | None = None,
    delay: str | None = None,
    fnw: bool = False,
) -> None:
    """One Lightning fit of ``head`` on ``df`` (CPU or one GPU; no logger, no checkpoints)."""
    if df.height == 0:
        return
    tensors = _tensors(df, label, weight, delay)
    if not head.initialised:  # start at the (weighted) base rate, not at an arbitrary bias
        y, w = tensors[3].double(), tensors[4].double()
        rate = float((y * w).sum() / w.sum().clamp(min=1e-12))
        head.bias.data.fill_(math.log(max(rate, 1e-4) / max(1 - rate, 1e-4)))
        head.initialised = True
    data = torch.utils.data.TensorDataset(*tensors)
    gen = torch.Generator().manual_seed(cfg.seed)
    loader = torch.utils.data.DataLoader(
        data, batch_size=cfg.batch_size, shuffle=True, generator=gen
    )
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # a fit per day: quiet
    trainer = L.Trainer(
        max_epochs=cfg.epochs_per_day,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="auto",
        devices=1,
    )
    trainer.fit(HeadTrainer(head, cfg, fnw), loader)


@torch.no_grad()
def predict(head: Head, df: pl.DataFrame, delay: str | None = None) -> np.ndarray:
    head.eval()
    u, i, bucket, _, _ = _tensors(df.with_columns(pl.lit(0).alias("_y")), "_y", None, delay)
    p = torch.sigmoid(head(u, i, bucket)).numpy()
    head.train()
    return p


def rate_metrics(pred: np.ndarray, label: np.ndarray) -> dict[str, float]:
    """AUC, PR-AUC, NLL (mean log loss) and predicted-over-observed rate."""
    p = torch.as_tensor(np.clip(pred, 1e-7, 1 - 1e-7), dtype=torch.float64)
    y = torch.as_tensor(label.astype(np.int64))
    nll = -(y * torch.log(p) + (1 - y) * torch.log1p(-p)).mean()
    return {
        "auc": float(binary_auroc(p, y)),
        "pr_auc": float(binary_average_precision(p, y)),
        "nll": float(nll),
        "pred_over_obs": float(p.mean() / max(y.double().mean(), 1e-12)),
        "n": int(y.numel()),
        "positives": int(y.sum()),
    }


def fast_weights(label: np.ndarray, delay_s: np.ndarray, delay: DelayModel, strength: float):
    """Delay-aware ranking weight: a positive weighs ``1 + strength x S(delay)``, so a purchase
    that came fast (S near 1) counts up to 1 + strength times, a slow one about once; negatives
    and positives without a known delay weigh 1."""
    known = (label > 0) & ~np.isnan(delay_s)
    s = np.zeros(label.size)
    s[known] = delay.survival(delay_s[known])
    return 1 + strength * s


@dataclass
class StageModel:
    """One stage (conversion or refund) learnt in one mode, day by day."""

    mode: Mode
    cfg: CvrConfig
    head: Head
    wait_ms: int
    mature_ms: int
    delay: str | None = None  # a known-delay feature column of the trials
    aux_dp: Head | None = None
    aux_rn: Head | None = None
    trained_to: int = 0
    aux_to: int = 0
    fast_survival: DelayModel | None = None  # for the delay-aware ranking weight

    def _aux_step(self, trials: pl.DataFrame, until_ms: int) -> None:
        """ES-DFM's auxiliary heads on trials matured since the last step, labels as of now."""
        mature = self.mature_ms
        new = trials.filter(
            (pl.col("trial_ms") >= self.aux_to - mature) & (pl.col("trial_ms") < until_ms - mature)
        ).with_columns(
            (pl.col("outcome_ms") < until_ms).fill_null(False).alias("_seen"),
            ((pl.col("outcome_ms") - pl.col("trial_ms")) > self.wait_ms)
            .fill_null(True)
            .alias("_after"),
        )
        self.aux_to = until_ms
        dp = new.with_columns((pl.col("_seen") & pl.col("_after")).cast(pl.Int8).alias("y"))
        fit_head(self.aux_dp, dp, self.cfg, "y", delay=None)
        neg = new.filter(~pl.col("_seen") | pl.col("_after"))  # no outcome inside the window
        rn = neg.with_columns((~pl.col("_seen")).cast(pl.Int8).alias("y"))
        fit_head(self.aux_rn, rn, self.cfg, "y", delay=None)

    def step(self, trials: pl.DataFrame, until_ms: int) -> None:
        """Train on the samples emitted in [trained_to, until_ms)."""
        samples = emit(trials, self.mode, self.wait_ms, until_ms, self.mature_ms).filter(
            pl.col("emit_ms") >= self.trained_to
        )
        self.trained_to = until_ms
        weight = np.ones(samples.height)
        if self.mode == "esdfm":
            self._aux_step(trials, until_ms)
            p_dp = predict(self.aux_dp, samples)
            p_rn = predict(self.aux_rn, samples)
            pos = samples["label"].to_numpy() > 0
            weight = np.where(pos, 1 + p_dp, (1 + p_dp) * p_rn)
        if self.cfg.fast_weight > 0 and self.fast_survival is not None:
            weight = weight * fast_weights(
                samples["label"].to_numpy(),
                samples["delay_s"].fill_null(np.nan).to_numpy(),
                self.fast_survival,
                self.cfg.fast_weight,
            )
        fit_head(self.head, samples, self.cfg, "label", weight, self.delay, self.mode == "fnw")


def new_stage(
    mode: Mode,
    cfg: CvrConfig,
    n_users: int,
    n_items: int,
    wait_hours: float,
    mature_days: float,
    delay: str | None = None,
) -> StageModel:
    torch.manual_seed(cfg.seed)
    aux = mode == "esdfm"
    return StageModel(
        mode=mode,
        cfg=cfg,
        head=Head(n_users, n_items, cfg.dim),
        wait_ms=int(wait_hours * 3_600_000),
        mature_ms=int(mature_days * DAY_MS),
        delay=delay,
        aux_dp=Head(n_users, n_items, cfg.dim) if aux else None,
        aux_rn=Head(n_users, n_items, cfg.dim) if aux else None,
    )


@dataclass
class ContinuousResult:
    """Metrics per test day and, pooled over the test days, per target."""

    by_day: list[dict] = field(default_factory=list)
    pooled: dict[str, dict[str, float]] = field(default_factory=dict)


def run_continuous(
    clicks: pl.DataFrame,
    purchases: pl.DataFrame,
    mode: Mode,
    cfg: CvrConfig,
    n_users: int,
    n_items: int,
    days: list[int],
    truth_end_ms: int,
    direct: bool = False,
    conversion_delay: DelayModel | None = None,
) -> ContinuousResult:
    """Replay: before each day in ``days`` (epoch ms of its start) train on everything emitted
    so far, then test that day's clicks (CVR, NetCVR) and purchases (refund rate) against
    their labels as of ``truth_end_ms``. ``direct``: one head on the net label instead of the
    cascade (NetCVR only). ``conversion_delay`` enables the delay-aware weight (``fast_weight``)."""
    truth_clicks = clicks.with_columns(
        (pl.col("outcome_ms") < truth_end_ms).fill_null(False).alias("buy"),
        (pl.col("next_ms") < truth_end_ms).fill_null(False).alias("refund"),
    ).with_columns((pl.col("buy") & ~pl.col("refund")).alias("net"))
    if direct:
        # the net outcome: a purchase not refunded (yet: a refund cancels it when it comes)
        net_trials = clicks.with_columns(pl.col("next_ms").alias("cancel_ms"))
        # the net label is final only once the refund window has passed too
        net = new_stage(mode, cfg, n_users, n_items, cfg.wait_hours, cfg.refund_mature_days)
    else:
        cvr = new_stage(mode, cfg, n_users, n_items, cfg.wait_hours, cfg.mature_days)
        ref = new_stage(
            mode,
            cfg,
            n_users,
            n_items,
            cfg.refund_wait_hours,
            cfg.refund_mature_days,
            delay="buy_delay_s",
        )
        cvr.fast_survival = conversion_delay
    preds: dict[str, list] = {"cvr": [], "refund": [], "netcvr": []}
    out = ContinuousResult()
    for start in days:
        test = truth_clicks.filter(pl.col("trial_ms").is_between(start, start + DAY_MS - 1))
        row: dict = {"day_start_ms": start}
        if direct:
            net.step(net_trials, start)
            p_net = predict(net.head, test)
        else:
            cvr.step(clicks, start)
            ref.step(purchases, start)
            p_cvr = predict(cvr.head, test)
            p_ref_click = predict(ref.head, test)  # delay unknown at click time: bucket 0
            p_net = p_cvr * (1 - p_ref_click)
            bought = purchases.filter(pl.col("trial_ms").is_between(start, start + DAY_MS - 1))
            refunded = (bought["outcome_ms"] < truth_end_ms).fill_null(False).to_numpy()
            p_ref = predict(ref.head, bought, delay="buy_delay_s")
            preds["cvr"].append((p_cvr, test["buy"].to_numpy()))
            preds["refund"].append((p_ref, refunded))
            row["cvr"] = rate_metrics(p_cvr, test["buy"].to_numpy())
            row["refund"] = rate_metrics(p_ref, refunded)
        preds["netcvr"].append((p_net, test["net"].to_numpy()))
        row["netcvr"] = rate_metrics(p_net, test["net"].to_numpy())
        out.by_day.append(row)
    for target, parts in preds.items():
        if parts:
            p = np.concatenate([a for a, _ in parts])
            y = np.concatenate([b for _, b in parts])
            out.pooled[target] = rate_metrics(p, y)
    return out


__all__ = [
    "CvrConfig",
    "ContinuousResult",
    "Head",
    "rate_metrics",
    "run_continuous",
]

"""Configuration of the implicit-feedback simulator.

Every knob has a default so that ``SimConfig()`` yields a plausible e-commerce-like log; unknown
keys are rejected so that a typo in a config file fails loudly instead of silently using a default.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

_EPOCH = datetime(1970, 1, 1)
MS_PER_DAY = 86_400_000


class DelaySpec(BaseModel):
    """Distribution of the delay between a parent event and its child (click -> purchase, ...).

    It is parameterised by its median so that a config reads in wall-clock terms whatever the
    family; ``shape`` is the Weibull k or the lognormal sigma (the exponential ignores it).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    distribution: Literal["exponential", "weibull", "lognormal"] = "lognormal"
    median_hours: float = Field(default=3.0, gt=0)
    shape: float = Field(default=1.0, gt=0)

    def sample_seconds(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Draw ``n`` delays in seconds (float64, > 0)."""
        median_s = self.median_hours * 3600.0
        if self.distribution == "exponential":
            return rng.exponential(median_s / math.log(2.0), n)
        if self.distribution == "weibull":
            scale = median_s / math.log(2.0) ** (1.0 / self.shape)
            return scale * rng.weibull(self.shape, n)
        return median_s * np.exp(self.shape * rng.standard_normal(n))


class SimConfig(BaseModel):
    """All parameters of one simulated world and its event log (see ``recfb.simulate``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # --- size and randomness -------------------------------------------------------------
    seed: int = Field(default=0, ge=0)
    n_users: int = Field(default=20_000, ge=1)
    n_items: int = Field(default=5_000, ge=1)
    n_events: int = Field(default=1_000_000, ge=1)  # approximate number of emitted rows
    chunk_events: int = Field(default=2_000_000, ge=1_000)  # expected rows per generation chunk

    # --- latent world --------------------------------------------------------------------
    dim: int = Field(default=16, ge=1)
    n_categories: int = Field(default=20, ge=1)
    prefs_per_user: int = Field(default=3, ge=1)  # categories a user's taste is mixed from
    item_noise: float = Field(default=0.5, ge=0)  # item spread around its category centroid
    user_noise: float = Field(default=0.5, ge=0)  # user spread around their preferred mix
    item_bias_mean: float = -1.0  # item quality, shared by every user: most pairs are not a match
    item_bias_sd: float = Field(default=0.5, ge=0)
    affinity_scale: float = Field(default=3.0, ge=0)  # logit a = scale * <u, v> + item_bias

    # --- time ----------------------------------------------------------------------------
    days: float = Field(default=30.0, gt=0)
    start: str = "2026-01-01T00:00:00"  # UTC; an explicit offset is converted to UTC
    daily_amplitude: float = Field(default=0.5, ge=0, le=1)  # 0 = no daily cycle
    daily_peak_hour: float = Field(default=20.0, ge=0, lt=24)

    # --- exposure (missing-not-at-random) ------------------------------------------------
    activity_sigma: float = Field(default=1.0, ge=0)  # lognormal sigma of user activity
    popularity_sigma: float = Field(default=1.5, ge=0)  # lognormal sigma of item popularity
    popularity_quality_corr: float = Field(default=0.3, ge=-1, le=1)  # popular ~ better items
    popularity_exponent: float = Field(default=1.0, ge=0)  # exposure weight = popularity^exp
    organic_share: float = Field(default=0.3, ge=0, le=1)  # views not driven by a recommender
    targeted_share: float = Field(default=0.5, ge=0, le=1)  # recommender views from user prefs

    # --- funnel --------------------------------------------------------------------------
    click_logit: float = -3.5
    like_logit: float = -3.5
    cart_logit: float = -3.0
    purchase_logit: float = -5.0
    cvr_logit_sd: float = Field(default=0.5, ge=0)  # per-item spread of the conversion logit
    refund_logit: float = -1.0  # mean per-item refund logit
    refund_logit_sd: float = Field(default=0.7, ge=0)
    refund_affinity: float = Field(default=0.5, ge=0)  # k in sigmoid(item_refund_logit - k*a)
    dislike_logit: float = -5.0
    dislike_affinity: float = Field(default=1.0, ge=0)  # how fast dislikes grow as a falls
    unlike_rate: float = Field(default=0.02, ge=0, le=1)
    undislike_rate: float = Field(default=0.02, ge=0, le=1)
    price_median: float = Field(default=25.0, gt=0)
    price_sigma: float = Field(default=0.8, ge=0)
    dwell_median_s: float = Field(default=20.0, gt=0)  # genuine click at neutral affinity
    dwell_sigma: float = Field(default=0.6, ge=0)
    dwell_affinity: float = Field(default=0.8, ge=0)  # log-dwell swing over the affinity range
    purchase_delay: DelaySpec = Field(
        default_factory=lambda: DelaySpec(distribution="lognormal", median_hours=2.0, shape=1.5)
    )
    refund_delay: DelaySpec = Field(
        default_factory=lambda: DelaySpec(distribution="weibull", median_hours=96.0, shape=1.5)
    )
    undo_delay: DelaySpec = Field(  # like -> unlike, dislike -> undislike
        default_factory=lambda: DelaySpec(distribution="exponential", median_hours=12.0)
    )

    # --- noise ---------------------------------------------------------------------------
    noise_click_rate: float = Field(default=0.05, ge=0, le=1)  # per view without a real click
    accidental_dwell_median_s: float = Field(default=1.0, gt=0)
    accidental_dwell_sigma: float = Field(default=0.6, ge=0)
    noise_positive_share: float = Field(default=0.0, ge=0, le=0.95)  # of all clicks
    # where preference-free positives land: on items drawn by exposure popularity (they look
    # like ordinary popular traffic) or uniformly over the catalogue (clearly off-taste)
    noise_positive_items: Literal["popularity", "uniform"] = "popularity"
    duplicate_rate: float = Field(default=0.0, ge=0, le=1)  # of emitted rows, re-sent

    @field_validator("start")
    @classmethod
    def _start_is_iso(cls, value: str) -> str:
        """Fail at construction rather than after minutes of generation."""
        parse_utc(value)
        return value

    def start_ms(self) -> int:
        """Window start as epoch milliseconds (UTC)."""
        return to_epoch_ms(parse_utc(self.start))

    def end_ms(self) -> int:
        """Window end (exclusive) as epoch milliseconds: events at or after it are censored."""
        return self.start_ms() + round(self.days * MS_PER_DAY)

    def start_iso(self) -> str:
        """Window start as a naive UTC ISO string with milliseconds."""
        return _iso_ms(self.start_ms())

    def end_iso(self) -> str:
        """Window end (exclusive) as a naive UTC ISO string with milliseconds."""
        return _iso_ms(self.end_ms())


def _iso_ms(epoch_ms: int) -> str:
    return (_EPOCH + timedelta(milliseconds=epoch_ms)).isoformat(timespec="milliseconds")


def parse_utc(value: str) -> datetime:
    """Parse an ISO timestamp as naive UTC (aware inputs are converted, naive ones taken as UTC)."""
    dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if dt.tzinfo is not None:
        dt = dt.astimezone(UTC).replace(tzinfo=None)
    return dt


def to_epoch_ms(dt: datetime) -> int:
    """Naive UTC datetime to epoch milliseconds, exactly (no float rounding)."""
    return (dt - _EPOCH) // timedelta(milliseconds=1)

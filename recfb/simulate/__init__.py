"""Deterministic implicit-feedback simulator with known ground truth.

Why: the engine learns from ordered, noisy, delayed, missing-not-at-random feedback, and such
behaviour can only be tested where the truth is known. ``simulate`` draws a latent world (users,
category-clustered items, heavy-tailed activity and popularity), exposes items mostly by
popularity, runs a view -> click -> like/cart -> purchase -> refund funnel (plus dislikes and
undos, accidental clicks, random positives, duplicates) and right-censors at the window end.

Layout of ``out_dir``::

    events/part-NNNNN.parquet   canonical events (``EVENTS_SCHEMA``), one part per chunk
    truth/users.parquet         user_id, activity, pref_categories, pref_weights, latent
    truth/items.parquet         item_id, category, popularity, price, bias, cvr_logit,
                                refund_logit, latent, true_cvr, true_refund_rate, true_netcvr,
                                n_clicks_simulated, n_purchases_simulated
    truth/events.parquet        per emitted event_id: noise, p_purchase, p_refund, true_affinity
    truth/censored.parquet      events simulated past the window end (never emitted), full rows
    truth/config.json           {"config": SimConfig, "start", "end", "derived": {...}}
"""

from recfb.simulate.config import DelaySpec, SimConfig
from recfb.simulate.simulator import (
    CENSORED_SCHEMA,
    EVENT_TYPES,
    EVENTS_SCHEMA,
    NOISE_LABELS,
    TRUTH_EVENTS_SCHEMA,
    SimResult,
    simulate,
)
from recfb.simulate.world import true_affinity

__all__ = [
    "CENSORED_SCHEMA",
    "EVENTS_SCHEMA",
    "EVENT_TYPES",
    "NOISE_LABELS",
    "TRUTH_EVENTS_SCHEMA",
    "DelaySpec",
    "SimConfig",
    "SimResult",
    "simulate",
    "true_affinity",
]

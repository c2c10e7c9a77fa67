"""The simulated world: users, items, their latent tastes, and how items get exposed.

Kept apart from the event generator so that the ground truth (``true_affinity``) is computed by
exactly the same code whether it is called during generation or later from the truth tables.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recfb.simulate.config import SimConfig

# Independent random streams, so that e.g. changing n_users does not reshuffle the items.
STREAM_CENTROIDS = 0
STREAM_ITEMS = 1
STREAM_USERS = 2
STREAM_PILOT = 3
STREAM_CHUNK = 4

_AFFINITY_BATCH = 1 << 18  # pairs per batch when gathering latent vectors (bounded memory)


def rng_for(seed: int, *stream: int) -> np.random.Generator:
    """A generator derived from (seed, stream...), independent of every other stream."""
    return np.random.default_rng([seed, *stream])


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function (float64)."""
    return 1.0 / (1.0 + np.exp(-x))


@dataclass(frozen=True)
class World:
    """Static ground truth. Arrays are indexed by row (0..n-1); ``*_ids`` map rows to the ids."""

    user_ids: np.ndarray  # int64, sorted, sparse (not row numbers on purpose)
    user_activity: np.ndarray  # float64, mean 1, heavy tailed
    user_pref_categories: np.ndarray  # int32 (n_users, prefs_per_user)
    user_pref_weights: np.ndarray  # float64 (n_users, prefs_per_user), rows sum to 1
    user_latent: np.ndarray  # float64 (n_users, dim)
    item_ids: np.ndarray  # int64, sorted, sparse
    item_category: np.ndarray  # int32
    item_popularity: np.ndarray  # float64 exposure weight (popularity^exponent), mean 1
    item_price: np.ndarray  # float64
    item_bias: np.ndarray  # float64, quality term of the affinity logit
    item_cvr_logit: np.ndarray  # float64, per-item conversion offset
    item_refund_logit: np.ndarray  # float64, per-item refund logit
    item_latent: np.ndarray  # float64 (n_items, dim)
    category_share: np.ndarray  # float64 (n_categories,), sums to 1

    @property
    def n_users(self) -> int:
        return int(self.user_ids.size)

    @property
    def n_items(self) -> int:
        return int(self.item_ids.size)


def _sparse_ids(rng: np.random.Generator, n: int) -> np.ndarray:
    """Sorted unique ids drawn from a range ~100x larger than ``n``.

    Sparse ids make any downstream code that confuses ids with row numbers fail visibly.
    """
    high = 100 * n + 10_000
    return np.sort(rng.choice(high, size=n, replace=False)).astype(np.int64) + 1


def build_world(cfg: SimConfig) -> World:
    """Draw users and items from the config's seed (deterministic)."""
    rc = rng_for(cfg.seed, STREAM_CENTROIDS)
    n_cat, dim = cfg.n_categories, cfg.dim
    centroids = rc.standard_normal((n_cat, dim)) / np.sqrt(dim)  # norm ~ 1
    category_share = rc.dirichlet(np.full(n_cat, 2.0)) if n_cat > 1 else np.ones(1)
    category_price = np.exp(0.5 * rc.standard_normal(n_cat))

    ri = rng_for(cfg.seed, STREAM_ITEMS)
    n_items = cfg.n_items
    item_ids = _sparse_ids(ri, n_items)
    item_category = ri.choice(n_cat, size=n_items, p=category_share).astype(np.int32)
    item_latent = centroids[item_category] + cfg.item_noise / np.sqrt(dim) * ri.standard_normal(
        (n_items, dim)
    )
    z_bias = ri.standard_normal(n_items)
    item_bias = cfg.item_bias_mean + cfg.item_bias_sd * z_bias
    rho = cfg.popularity_quality_corr
    z_pop = rho * z_bias + np.sqrt(1.0 - rho * rho) * ri.standard_normal(n_items)
    weight = np.exp(cfg.popularity_exponent * cfg.popularity_sigma * z_pop)
    item_popularity = weight / weight.mean()
    price = cfg.price_median * category_price[item_category]
    price = price * np.exp(cfg.price_sigma * ri.standard_normal(n_items))
    item_price = np.maximum(np.round(price, 2), 0.5)
    # Expensive items convert a bit less: per-item CVR is not just noise.
    item_cvr_logit = -0.3 * np.log(item_price / cfg.price_median)
    item_cvr_logit = item_cvr_logit + cfg.cvr_logit_sd * ri.standard_normal(n_items)
    item_refund_logit = cfg.refund_logit + cfg.refund_logit_sd * ri.standard_normal(n_items)

    ru = rng_for(cfg.seed, STREAM_USERS)
    n_users, n_pref = cfg.n_users, cfg.prefs_per_user
    user_ids = _sparse_ids(ru, n_users)
    user_activity = np.exp(cfg.activity_sigma * ru.standard_normal(n_users))
    user_activity = user_activity / user_activity.mean()
    pref_cat = ru.choice(n_cat, size=(n_users, n_pref), p=category_share).astype(np.int32)
    pref_w = (
        ru.dirichlet(np.full(n_pref, 0.7), size=n_users) if n_pref > 1 else np.ones((n_users, 1))
    )
    mix = np.einsum("up,upd->ud", pref_w, centroids[pref_cat])
    mix = mix / np.maximum(np.linalg.norm(mix, axis=1, keepdims=True), 1e-12)
    user_latent = mix + cfg.user_noise / np.sqrt(dim) * ru.standard_normal((n_users, dim))

    return World(
        user_ids=user_ids,
        user_activity=user_activity,
        user_pref_categories=pref_cat,
        user_pref_weights=pref_w,
        user_latent=user_latent,
        item_ids=item_ids,
        item_category=item_category,
        item_popularity=item_popularity,
        item_price=item_price,
        item_bias=item_bias,
        item_cvr_logit=item_cvr_logit,
        item_refund_logit=item_refund_logit,
        item_latent=item_latent,
        category_share=category_share,
    )


def affinity_logit(
    user_latent: np.ndarray,
    item_latent: np.ndarray,
    item_bias: np.ndarray,
    scale: float,
    user_rows: np.ndarray,
    item_rows: np.ndarray,
) -> np.ndarray:
    """a(u, i) = scale * <u, v> + item_bias, for row-index pairs, in bounded-memory batches."""
    out = np.empty(user_rows.size, dtype=np.float64)
    for lo in range(0, user_rows.size, _AFFINITY_BATCH):
        hi = min(lo + _AFFINITY_BATCH, user_rows.size)
        u = user_latent[user_rows[lo:hi]]
        v = item_latent[item_rows[lo:hi]]
        out[lo:hi] = np.einsum("ij,ij->i", u, v)
    out *= scale
    out += item_bias[item_rows]
    return out


class Exposure:
    """Samples which item a view shows: popularity-weighted, partly targeted at user tastes.

    Organic views and a (1 - targeted_share) part of recommender views follow global popularity;
    the remaining recommender views first pick one of the user's preferred categories, then an
    item within it, still by popularity. Either way exposure is missing-not-at-random.
    """

    def __init__(self, world: World, cfg: SimConfig) -> None:
        self._world = world
        self._cfg = cfg
        self._cdf = np.cumsum(world.item_popularity)
        order = np.argsort(world.item_category, kind="stable")
        self._by_cat = order
        self._cdf_cat = np.cumsum(world.item_popularity[order])
        counts = np.bincount(world.item_category, minlength=cfg.n_categories)
        ends = np.cumsum(counts)
        starts = ends - counts
        self._cat_start = starts
        self._cat_end = ends
        lo = np.concatenate([[0.0], self._cdf_cat])
        self._cat_lo = lo[starts]
        self._cat_hi = lo[ends]
        self._cat_nonempty = counts > 0
        self._pref_cw = np.cumsum(world.user_pref_weights, axis=1)

    def sample_global(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Item rows drawn proportionally to the exposure weight."""
        x = rng.random(n) * self._cdf[-1]
        rows = np.searchsorted(self._cdf, x, side="right")
        return np.minimum(rows, self._cdf.size - 1)

    def sample_views(
        self, rng: np.random.Generator, user_rows: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Item rows and is_organic flags for one view per entry of ``user_rows``."""
        n = user_rows.size
        cfg = self._cfg
        organic = rng.random(n) < cfg.organic_share
        targeted = ~organic & (rng.random(n) < cfg.targeted_share)
        items = self.sample_global(rng, n)
        u_pick = rng.random(n)
        u_item = rng.random(n)
        t = np.flatnonzero(targeted)
        if t.size:
            cw = self._pref_cw[user_rows[t]]
            k = (u_pick[t, None] > cw[:, :-1]).sum(axis=1)
            cat = self._world.user_pref_categories[user_rows[t], k]
            ok = self._cat_nonempty[cat]
            t, cat = t[ok], cat[ok]
            x = self._cat_lo[cat] + u_item[t] * (self._cat_hi[cat] - self._cat_lo[cat])
            pos = np.searchsorted(self._cdf_cat, x, side="right")
            pos = np.clip(pos, self._cat_start[cat], self._cat_end[cat] - 1)
            items[t] = self._by_cat[pos]
        return items, organic


# --- truth tables on disk ------------------------------------------------------------------


def _latent_array(latent: np.ndarray) -> pa.FixedSizeListArray:
    """(n, dim) float64 -> fixed-size list column (reads back in polars as Array(Float64, dim))."""
    n, dim = latent.shape
    return pa.FixedSizeListArray.from_arrays(pa.array(latent.reshape(-1)), dim)


def users_table(world: World) -> pa.Table:
    """Truth table of users (one row per user)."""
    n, p = world.user_pref_categories.shape
    offsets = pa.array(np.arange(0, n * p + 1, p, dtype=np.int32))
    return pa.table(
        {
            "user_id": pa.array(world.user_ids),
            "activity": pa.array(world.user_activity),
            "pref_categories": pa.ListArray.from_arrays(
                offsets, pa.array(world.user_pref_categories.reshape(-1))
            ),
            "pref_weights": pa.ListArray.from_arrays(
                offsets, pa.array(world.user_pref_weights.reshape(-1))
            ),
            "latent": _latent_array(world.user_latent),
        }
    )


def _read_latent(table: pa.Table, column: str) -> np.ndarray:
    """Inverse of ``_latent_array``."""
    col = table.column(column).combine_chunks()
    dim = col.type.list_size
    return col.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)


def _rows_of(ids: np.ndarray, wanted: np.ndarray, what: str) -> np.ndarray:
    """Row numbers of ``wanted`` ids in an id column; unknown ids raise KeyError."""
    order = np.argsort(ids, kind="stable")
    ids_sorted = ids[order]
    pos = np.minimum(np.searchsorted(ids_sorted, wanted), ids_sorted.size - 1)
    bad = ids_sorted[pos] != wanted
    if bad.any():
        raise KeyError(f"unknown {what} ids, e.g. {wanted[bad][:5].tolist()}")
    return order[pos]


def true_affinity(truth_dir: str | Path, user_ids: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
    """True affinity sigmoid(scale * <u, v> + item_bias) for any (user_id, item_id) pairs.

    Recomputed from ``truth/users.parquet``, ``truth/items.parquet`` and ``truth/config.json`` so
    that evaluation can score pairs that were never exposed. Raises KeyError for unknown ids.
    """
    truth = Path(truth_dir)
    meta = json.loads((truth / "config.json").read_text())
    scale = float(meta["config"]["affinity_scale"])
    users = pq.read_table(truth / "users.parquet", columns=["user_id", "latent"])
    items = pq.read_table(truth / "items.parquet", columns=["item_id", "bias", "latent"])
    uid = users.column("user_id").to_numpy()
    iid = items.column("item_id").to_numpy()
    u = np.asarray(user_ids, dtype=np.int64).reshape(-1)
    i = np.asarray(item_ids, dtype=np.int64).reshape(-1)
    if u.shape != i.shape:
        raise ValueError(f"user_ids and item_ids differ in length: {u.size} != {i.size}")
    ur = _rows_of(uid, u, "user")
    ir = _rows_of(iid, i, "item")
    logits = affinity_logit(
        _read_latent(users, "latent"),
        _read_latent(items, "latent"),
        items.column("bias").to_numpy(),
        scale,
        ur,
        ir,
    )
    return sigmoid(logits)

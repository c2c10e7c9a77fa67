"""The logged exposure signal: `is_organic` (as in Yambda) and impression counts.

Where the raw log says whether an event came from the recommender or was organic, the ETL
keeps the flag as a Boolean column (`is_organic`) on the event log and, as any pass-through
column, on the pair tables (the value on the pair's last event). It also counts each pair's
*recommender impressions* in the window, `n_impressions`: events of the shallowest positive
level (a view, a listen) or of an exposure signal that the log marks as not organic. Summed
per item over the train pairs, that is the logged exposure that IPS propensities can come
from instead of the popularity proxy (`model.debias.propensity: exposure`).

Organic-only evaluation (`eval.organic_only`) ranks against the held-out pairs the users
reached on their own: `organic_heldout` keeps a held-out pair when it has an organic positive
event (not cancelled) in the window, with the label the organic events reached, never above
the pair's folded label (a refund or a later dislike still counts).

A log without the flag gets neither column: its outputs are what they always were. Its
logged impression events (signals marked `exposure: true`) are counted by their own
`n_<signal>` columns already, and `item_exposure` reads those.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from recfb.errors import InputError

ORGANIC = "is_organic"
IMPRESSIONS = "n_impressions"
_TRUE = ("true", "t", "yes", "y", "1")
_FALSE = ("false", "f", "no", "n", "0")


def organic_flag(dtype: pl.DataType) -> pl.Expr:
    """`is_organic` as a Boolean whatever it arrived as: a Boolean, a number (non-zero =
    organic, as Yambda's 0/1) or text (true/false, yes/no, 1/0; case-insensitive). Anything
    else reads as null: the event's origin is unknown, so it is neither an organic event nor
    a recommender impression."""
    col = pl.col(ORGANIC)
    if dtype == pl.Boolean:
        return col
    if dtype.is_numeric():
        return (col.cast(pl.Float64) != 0).alias(ORGANIC)
    text = col.cast(pl.String).str.strip_chars().str.to_lowercase()
    return (
        pl.when(text.is_in(_TRUE))
        .then(True)
        .when(text.is_in(_FALSE))
        .then(False)
        .otherwise(None)
        .alias(ORGANIC)
    )


def impression_expr(exposure_codes: list[int]) -> pl.Expr:
    """True on an event the log marks as a recommender impression (see the module
    docstring); needs the canonical `level` and `code` columns and a Boolean `is_organic`."""
    shown = pl.col("level") == 1
    if exposure_codes:
        shown = shown | pl.col("code").is_in(exposure_codes)
    return shown & (pl.col(ORGANIC) == False)  # noqa: E712 (null stays null: not counted)


def item_exposure(
    pairs: pl.DataFrame, n_items: int, exposure_signals: list[str], source: str | None = None
) -> np.ndarray:
    """Logged impressions per item (float64, length n_items) summed over `pairs`: their
    `n_impressions` where the log had `is_organic`, else their impression events' counts
    (`n_<signal>` of the signals marked `exposure: true`). Raises InputError, naming what is
    missing, when the data holds neither."""
    columns = [IMPRESSIONS] if IMPRESSIONS in pairs.columns else []
    if not columns:
        columns = [f"n_{s}" for s in exposure_signals if f"n_{s}" in pairs.columns]
    if not columns:
        raise InputError(
            "exposure propensities (debias.propensity: exposure) need logged exposure, and "
            f"this data has none: no `{ORGANIC}` column in the raw events (from which the ETL "
            f"writes `{IMPRESSIONS}`) and no impression signal (`exposure: true` in the signal "
            "map); use debias.propensity: popularity",
            file=source,
            field=ORGANIC,
        )
    counts = pairs.select(
        "item_idx", pl.sum_horizontal(columns).cast(pl.Float64).alias("_shown")
    ).filter(pl.col("_shown") > 0)
    out = np.zeros(n_items, dtype=np.float64)
    np.add.at(out, counts["item_idx"].to_numpy().astype(np.int64), counts["_shown"].to_numpy())
    return out


def organic_heldout(
    events: pl.LazyFrame, heldout: pl.DataFrame, split: str, source: str | None = None
) -> pl.DataFrame:
    """The held-out pairs of `split` that users reached organically (module docstring):
    label = min(folded label, deepest organic, uncancelled positive level in the window).
    Raises InputError, naming the field, when the event log has no `is_organic`."""
    if ORGANIC not in events.collect_schema().names():
        raise InputError(
            f"eval.organic_only needs the logged exposure flag `{ORGANIC}` in the raw events "
            "(the ETL keeps it in its event log); this data has none: set eval.organic_only: "
            "false",
            file=source,
            field=ORGANIC,
        )
    keys = ["user_idx", "item_idx"]
    organic = (
        events.filter(
            (pl.col("split").cast(pl.String) == split)
            & pl.col(ORGANIC).fill_null(False)
            & (pl.col("level") > 0)
            & pl.col("cancelled_at").is_null()
        )
        .group_by(keys)
        .agg(pl.col("level").max().alias("_organic"))
        .collect()
        .cast({k: heldout.schema[k] for k in keys})
    )
    label = pl.min_horizontal("label", "_organic").cast(heldout.schema["label"]).alias("label")
    return heldout.join(organic, on=keys, how="inner").with_columns(label).drop("_organic")

"""An independent, plain-Python fold of events into pair states, to check the ETL against.

Written from the specification in recfb/etl/aggregate.py and link.py, with loops instead of
dataframes, so that a shared mistake is unlikely.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

HOUR_MS = 3_600_000


@dataclass
class Ev:
    eid: int
    user: int
    item: int
    event: str
    ts: int
    value: float | None = None
    order_id: str | None = None


def link(
    events: list[Ev], cancel_map: dict[str, str], targets_of: dict[int, int] | None = None
) -> dict[int, int]:
    """event id of a cancelled event -> ts of the event that cancelled it; fills
    `targets_of` (cancelling event id -> ts of the event it cancelled) when given."""
    cancelled: dict[int, int] = {}
    targets_of = {} if targets_of is None else targets_of
    for cancel_name, target_name in cancel_map.items():
        by_pair: dict[tuple, list[Ev]] = defaultdict(list)
        for e in events:
            if e.event in (cancel_name, target_name):
                by_pair[(e.user, e.item)].append(e)
        for evs in by_pair.values():
            evs.sort(key=lambda e: (e.ts, e.event == cancel_name))
            targets = [e for e in evs if e.event == target_name]
            cancels = [e for e in evs if e.event == cancel_name]
            claimed: set[int] = set()
            # pass 1: by order id, each cancel (in time order) takes the latest unclaimed
            for c in cancels:
                if c.order_id is None:
                    continue
                options = [
                    t
                    for t in targets
                    if t.order_id == c.order_id and t.ts <= c.ts and t.eid not in claimed
                ]
                if options:
                    claimed.add(options[-1].eid)
                    cancelled[options[-1].eid] = c.ts
                    targets_of[c.eid] = options[-1].ts
            # pass 2: cancels without order id take the latest target not claimed at all
            for c in cancels:
                if c.order_id is not None:
                    continue
                options = [t for t in targets if t.ts <= c.ts and t.eid not in claimed]
                if options:
                    claimed.add(options[-1].eid)
                    cancelled[options[-1].eid] = c.ts
                    targets_of[c.eid] = options[-1].ts
    return cancelled


def fold(
    events: list[Ev],
    signal_map: dict,
    cutoff: int,
    window: tuple[int, int] | None = None,
) -> dict[tuple[int, int], dict]:
    """Pair states as of `cutoff` from the events inside `window` (default: all)."""
    levels = [lv["name"] for lv in signal_map["levels"]]
    sigs = signal_map["signals"]
    att = signal_map.get("attribution", {})
    deepest = levels[-1]
    kept = [
        e
        for e in events
        if not (
            sigs[e.event].get("min_dwell_s") is not None
            and e.value is not None
            and e.value < sigs[e.event]["min_dwell_s"]
        )
    ]
    cancel_map = {n: s["cancels"] for n, s in sigs.items() if "cancels" in s}
    target_ts: dict[int, int] = {}
    cancelled = link(kept, cancel_map, target_ts)
    purchase_names = {n for n, s in sigs.items() if s.get("level") == deepest}
    clock_names = set(att.get("clock_signals", []))
    clocks: dict[tuple, list[int]] = defaultdict(list)
    for e in kept:
        if e.event in clock_names:
            clocks[(e.user, e.item)].append(e.ts)
    lo, hi = window if window else (-(2**62), 2**62)
    pairs: dict[tuple[int, int], list[Ev]] = defaultdict(list)
    for e in kept:
        if lo <= e.ts < hi:
            pairs[(e.user, e.item)].append(e)
    out = {}
    for key, evs in pairs.items():

        def active(e: Ev) -> bool:
            return e.eid not in cancelled or cancelled[e.eid] >= cutoff

        level = 0
        last_pos = last_neg = last_purchase = None
        for e in evs:
            s = sigs[e.event]
            if s.get("level") and active(e):
                level = max(level, levels.index(s["level"]) + 1)
                last_pos = e.ts if last_pos is None else max(last_pos, e.ts)
                if s["level"] == deepest:
                    last_purchase = e.ts if last_purchase is None else max(last_purchase, e.ts)
            if (s.get("negative") and active(e)) or s.get("fallback") == "negative":
                last_neg = e.ts if last_neg is None else max(last_neg, e.ts)
            fb = s.get("fallback")
            if fb and fb != "negative":
                level = max(level, levels.index(fb) + 1)
        negative = last_neg is not None and (last_pos is None or last_neg >= last_pos)
        if negative:
            matured = True
        elif last_purchase is not None:
            matured = last_purchase + att.get("purchase_to_refund_hours", 0) * HOUR_MS <= cutoff
        elif last_pos is not None:
            matured = last_pos + att.get("click_to_purchase_hours", 0) * HOUR_MS <= cutoff
        else:
            matured = True
        counts = {n: sum(e.event == n for e in evs) for n in sigs}
        c2p = None
        for e in sorted(evs, key=lambda e: e.ts):
            before = [t for t in clocks[key] if t <= e.ts]
            if e.event in purchase_names and before:
                c2p = (e.ts - max(before)) / 1000
                break
        p2r = [
            (e.ts - target_ts[e.eid]) / 1000
            for e in evs
            if e.eid in target_ts and sigs[sigs[e.event]["cancels"]].get("level") == deepest
        ]
        out[key] = {
            "level": level,
            "negative": negative,
            "label": -1 if negative else level,
            "matured": matured,
            "counts": counts,
            "first_ts": min(e.ts for e in evs),
            "last_ts": max(e.ts for e in evs),
            "click_to_purchase_s": c2p,
            "purchase_to_refund_s": min(p2r) if p2r else None,
        }
    return out


# --- two-stage features: the earlier dataframe implementation -----------------------------------
# recfb.rank.features computes them with numpy group-bys (one request's rows cost microseconds);
# this is the Polars query the feature set was first written as, kept as an independent check.
def polars_pair_user_features(candidates, events, snap, now_ms: int):
    """The ``pair``, ``user`` and ``category`` groups for `candidates` (``user_idx,
    item_idx``), row for row, as a Polars frame (nulls where missing)."""
    import polars as pl

    hour, day = 3_600_000.0, 86_400_000.0
    pair = ["user_idx", "item_idx"]

    def safe(name: str) -> str:
        return "".join(c if c.isalnum() or c == "_" else "_" for c in name)

    ev = events.lazy().filter(pl.col("user_idx").is_in(candidates["user_idx"].unique().implode()))
    aggs = [(pl.col("event") == s).sum().alias(f"pair_n_{safe(s)}") for s in snap.signal_names]
    aggs += [
        pl.col("level").max().cast(pl.Int32).alias("pair_max_level"),
        pl.len().alias("pair_n_events"),
        ((now_ms - pl.col("ts_ms").min()) / hour).alias("pair_h_since_first"),
    ]
    for t, name in enumerate(snap.level_names, start=1):
        last = pl.col("ts_ms").filter(pl.col("level") == t).max()
        aggs.append(((now_ms - last) / hour).alias(f"pair_h_since_{safe(name)}"))
    users = ev.group_by("user_idx").agg(
        pl.len().alias("user_n_events"),
        pl.col("item_idx").n_unique().alias("user_n_items"),
        (pl.col("ts_ms") >= now_ms - day).sum().alias("user_n_events_1d"),
        (pl.col("level") == snap.n_levels).mean().alias("user_deep_share"),
        ((now_ms - pl.col("ts_ms").max()) / hour).alias("user_h_since_last"),
    )
    plan = candidates.lazy().select(pair).with_row_index("_row")
    plan = plan.join(ev.group_by(pair).agg(aggs), on=pair, how="left")
    plan = plan.join(users, on="user_idx", how="left")
    if snap.category is not None:
        cat = pl.Series("cat", snap.category)
        shares = (
            ev.with_columns(pl.col("item_idx").map_batches(lambda s: cat.gather(s)).alias("cat"))
            .group_by("user_idx", "cat")
            .agg(pl.len().alias("_n"))
            .with_columns(
                (pl.col("_n") / pl.col("_n").sum().over("user_idx")).alias("cat_user_share")
            )
            .select("user_idx", "cat", "cat_user_share")
        )
        plan = plan.with_columns(
            pl.col("item_idx").map_batches(lambda s: cat.gather(s)).alias("cat")
        ).join(shares, on=["user_idx", "cat"], how="left")
    names = plan.collect_schema().names()
    filled = [c for c in names if c.startswith("pair_n_")] + ["pair_max_level", "cat_user_share"]
    return (
        plan.with_columns([pl.col(c).fill_null(0) for c in filled if c in names])
        .sort("_row")
        .collect()
    )


def polars_history_candidates(events, hidden, now_ms: int, n: int):
    """The history source as a Polars query: ``user_idx, item_idx, score, rank``."""
    import polars as pl

    pair = ["user_idx", "item_idx"]
    pairs = (
        events.lazy()
        .filter(pl.col("level") > 0)
        .group_by(pair)
        .agg(pl.col("level").max().alias("_lv"), pl.col("ts_ms").max().alias("_last"))
        .join(hidden.lazy(), on=pair, how="anti")
        .with_columns(
            (
                pl.col("_lv").cast(pl.Float64)
                + pl.lit(0.5).pow((now_ms - pl.col("_last")) / 3_600_000.0 / 24.0)
            ).alias("score")
        )
    )
    return (
        pairs.sort(["user_idx", "score", "item_idx"], descending=[False, True, False])
        .with_columns((pl.int_range(pl.len()).over("user_idx") + 1).alias("rank"))
        .filter(pl.col("rank") <= n)
        .select(*pair, "score", "rank")
        .collect()
    )

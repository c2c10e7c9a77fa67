"""The ETL's pair states, refund links and splits agree with an independent computation."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pytest
import yaml

from conftest import read_out, run
from reference import HOUR_MS, Ev, fold, link

T0 = int(datetime(2026, 3, 1, tzinfo=UTC).timestamp() * 1000)

SIGNAL_MAP = {
    "name": "test-shop",
    "levels": [
        {"name": "view", "weight": 0.5},
        {"name": "click", "weight": 1.0},
        {"name": "engage", "weight": 1.5},
        {"name": "purchase", "weight": 2.0},
    ],
    "signals": {
        "view": {"level": "view"},
        "click": {"level": "click", "min_dwell_s": 3.0},
        "like": {"level": "engage"},
        "cart": {"level": "engage"},
        "purchase": {"level": "purchase"},
        "dislike": {"negative": True},
        "undislike": {"cancels": "dislike"},
        "unlike": {"cancels": "like"},
        "refund": {"cancels": "purchase", "fallback": "negative"},
    },
    "attribution": {
        "clock_signals": ["click"],
        "click_to_purchase_hours": 24,
        "purchase_to_refund_hours": 96,
    },
}
WEIGHTS = {
    "view": 3,
    "click": 3,
    "like": 1,
    "cart": 1,
    "purchase": 2,
    "refund": 1.5,
    "dislike": 1,
    "undislike": 0.5,
    "unlike": 0.5,
}


def random_events(rng: random.Random, n: int, n_users: int = 4, n_items: int = 4) -> list[Ev]:
    names = list(WEIGHTS)
    stamps = rng.sample(range(0, 30 * 24 * HOUR_MS, 60_000), n)  # distinct minutes in 30 days
    events = []
    orders = [f"o{k}" for k in range(6)]
    for eid, ts in enumerate(stamps):
        name = rng.choices(names, weights=list(WEIGHTS.values()))[0]
        value = round(rng.uniform(0, 10), 1) if name == "click" else None
        order = rng.choice(orders + [None, None]) if name in ("purchase", "refund") else None
        events.append(
            Ev(eid, rng.randrange(n_users), rng.randrange(n_items), name, T0 + ts, value, order)
        )
    return events


def write_events(path: Path, events: list[Ev]) -> Path:
    pl.DataFrame(
        {
            "event_id": [e.eid for e in events],
            "user_id": [f"u{e.user}" for e in events],
            "item_id": [f"i{e.item}" for e in events],
            "event": [e.event for e in events],
            "ts": [e.ts for e in events],
            "value": [e.value for e in events],
            "order_id": [e.order_id for e in events],
        },
        schema_overrides={"value": pl.Float64, "order_id": pl.String},
    ).write_parquet(path)
    return path


def write_map(path: Path, smap: dict) -> Path:
    path.write_text(yaml.safe_dump(smap))
    return path


def etl_pairs(tmp_path: Path, table: str) -> dict[tuple[int, int], dict]:
    users = read_out(tmp_path, "users")
    items = read_out(tmp_path, "items")
    pairs = (
        read_out(tmp_path, table)
        .join(users.select("user_idx", "user_id"), on="user_idx")
        .join(items.select("item_idx", "item_id"), on="item_idx")
    )
    out = {}
    for row in pairs.iter_rows(named=True):
        key = (int(row["user_id"][1:]), int(row["item_id"][1:]))
        out[key] = row
    return out


def assert_same(ours: dict, ref: dict, signals: list[str]) -> None:
    assert set(ours) == set(ref)
    for key, r in ref.items():
        o = ours[key]
        assert (o["level"], o["negative"], o["label"], o["matured"]) == (
            r["level"],
            r["negative"],
            r["label"],
            r["matured"],
        ), key
        assert {n: o[f"n_{n}"] for n in signals} == r["counts"], key
        for delay in ("click_to_purchase_s", "purchase_to_refund_s"):
            assert o[delay] == r[delay], (key, delay)
        assert int(o["first_ts"].replace(tzinfo=UTC).timestamp() * 1000) == r["first_ts"]
        assert int(o["last_ts"].replace(tzinfo=UTC).timestamp() * 1000) == r["last_ts"]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("fallback", ["negative", "click", None])
def test_pair_states_match_reference(tmp_path: Path, seed: int, fallback: str | None) -> None:
    smap = yaml.safe_load(yaml.safe_dump(SIGNAL_MAP))
    if fallback is None:
        del smap["signals"]["refund"]["fallback"]
    else:
        smap["signals"]["refund"]["fallback"] = fallback
    events = random_events(random.Random(seed), 400)
    src = write_events(tmp_path / "events.parquet", events)
    run(tmp_path, [src], write_map(tmp_path / "map.yaml", smap), split={"method": "none"})
    end = max(e.ts for e in events) + 1
    ref = fold(events, smap, end)
    assert_same(etl_pairs(tmp_path, "train"), ref, list(smap["signals"]))
    # the random case exercises delays, negatives and immature labels
    assert sum(r["click_to_purchase_s"] is not None for r in ref.values()) >= 3
    assert sum(r["purchase_to_refund_s"] is not None for r in ref.values()) >= 3
    assert not all(r["matured"] for r in ref.values())
    if fallback == "negative":
        assert any(r["negative"] for r in ref.values())


@pytest.mark.parametrize("seed", range(4))
def test_refunds_link_to_the_right_purchases(tmp_path: Path, seed: int) -> None:
    events = random_events(random.Random(100 + seed), 500, n_users=3, n_items=2)
    src = write_events(tmp_path / "events.parquet", events)
    run(tmp_path, [src], write_map(tmp_path / "map.yaml", SIGNAL_MAP), split={"method": "none"})
    kept = [e for e in events if not (e.event == "click" and e.value < 3.0)]
    expected = link(kept, {"refund": "purchase", "unlike": "like", "undislike": "dislike"})
    out = read_out(tmp_path, "events")
    got = {
        int(eid): int(ts.replace(tzinfo=UTC).timestamp() * 1000)
        for eid, ts in out.filter(pl.col("cancelled_at").is_not_null())
        .select("event_id", "cancelled_at")
        .iter_rows()
    }
    assert got == expected
    assert sum(1 for e in kept if e.event == "refund") > 10  # the case exercises refunds


def test_temporal_split_folds_each_window_as_of_its_cut(tmp_path: Path) -> None:
    events = random_events(random.Random(7), 600)
    src = write_events(tmp_path / "events.parquet", events)
    stats = run(
        tmp_path,
        [src],
        write_map(tmp_path / "map.yaml", SIGNAL_MAP),
        split={"method": "temporal", "valid_frac": 0.2, "test_frac": 0.2},
    )
    kept = [e for e in events if not (e.event == "click" and e.value < 3.0)]
    stamps = sorted(e.ts for e in kept)
    # the cut is the quantile of the used events' time: 60% before valid, 80% before test
    valid_ms = stamps[int(0.6 * (len(stamps) - 1))]
    test_ms = stamps[int(0.8 * (len(stamps) - 1))]
    end = stamps[-1] + 1
    windows = {"train": (stamps[0], valid_ms), "valid": (valid_ms, test_ms), "test": (test_ms, end)}
    seen: set = set()
    for split, (lo, hi) in windows.items():
        ref = fold(events, SIGNAL_MAP, hi, window=(lo, hi))
        ours = etl_pairs(tmp_path, split)
        assert_same(ours, ref, list(SIGNAL_MAP["signals"]))
        assert {k for k, r in ours.items() if r["seen_before"]} == set(ref) & seen
        seen |= set(ref)
    assert stats["splits"]["train"]["events"] == sum(e.ts < valid_ms for e in kept)


def test_leave_last_out_holds_out_each_users_latest_positive(tmp_path: Path) -> None:
    events = random_events(random.Random(11), 500, n_users=5, n_items=8)
    src = write_events(tmp_path / "events.parquet", events)
    run(
        tmp_path,
        [src],
        write_map(tmp_path / "map.yaml", SIGNAL_MAP),
        split={"method": "leave_last_out"},
    )
    end = max(e.ts for e in events) + 1
    ref = fold(events, SIGNAL_MAP, end)
    test, valid = etl_pairs(tmp_path, "test"), etl_pairs(tmp_path, "valid")
    train = etl_pairs(tmp_path, "train")
    assert set(test) | set(valid) | set(train) == set(ref)
    for user in {u for u, _ in ref}:
        positives = sorted(
            ((r["last_ts"], i) for (u, i), r in ref.items() if u == user and r["label"] > 0),
            reverse=True,
        )
        if len(positives) >= 2:
            assert (user, positives[0][1]) in test
        if len(positives) >= 3:
            assert (user, positives[1][1]) in valid
        assert sum(1 for u, _ in test if u == user) <= 1


def test_vocabulary_is_stable_across_runs(tmp_path: Path) -> None:
    rng = random.Random(3)
    first = random_events(rng, 200, n_users=5, n_items=5)
    src = write_events(tmp_path / "a.parquet", first)
    smap = write_map(tmp_path / "map.yaml", SIGNAL_MAP)
    run(tmp_path, [src], smap, split={"method": "none"})
    users1 = read_out(tmp_path, "users")
    # second run: the old users plus new ones, in a different order
    second = [
        Ev(e.eid + 10_000, e.user + 3, e.item, e.event, e.ts, e.value, e.order_id) for e in first
    ]
    src2 = write_events(tmp_path / "b.parquet", second)
    run(tmp_path, [src2], smap, split={"method": "none"})
    users2 = read_out(tmp_path, "users")
    assert users2.head(users1.height).equals(users1)
    assert set(users2["user_id"]) == {f"u{k}" for k in range(8)}
    assert users2["user_idx"].to_list() == list(range(users2.height))


def test_the_quantile_rank_a_sharded_engine_looks_up_is_polars_lower_quantile():
    """`lower_rank` (what the Ray engine's cut points look up by counting) picks the value
    Polars' own `quantile(interpolation="lower")` returns, for the fractions splits use."""
    from recfb.etl.split import lower_rank

    rng = random.Random(7)
    for n in [1, 2, 3, 10, 99, 1_000, 65_537]:
        values = pl.Series([rng.randrange(10**9) for _ in range(n)])
        ordered = values.sort()
        for q in (0.0, 0.5, 0.7, 0.8, 0.85, 0.9, 0.95, 0.998, 0.999, 1.0):
            assert ordered[lower_rank(q, n)] == values.quantile(q, interpolation="lower")

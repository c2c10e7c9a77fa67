"""The logged exposure signal: the ETL keeps `is_organic`, counts recommender impressions per
pair, and IPS propensities follow those logged counts when asked (`debias.propensity`)."""

from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np
import polars as pl
import pytest
import torch

import recfb
from recfb.config import build_model
from recfb.errors import InputError
from recfb.models.mf import MatrixFactorization
from recfb.train.config import TrainConfig
from recfb.train.fit import build_model as build_recommender

from conftest import CONF

SIGNALS = CONF / "signals" / "simulator.yaml"
T0 = datetime(2026, 1, 1)


def _raw(n: int = 3_000, seed: int = 0, organic_as: str = "int") -> pl.DataFrame:
    """Random views, clicks and purchases of 60 users on 40 items with a 0/1 organic flag
    (as Yambda writes it); item popularity and organic share differ by item."""
    rng = np.random.default_rng(seed)
    items = rng.zipf(1.6, n) % 40
    organic = (rng.random(n) < 0.2 + 0.6 * (items % 3 == 0)).astype(np.int64)
    frame = pl.DataFrame(
        {
            "user_id": rng.integers(0, 60, n),
            "item_id": items,
            "event": rng.choice(["view", "view", "view", "click", "purchase"], n),
            # distinct times: no row is a duplicate the ETL would drop
            "ts": [T0 + timedelta(minutes=int(m)) for m in rng.permutation(50_000)[:n]],
            "event_id": np.arange(n),
            "is_organic": organic,
        }
    )
    if organic_as == "text":
        frame = frame.with_columns(
            pl.col("is_organic").replace_strict({0: "False", 1: "TRUE"}, return_dtype=pl.String)
        )
    return frame


def _impressions_by_polars(raw: pl.DataFrame, flag: pl.Expr) -> pl.DataFrame:
    """The expected impression counts, straight from the raw rows: non-organic views."""
    return (
        raw.filter((pl.col("event") == "view") & ~flag)
        .group_by("user_id", "item_id")
        .len("expected")
    )


def _item_impressions_by_polars(raw: pl.DataFrame, data) -> np.ndarray:
    """The expected impressions per item index (0 for items never shown), from the raw rows."""
    shown = (
        _impressions_by_polars(raw, pl.col("is_organic") == 1)
        .group_by("item_id")
        .agg(pl.col("expected").sum())
        .join(data.items.select(pl.col("item_id").cast(pl.Int64), "item_idx"), on="item_id")
    )
    counts = np.zeros(data.n_items)
    counts[shown["item_idx"].to_numpy()] = shown["expected"].to_numpy()
    return counts


@pytest.mark.parametrize("organic_as", ["int", "text"])
def test_etl_keeps_the_flag_and_counts_non_organic_views_per_pair(organic_as: str):
    raw = _raw(organic_as=organic_as)
    data = recfb.etl.run(raw, SIGNALS, split={"method": "none"})
    events = data.events.collect()
    assert events.schema["is_organic"] == pl.Boolean
    flag = pl.col("is_organic") == (1 if organic_as == "int" else "TRUE")
    assert events["is_organic"].sum() == raw.filter(flag).height
    pairs = (
        data.train.join(data.users, on="user_idx")
        .join(data.items, on="item_idx")
        .select(pl.col("user_id").cast(pl.Int64), pl.col("item_id").cast(pl.Int64), "n_impressions")
    )
    expected = _impressions_by_polars(raw, flag)
    joined = pairs.join(expected, on=["user_id", "item_id"], how="left").with_columns(
        pl.col("expected").fill_null(0)
    )
    assert joined.height == raw.select("user_id", "item_id").unique().height
    assert (joined["n_impressions"] == joined["expected"]).all()
    assert joined["expected"].sum() > 500  # the test compares something


def test_a_log_without_the_flag_gets_no_exposure_columns_and_a_clear_error():
    raw = _raw().drop("is_organic")
    data = recfb.etl.run(raw, SIGNALS, split={"method": "none"})
    assert "n_impressions" not in data.train.columns
    assert "is_organic" not in data.events.collect_schema().names()
    with pytest.raises(InputError, match="is_organic.*debias.propensity"):
        data.item_exposure()


def test_item_exposure_sums_the_logged_impressions_per_item():
    raw = _raw(seed=1)
    data = recfb.etl.run(raw, SIGNALS, split={"method": "none"})
    got = data.item_exposure()
    assert np.array_equal(got, _item_impressions_by_polars(raw, data))


def test_impression_signals_give_the_exposure_where_there_is_no_flag():
    spec = {
        "name": "with impressions",
        "levels": [{"name": "click"}, {"name": "purchase"}],
        "signals": {
            "impression": {"exposure": True},
            "click": {"level": "click"},
            "purchase": {"level": "purchase"},
        },
    }
    raw = (
        _raw(seed=2)
        .drop("is_organic")
        .with_columns(pl.col("event").replace({"view": "impression"}))
    )
    data = recfb.etl.run(raw, spec, split={"method": "none"})
    counts = raw.filter(pl.col("event") == "impression").group_by("item_id").len()
    idx = data.items.select(pl.col("item_id").cast(pl.Int64), "item_idx")
    counts = counts.join(idx, on="item_id")
    want = np.zeros(data.n_items)
    want[counts["item_idx"].to_numpy()] = counts["len"].to_numpy()
    assert np.array_equal(data.item_exposure(), want)


def _train_config(propensity: str) -> TrainConfig:
    return build_model(
        TrainConfig,
        {
            "model": {"family": "mf", "dim": 8},
            "debias": {"ips": True, "propensity": propensity, "eta": 0.5, "clip": 0.05},
        },
        "test",
    )


def test_exposure_propensities_follow_the_logged_impressions_not_popularity():
    raw = _raw(seed=3, n=6_000)
    data = recfb.etl.run(raw, SIGNALS, split={"method": "none"})
    by_exposure = build_recommender(_train_config("exposure"), data).propensity.numpy()
    by_popularity = build_recommender(_train_config("popularity"), data).propensity.numpy()
    counts = _item_impressions_by_polars(raw, data)
    want = np.clip(np.sqrt(counts / counts.max()), 0.05, None)
    assert np.allclose(by_exposure, want, rtol=1e-5)
    assert not np.allclose(by_popularity, want, rtol=1e-2)  # the proxy is another number


def test_exposure_propensities_without_logged_exposure_fail_naming_the_field():
    data = recfb.etl.run(_raw().drop("is_organic"), SIGNALS, split={"method": "none"})
    with pytest.raises(InputError, match="is_organic"):
        build_recommender(_train_config("exposure"), data)
    cfg = _train_config("exposure").embedding_settings().model_dump(mode="json")
    pairs = {"pos_users": torch.zeros(1, dtype=torch.long)}
    with pytest.raises(ValueError, match="propensity=exposure"):
        MatrixFactorization(3, 4, 2, cfg, train_pairs=pairs)


def test_default_propensity_is_the_popularity_proxy():
    cfg = build_model(TrainConfig, {"debias": {"ips": True}}, "test")
    assert cfg.debias.propensity == "popularity"
    pop = torch.tensor([0.0, 1.0, 4.0, 16.0])
    model = MatrixFactorization(
        2,
        4,
        1,
        cfg.embedding_settings().model_dump(mode="json"),
        item_popularity=pop,
        item_exposure=torch.ones(4),
    )
    assert torch.allclose(model.propensity, torch.tensor([0.5, 0.5, 0.5, 1.0]))


def _level(event: pl.Expr) -> pl.Expr:
    """The simulator signal map's levels: view 1, click 2, purchase 4."""
    return event.replace_strict({"view": 1, "click": 2, "purchase": 4}, return_dtype=pl.Int8)


def test_organic_only_evaluation_keeps_exactly_the_organic_test_pairs():
    from recfb.etl.exposure import organic_heldout

    raw = _raw(seed=4, n=8_000)
    data = recfb.etl.run(raw, SIGNALS, split={"method": "temporal", "test_frac": 0.3})
    test_start = datetime.fromisoformat(data.stats["split"]["test_start"])
    expected = (
        raw.filter((pl.col("ts") >= test_start) & (pl.col("is_organic") == 1))
        .group_by("user_id", "item_id")
        .agg(_level(pl.col("event")).max().alias("label"))
        .sort("user_id", "item_id")
    )
    got = (
        organic_heldout(data.events, data.test, "test")
        .join(data.users, on="user_idx")
        .join(data.items, on="item_idx")
        .select(
            pl.col("user_id").cast(pl.Int64),
            pl.col("item_id").cast(pl.Int64),
            pl.col("label").cast(pl.Int8),
        )
        .sort("user_id", "item_id")
    )
    assert expected.height > 300
    assert got.height < data.test.height  # recommender-only pairs were left out
    assert got.equals(expected)


def test_organic_only_evaluation_changes_the_metrics_and_fails_without_the_flag():
    from recfb.train.loop import fit_model

    cfg = build_model(
        TrainConfig,
        {"model": {"family": "popularity"}, "eval": {"organic_only": True}},
        "test",
    )
    split = {"method": "temporal", "test_frac": 0.3}
    # a third of the users only ever act on recommendations: no organic pair to rank for
    raw = _raw(seed=5, n=8_000).with_columns(
        pl.when(pl.col("user_id") < 20).then(0).otherwise(pl.col("is_organic")).alias("is_organic")
    )
    data = recfb.etl.run(raw, SIGNALS, split=split)
    organic = fit_model(cfg, data).metrics
    everything = fit_model(
        cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"organic_only": False})}), data
    ).metrics
    assert everything["test/n_users"] > 50
    assert 0 < organic["test/n_users"] <= 40
    no_flag = recfb.etl.run(raw.drop("is_organic"), SIGNALS, split=split)
    with pytest.raises(InputError, match="eval.organic_only.*is_organic|is_organic.*organic_only"):
        fit_model(cfg, no_flag)


def test_the_service_event_log_passes_the_flag_to_the_etl(tmp_path):
    """Events posted with `is_organic` (the closed loop does) reach the ETL's impression
    counts when the ETL reads the service's SQLite log; a log where no event carried the flag
    reads as one without it."""
    from recfb.serving.eventlog import EventLog

    raw = _raw(n=800)
    ts_ms = raw["ts"].dt.epoch("ms")
    rows = [
        (str(e), str(u), str(i), ev, int(t), None, None, bool(o))
        for e, u, i, ev, t, o in zip(
            raw["event_id"],
            raw["user_id"],
            raw["item_id"],
            raw["event"],
            ts_ms,
            raw["is_organic"],
            strict=True,
        )
    ]
    flagged, unflagged = tmp_path / "flagged.db", tmp_path / "unflagged.db"
    for path, batch in ((flagged, rows), (unflagged, [r[:7] for r in rows])):
        log = EventLog(path)
        assert log.append(batch) == len(batch)
        log.close()

    data = recfb.etl.run([flagged], SIGNALS, split={"method": "none"})
    pairs = (
        data.train.join(data.users, on="user_idx")
        .join(data.items, on="item_idx")
        .select(pl.col("user_id").cast(pl.Int64), pl.col("item_id").cast(pl.Int64), "n_impressions")
    )
    expected = _impressions_by_polars(raw, pl.col("is_organic") == 1)
    joined = pairs.join(expected, on=["user_id", "item_id"], how="left").with_columns(
        pl.col("expected").fill_null(0)
    )
    assert (joined["n_impressions"] == joined["expected"]).all()
    assert joined["expected"].sum() > 100

    plain = recfb.etl.run([unflagged], SIGNALS, split={"method": "none"})
    assert "n_impressions" not in plain.train.columns

"""Tests of the implicit-feedback simulator: determinism, schema, and that the ground truth
really drives the log (affinity -> funnel, popularity -> exposure, noise labels, censoring)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pydantic
import pytest

from recfb.simulate import (
    EVENT_TYPES,
    DelaySpec,
    SimConfig,
    SimResult,
    simulate,
    true_affinity,
)

SMALL = {"n_users": 3_000, "n_items": 800, "n_events": 150_000, "chunk_events": 40_000}
BASE = SimConfig(seed=7, noise_positive_share=0.2, duplicate_rate=0.03, **SMALL)
TINY = {"n_users": 400, "n_items": 150, "n_events": 15_000, "chunk_events": 4_000}

EVENTS_DTYPES = {
    "event_id": pl.Int64,
    "user_id": pl.Int64,
    "item_id": pl.Int64,
    "event": pl.String,
    "ts": pl.Datetime("ms"),
    "value": pl.Float64,
    "order_id": pl.String,
    "category": pl.Int32,
    "is_organic": pl.Boolean,
}


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> SimResult:
    return simulate(BASE, tmp_path_factory.mktemp("sim") / "out")


@pytest.fixture(scope="module")
def rows(sim: SimResult) -> pl.DataFrame:
    """Every written row, duplicates included."""
    return pl.read_parquet(sim.events_dir / "*.parquet")


@pytest.fixture(scope="module")
def events(rows: pl.DataFrame, sim: SimResult) -> pl.DataFrame:
    """Unique emitted events joined with their truth."""
    truth = pl.read_parquet(sim.truth_dir / "events.parquet")
    return rows.unique(maintain_order=True).join(truth, on="event_id", how="inner")


@pytest.fixture(scope="module")
def items(sim: SimResult) -> pl.DataFrame:
    return pl.read_parquet(sim.truth_dir / "items.parquet")


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.parquet"))}


def _quintile_rates(pairs: pl.DataFrame, num: str, den: str) -> np.ndarray:
    """Ratio sum(num) / sum(den) per quintile of the pair's true affinity."""
    aff = pairs["true_affinity"].to_numpy()
    rank = np.argsort(np.argsort(aff, kind="stable"), kind="stable")
    quint = rank * 5 // aff.size
    n, d = pairs[num].to_numpy(), pairs[den].to_numpy()
    return np.array([n[quint == q].sum() / d[quint == q].sum() for q in range(5)])


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path: Path) -> None:
    cfg = SimConfig(seed=3, duplicate_rate=0.05, noise_positive_share=0.1, **TINY)
    a = simulate(cfg, tmp_path / "a")
    b = simulate(cfg, tmp_path / "b")
    c = simulate(cfg.model_copy(update={"seed": 4}), tmp_path / "c")
    assert len(a.parts) > 1  # several chunks, so per-chunk seeding is exercised
    assert _tree_bytes(a.out_dir) == _tree_bytes(b.out_dir)
    assert (a.n_rows, a.event_counts, a.noise_counts) == (b.n_rows, b.event_counts, b.noise_counts)
    ev_a = pl.read_parquet(a.events_dir / "*.parquet")
    ev_c = pl.read_parquet(c.events_dir / "*.parquet")
    assert not ev_a.equals(ev_c)


def test_schema_is_exact(rows: pl.DataFrame, sim: SimResult) -> None:
    assert dict(rows.schema) == EVENTS_DTYPES
    assert set(rows["event"].unique()) == set(EVENT_TYPES)
    truth = pl.read_parquet(sim.truth_dir / "events.parquet")
    assert dict(truth.schema) == {
        "event_id": pl.Int64,
        "noise": pl.String,
        "p_purchase": pl.Float64,
        "p_refund": pl.Float64,
        "true_affinity": pl.Float64,
    }
    items = pl.read_parquet(sim.truth_dir / "items.parquet")
    for col in (
        "item_id",
        "category",
        "popularity",
        "price",
        "bias",
        "cvr_logit",
        "refund_logit",
        "latent",
        "true_cvr",
        "true_refund_rate",
        "true_netcvr",
        "n_clicks_simulated",
    ):
        assert col in items.columns
    users = pl.read_parquet(sim.truth_dir / "users.parquet")
    assert {"user_id", "activity", "latent"} <= set(users.columns)
    meta = json.loads((sim.truth_dir / "config.json").read_text())
    assert SimConfig.model_validate(meta["config"]) == BASE
    assert meta["end"] == "2026-01-31T00:00:00.000"


def test_counts_near_target_and_match_files(
    sim: SimResult, rows: pl.DataFrame, events: pl.DataFrame
) -> None:
    assert abs(sim.n_rows - 150_000) / 150_000 < 0.1
    assert sim.n_rows == rows.height
    assert sim.n_events == events.height == rows["event_id"].n_unique()
    counts = dict(events.group_by("event").len().iter_rows())
    assert counts == {k: v for k, v in sim.event_counts.items() if v}
    assert (
        sim.noise_counts["random_positive"]
        == events.filter(pl.col("noise") == "random_positive").height
    )
    assert len(sim.parts) > 1


def test_duplicates_are_identical_resends(sim: SimResult, rows: pl.DataFrame) -> None:
    dup_ids = rows.group_by("event_id").len().filter(pl.col("len") > 1)
    assert dup_ids["len"].max() == 2
    assert dup_ids.height == sim.n_duplicates
    assert abs(sim.n_duplicates / sim.n_events - 0.03) < 0.005
    assert rows.unique().height == sim.n_events  # same id => same content


def test_ids_and_categories_come_from_the_truth(events: pl.DataFrame, sim: SimResult) -> None:
    users = pl.read_parquet(sim.truth_dir / "users.parquet")
    items = pl.read_parquet(sim.truth_dir / "items.parquet")
    assert events["user_id"].is_in(users["user_id"].implode()).all()
    joined = events.join(items.select("item_id", pl.col("category").alias("c")), on="item_id")
    assert joined.height == events.height
    assert (joined["category"] == joined["c"]).all()
    # ids are sparse on purpose, not row numbers
    assert users["user_id"].max() > users.height


def test_refunds_follow_their_purchase(events: pl.DataFrame, items: pl.DataFrame) -> None:
    buys = events.filter(pl.col("event") == "purchase")
    refunds = events.filter(pl.col("event") == "refund")
    assert buys.height > 100 and refunds.height > 5
    assert buys["order_id"].null_count() == 0
    assert buys["order_id"].n_unique() == buys.height
    assert refunds["order_id"].null_count() == 0
    others = events.filter(~pl.col("event").is_in(["purchase", "refund"]))
    assert others["order_id"].null_count() == others.height
    j = refunds.join(buys, on="order_id", suffix="_p")
    assert j.height == refunds.height
    assert (j["user_id"] == j["user_id_p"]).all()
    assert (j["item_id"] == j["item_id_p"]).all()
    assert (j["ts"] > j["ts_p"]).all()
    priced = buys.join(items.select("item_id", "price"), on="item_id")
    assert (priced["value"] == priced["price"]).all()


def test_values_by_event_type(events: pl.DataFrame) -> None:
    with_value = events.filter(pl.col("value").is_not_null())["event"].unique().to_list()
    assert sorted(with_value) == ["click", "purchase"]
    assert events.filter(pl.col("event").is_in(["click", "purchase"]))["value"].null_count() == 0


def test_nothing_emitted_after_window_end(events: pl.DataFrame, sim: SimResult) -> None:
    start, end = np.datetime64(sim.start, "ms"), np.datetime64(sim.end, "ms")
    ts = events["ts"].to_numpy()
    assert ts.min() >= start and ts.max() < end
    cens = pl.read_parquet(sim.truth_dir / "censored.parquet")
    assert cens.height == sim.n_censored
    assert (cens["ts"].to_numpy() >= end).all()


def test_right_censoring_drops_late_purchases(tmp_path: Path) -> None:
    cfg = SimConfig(
        days=3.0,
        purchase_delay=DelaySpec(distribution="exponential", median_hours=36.0),
        refund_delay=DelaySpec(distribution="lognormal", median_hours=24.0, shape=0.5),
        **TINY,
    )
    res = simulate(cfg, tmp_path / "c")
    cens = pl.read_parquet(res.truth_dir / "censored.parquet")
    ev = pl.read_parquet(res.events_dir / "*.parquet")
    n_buy_censored = cens.filter(pl.col("event") == "purchase").height
    assert n_buy_censored > 0.2 * (n_buy_censored + res.event_counts["purchase"])
    # a refund is observed only if its purchase is
    buys = ev.filter(pl.col("event") == "purchase")["order_id"].implode()
    assert ev.filter(pl.col("event") == "refund")["order_id"].is_in(buys).all()
    cens_refunds = cens.filter(pl.col("event") == "refund")
    assert not cens_refunds["order_id"].is_in(buys).all()


def test_funnel_rates_increase_with_true_affinity(events: pl.DataFrame) -> None:
    key = ["user_id", "item_id"]
    views = (
        events.filter(pl.col("event") == "view")
        .group_by(key)
        .agg(pl.len().alias("views"), pl.col("true_affinity").first())
    )
    clicks = events.filter(pl.col("event") == "click").group_by(key).len("clicks")
    buys = events.filter(pl.col("event") == "purchase").group_by(key).len("buys")
    pairs = views.join(clicks, on=key, how="left").join(buys, on=key, how="left").fill_null(0)
    ctr = _quintile_rates(pairs, "clicks", "views")  # noisy clicks blur the bottom quintiles
    assert ctr[4] > 2 * ctr[0], ctr
    # without the noise (accidental clicks, random positives) the signal is much sharper
    clean = events.filter(pl.col("noise").is_null())
    real = clean.filter(pl.col("event") == "click").group_by(key).len("real")
    views_clean = clean.filter(pl.col("event") == "view").group_by(key).len("clean_views")
    pairs = pairs.join(real, on=key, how="left").join(views_clean, on=key, how="left")
    pairs = pairs.fill_null(0).filter(pl.col("clean_views") > 0)
    real_ctr = _quintile_rates(pairs, "real", "clean_views")
    assert (np.diff(real_ctr) > 0).all() and real_ctr[4] > 5 * real_ctr[0], real_ctr
    cvr = _quintile_rates(pairs.filter(pl.col("clicks") > 0), "buys", "clicks")
    assert cvr[4] > 2 * cvr[0], cvr


def test_exposure_is_popularity_biased(
    events: pl.DataFrame, items: pl.DataFrame, tmp_path: Path
) -> None:
    def top_decile_share(ev: pl.DataFrame, it: pl.DataFrame) -> float:
        top = it.sort("popularity", descending=True).head(it.height // 10)["item_id"].implode()
        views = ev.filter(pl.col("event") == "view")
        return views["item_id"].is_in(top).mean()

    biased = top_decile_share(events, items)
    assert biased > 0.4
    flat = simulate(SimConfig(popularity_exponent=0.0, **SMALL), tmp_path / "flat")
    share_flat = top_decile_share(
        pl.read_parquet(flat.events_dir / "*.parquet"),
        pl.read_parquet(flat.truth_dir / "items.parquet"),
    )
    assert share_flat < 0.25 < biased - 0.15
    assert flat.noise_counts["random_positive"] == 0


def test_accidental_clicks_are_short_and_genuine_ones_long(events: pl.DataFrame) -> None:
    clicks = events.filter(pl.col("event") == "click")
    acc = clicks.filter(pl.col("noise") == "accidental_click")["value"]
    real = clicks.filter(pl.col("noise").is_null())["value"]
    assert acc.len() > 1000 and real.len() > 1000
    assert (acc < 3.0).mean() > 0.9
    assert (real >= 3.0).mean() > 0.9
    assert (acc.to_numpy() > 0).all()


def test_noise_positive_share_is_respected(events: pl.DataFrame) -> None:
    clicks = events.filter(pl.col("event") == "click")
    share = clicks["noise"].eq_missing("random_positive").mean()
    assert abs(share - 0.2) < 0.03, share
    # random positives carry a normal funnel: they also buy
    rp_buys = events.filter(
        (pl.col("event") == "purchase") & (pl.col("noise") == "random_positive")
    )
    assert rp_buys.height > 0


def test_truth_events_cover_exactly_the_emitted_events(
    events: pl.DataFrame, rows: pl.DataFrame, sim: SimResult
) -> None:
    truth = pl.read_parquet(sim.truth_dir / "events.parquet")
    assert truth.height == truth["event_id"].n_unique() == rows["event_id"].n_unique()
    assert events.height == truth.height
    is_click = events["event"] == "click"
    assert (events["p_purchase"].is_not_null() == is_click).all()
    assert (events["p_refund"].is_not_null() == (events["event"] == "purchase")).all()
    acc = events.filter(pl.col("noise") == "accidental_click")
    assert (acc["event"] == "click").all() and (acc["p_purchase"] == 0).all()


def test_true_affinity_recomputes_the_truth(events: pl.DataFrame, sim: SimResult) -> None:
    sample = events.sample(3_000, seed=1)
    got = true_affinity(sim.truth_dir, sample["user_id"].to_numpy(), sample["item_id"].to_numpy())
    np.testing.assert_allclose(got, sample["true_affinity"].to_numpy(), rtol=1e-12, atol=0)
    with pytest.raises(KeyError):
        true_affinity(sim.truth_dir, np.array([-5]), sample["item_id"].to_numpy()[:1])


def test_item_true_rates_match_an_independent_recomputation(
    events: pl.DataFrame, items: pl.DataFrame, sim: SimResult
) -> None:
    cens = pl.read_parquet(sim.truth_dir / "censored.parquet")
    cols = ["item_id", "event", "p_purchase", "p_refund"]
    every = pl.concat([events.select(cols), cens.select(cols)])
    cvr = (
        every.filter(pl.col("event") == "click")
        .group_by("item_id")
        .agg(pl.col("p_purchase").mean().alias("cvr"), pl.len().alias("n"))
    )
    ref = (
        every.filter(pl.col("event") == "purchase")
        .group_by("item_id")
        .agg(pl.col("p_refund").mean().alias("ref"))
    )
    j = items.join(cvr, on="item_id", how="left").join(ref, on="item_id", how="left")
    assert j.filter(pl.col("n").is_not_null()).height > 0.7 * items.height
    np.testing.assert_allclose(
        j["true_cvr"].to_numpy(), j["cvr"].to_numpy(), rtol=1e-9, equal_nan=True
    )
    np.testing.assert_allclose(
        j["true_refund_rate"].to_numpy(), j["ref"].to_numpy(), rtol=1e-9, equal_nan=True
    )
    assert (j["n_clicks_simulated"] == j["n"].fill_null(0)).all()
    net = j["true_cvr"] * (1 - j["true_refund_rate"])
    np.testing.assert_allclose(j["true_netcvr"].to_numpy(), net.to_numpy(), equal_nan=True)
    # per-item conversion genuinely differs between items
    assert j["true_cvr"].drop_nulls().std() > 0.01


def test_organic_share(events: pl.DataFrame) -> None:
    views = events.filter(pl.col("event") == "view")
    assert abs(views["is_organic"].mean() - 0.3) < 0.02


def test_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    out = tmp_path / "o"
    out.mkdir()  # an empty directory is fine to fill
    first = simulate(SimConfig(**TINY), out)
    with pytest.raises(FileExistsError):
        simulate(SimConfig(**TINY), out)
    seen: list[int] = []
    second = simulate(SimConfig(seed=1, **TINY), out, progress=seen.append, overwrite=True)
    assert seen == sorted(seen) and seen[-1] == second.n_rows
    assert first.n_rows != second.n_rows
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]  # no temp dirs left behind
    assert json.loads((out / "truth" / "config.json").read_text())["config"]["seed"] == 1


def test_config_is_strict_and_delays_have_their_median() -> None:
    with pytest.raises(pydantic.ValidationError):
        SimConfig(n_event=10)  # typo
    with pytest.raises(pydantic.ValidationError):
        SimConfig(start="not a date")
    with pytest.raises(pydantic.ValidationError):
        DelaySpec(distribution="gamma")
    rng = np.random.default_rng(0)
    for dist in ("exponential", "weibull", "lognormal"):
        spec = DelaySpec(distribution=dist, median_hours=5.0, shape=1.7)
        med = np.median(spec.sample_seconds(rng, 200_000)) / 3600
        assert abs(med - 5.0) < 0.1, dist
    assert SimConfig(start="2026-01-01T01:00:00+01:00").start_iso() == "2026-01-01T00:00:00.000"


def test_failure_leaves_nothing_behind(tmp_path: Path) -> None:
    def boom(_: int) -> None:
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        simulate(SimConfig(**TINY), tmp_path / "x", progress=boom)
    assert list(tmp_path.iterdir()) == []  # neither out_dir nor a temp dir


def test_uniform_noise_positives_ignore_popularity(tmp_path: Path) -> None:
    """With noise_positive_items=uniform, preference-free clicks spread over the catalogue."""
    shares = {}
    for mode in ("popularity", "uniform"):
        cfg = SimConfig(
            seed=4,
            n_users=800,
            n_items=400,
            n_events=60_000,
            noise_positive_share=0.3,
            noise_positive_items=mode,
        )
        res = simulate(cfg, tmp_path / mode)
        ev = pl.read_parquet(res.events_dir).join(
            pl.read_parquet(res.truth_dir / "events.parquet"), on="event_id"
        )
        items = pl.read_parquet(res.truth_dir / "items.parquet")
        top = items.sort("popularity", descending=True).head(40)["item_id"]  # top 10%
        noisy = ev.filter((pl.col("event") == "click") & (pl.col("noise") == "random_positive"))
        shares[mode] = noisy["item_id"].is_in(top.implode()).mean()
    assert shares["uniform"] < 0.2 < shares["popularity"], shares

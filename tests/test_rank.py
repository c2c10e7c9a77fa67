"""Two-stage recommendation: the exclusion rule, the leave-last-buy split, snapshots, the
offline two-stage list against its own sources, and online features against offline ones."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recfb.etl.signals import exclusion_labels, load_signal_map
from recfb.rank.config import RankConfig
from recfb.rank.state import cut_points, snapshot_at

from conftest import CONF, read_out, run, shared_file

# the Taobao adapter and the log's valid time range (earlier and later stamps are corrupt)
TAOBAO_INPUT = {
    "adapter": "taobao",
    "min_ts": "2017-11-24T16:00:00",
    "max_ts": "2017-12-03T16:00:00",
}


def test_exclusion_rule_hides_bought_and_negatives_but_keeps_views_and_carts():
    spec = load_signal_map(CONF / "signals" / "simulator.yaml").model_dump(mode="json")
    assert exclusion_labels(spec) == (-1, 4)  # purchase is level 4 of 4
    spec["levels"][3]["repeats"] = True  # groceries: buying again is fine
    assert exclusion_labels(spec) == (-1,)
    spec["levels"][1]["repeats"] = False  # clicked items are not shown again
    assert exclusion_labels(spec) == (-1, 2)
    films = load_signal_map(CONF / "signals" / "movielens.yaml")
    assert films.hidden_labels() == (-1, 1, 2, 3)


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from recfb.simulate import SimConfig, simulate

    base = tmp_path_factory.mktemp("rank")
    simulate(SimConfig(seed=3, n_users=800, n_items=300, n_events=60_000), base / "sim")
    run(base, [base / "sim" / "events"], CONF / "signals" / "simulator.yaml")
    return base / "out"


def test_snapshot_fold_matches_the_etl_fold(shop: Path):
    """The fold at a cut the ETL did not make agrees with the ETL's own train table at the
    valid cut: the same labels, refunds and dislikes included."""
    stats = json.loads((shop / "stats.json").read_text())
    valid_ms, _, _ = cut_points(stats)
    snap = snapshot_at(shop, valid_ms)
    train = pl.read_parquet(shop / "train.parquet").select(
        pl.col("user_idx").cast(pl.Int64), pl.col("item_idx").cast(pl.Int64), "label"
    )
    assert (train["label"] == -1).sum() > 0 and (train["label"] == 4).sum() > 0
    joined = train.join(snap.pairs, on=["user_idx", "item_idx"], how="full", coalesce=True)
    assert joined.height == train.height == snap.pairs.height
    assert (joined["label"] == joined["label_right"]).all()


def test_leave_last_buy_holds_out_the_buy_and_keeps_its_views(tmp_path: Path):
    path = shared_file("taobao_userbehavior_tiny.csv")
    run(
        tmp_path,
        [path],
        CONF / "signals" / "taobao.yaml",
        input=TAOBAO_INPUT,
        split={"method": "leave_last_out", "leave_out": "deepest"},
    )
    test, train = read_out(tmp_path, "test"), read_out(tmp_path, "train")
    assert test.height > 0
    assert (test["label"] == 3).all()  # only purchases are held out
    assert test["user_idx"].n_unique() == test.height  # one per user
    # the held-out buy's earlier views stay in train (repeat intent, as the papers count it)
    viewed = test.filter(pl.col("seen_before"))
    assert viewed.height > 0
    both = viewed.join(train, on=["user_idx", "item_idx"], suffix="_train")
    assert both.height == viewed.height and (both["label_train"] < 3).all()
    # the held-out buy was each user's latest purchase
    events = read_out(tmp_path, "events").filter(pl.col("event") == "buy")
    last = events.group_by("user_idx").agg(pl.col("ts").max())
    held = events.join(test.select("user_idx", "item_idx"), on=["user_idx", "item_idx"])
    assert held.join(last, on=["user_idx", "ts"]).select("user_idx").n_unique() == test.height
    # no time cut: the snapshot says so, and the rank stage then keeps delay-corrected item
    # rates (fitted on the whole log, held-out buys included) out of the features
    from recfb.rank.state import snapshot_from_etl
    from recfb.rank.twostage import DelayedRates

    snap = snapshot_from_etl(tmp_path / "out", "valid")
    assert not snap.time_cut
    assert (
        snap.events.join(
            test.select(pl.col(c).cast(pl.Int64) for c in ("user_idx", "item_idx")),
            on=["user_idx", "item_idx"],
        )
        .filter(pl.col("level") == 3)
        .height
        == 0
    )  # the held-out buys are not in the snapshot
    assert DelayedRates(str(tmp_path / "out"), None).at(snap.now_ms, snap.n_items) is None


@pytest.fixture(scope="module")
def fitted(shop: Path):
    from recfb.rank.twostage import fit_two_stage

    cfg = RankConfig(
        data=str(shop),
        embedding_dim=16,
        sources={"history": 50, "cascade": 50, "embedding": 50, "popularity": 20},
        ranker={"n_estimators": 100, "label_windows": 2},
        delay_corrected_rates=False,
    )
    return cfg, fit_two_stage(cfg)


def test_two_stage_beats_popularity_and_never_proposes_hidden_items(fitted):
    cfg, result = fitted
    m = result.metrics
    assert m["two_stage"]["n_users"] > 100
    assert m["two_stage"]["ndcg@10"] > m["popularity"]["ndcg@10"]
    assert m["two_stage"]["hr@10"] > m["popularity"]["hr@10"]
    stage = result.test_stage
    hidden = stage.snap.hidden_pairs()
    assert hidden.height > 0
    assert stage.candidates.join(hidden, on=["user_idx", "item_idx"]).height == 0
    assert result.ranker.best_iteration >= 1
    assert max(result.ranker.importances().values()) > 0


def test_online_features_match_offline(fitted, tmp_path: Path):
    """A bundle's state at the valid cut plus the later events fed as the service's log gives
    the same candidates' features as the offline snapshot at the end of the log."""
    from recfb.rank.features import build_features, recent_events
    from recfb.rank.online import OnlineRanker
    from recfb.rank.publish import save_ranker, write_rank_files

    cfg, result = fitted
    etl = Path(cfg.data)
    rank_dir = save_ranker(result, cfg, tmp_path / "rank")
    valid_ms, _, end_ms = cut_points(json.loads((etl / "stats.json").read_text()))
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    write_rank_files(etl, rank_dir, bundle, 800, now_ms=valid_ms)
    spec = json.loads((etl / "stats.json").read_text())["signal_map_spec"]
    online = OnlineRanker(bundle, spec, None)
    full = snapshot_at(etl, end_ms)
    later = full.events.filter(pl.col("ts_ms") >= valid_ms)
    users = later["user_idx"].unique().sort().head(25).to_list()
    compared = 0
    for user in users:
        logged = [
            (r["item_idx"], r["event"], r["level"], r["ts_ms"])
            for r in later.filter(pl.col("user_idx") == user).sort("ts_ms").iter_rows(named=True)
        ]
        events = online.user_events(user, logged)
        cands = online.candidates(user, events, None, set(), end_ms)
        assert len(cands) > 0
        got = online.features(cands, events, end_ms)
        offline_events = recent_events(
            full.events.filter(pl.col("user_idx") == user),
            end_ms,
            cfg.history_days,
            cfg.history_per_user,
        )
        want = build_features(
            cands, offline_events, online.items, online.snap, end_ms, online.columns
        )
        np.testing.assert_allclose(got, want, rtol=1e-6, equal_nan=True)
        # the log's events count: a pair engaged after the cut has its events in the features
        compared += 1
    assert compared == len(users) > 10
    # ... and the history source saw what the log added (an item engaged only after the cut)
    new_pairs = later.join(
        full.events.filter(pl.col("ts_ms") < valid_ms).select("user_idx", "item_idx"),
        on=["user_idx", "item_idx"],
        how="anti",
    ).filter(pl.col("level") > 0)
    user = int(new_pairs["user_idx"][0])
    item = int(new_pairs.filter(pl.col("user_idx") == user)["item_idx"][0])
    logged = [
        (r["item_idx"], r["event"], r["level"], r["ts_ms"])
        for r in later.filter(pl.col("user_idx") == user).iter_rows(named=True)
    ]
    events = online.user_events(user, logged)
    cands = online.candidates(user, events, None, set(), end_ms)
    assert item in cands.item[cands.proposed_by("history")].tolist()


def test_numpy_features_and_history_match_the_polars_reference(tmp_path: Path):
    """The numpy group-bys the service and the offline stages share give, on the real Taobao
    log with categories, the same history candidates and pair / user / category features as
    the dataframe queries of `reference.py`, for pairs with events and pairs without."""
    from recfb.rank.candidates import history_candidates, merge_sources
    from recfb.rank.config import FEATURE_GROUPS
    from recfb.rank.features import ItemTable, build_features, feature_columns, item_stats
    from recfb.rank.state import item_categories

    from reference import polars_history_candidates, polars_pair_user_features

    path = shared_file("taobao_userbehavior_84k.csv")
    run(
        tmp_path,
        [path],
        CONF / "signals" / "taobao.yaml",
        input=TAOBAO_INPUT,
        split={
            "method": "temporal",
            "valid_start": "2017-12-01T16:00:00",
            "test_start": "2017-12-02T16:00:00",
        },
    )
    etl = tmp_path / "out"
    valid_ms, _, _ = cut_points(json.loads((etl / "stats.json").read_text()))
    snap = snapshot_at(etl, valid_ms)
    snap.category = item_categories(etl, snap.n_items)
    assert snap.category is not None and snap.hidden_pairs().height > 0

    got = history_candidates(snap.events, snap.hidden_pairs(), snap.now_ms, 50, snap)
    want = polars_history_candidates(snap.events, snap.hidden_pairs(), snap.now_ms, 50)
    assert got.height == want.height > 1000
    for a, b in (("user_idx", "user_idx"), ("item_idx", "item_idx"), ("history_rank", "rank")):
        np.testing.assert_array_equal(got[a].to_numpy(), want[b].to_numpy())
    np.testing.assert_allclose(got["history_score"], want["score"], rtol=1e-6)

    rng = np.random.default_rng(0)
    users = got["user_idx"].unique().to_numpy()
    other = pl.DataFrame(  # items the user mostly never touched
        {
            "user_idx": np.repeat(users, 20),
            "item_idx": rng.integers(0, snap.n_items, 20 * len(users)),
            "popularity_score": rng.random(20 * len(users)).astype(np.float32),
            "popularity_rank": np.tile(np.arange(1, 21, dtype=np.int32), len(users)),
        }
    ).unique(["user_idx", "item_idx"])
    cands = merge_sources({"history": got, "popularity": other})
    columns = feature_columns(snap, list(FEATURE_GROUPS), [1.0, 7.0])
    items = ItemTable(item_stats(snap, [1.0, 7.0]))
    x = build_features(cands, snap.events, items, snap, snap.now_ms, columns)
    ref = polars_pair_user_features(cands, snap.events, snap, snap.now_ms)
    compared = [c for c in columns if c in ref.columns]
    assert len(compared) >= 15 and "cat_user_share" in compared
    for c in compared:
        want_c = ref[c].cast(pl.Float32).to_numpy()
        np.testing.assert_allclose(x[:, columns.index(c)], want_c, rtol=1e-6, equal_nan=True)
    both = ~np.isnan(x[:, columns.index("pair_h_since_first")])
    assert 0 < both.sum() < len(x)  # pairs with events and pairs without
    n_sources = x[:, columns.index("n_sources")]
    in_both = cands["history_rank"].is_not_null() & cands["popularity_rank"].is_not_null()
    np.testing.assert_array_equal(n_sources, 1 + in_both.to_numpy())


def test_recent_events_keep_the_window_and_each_users_newest():
    """The history horizon: events older than `days` go, then each user keeps the newest
    `per_user` (what the bundle ships and the offline features see)."""
    from recfb.rank.features import DAY_MS, recent_events

    now = 100 * int(DAY_MS)
    ts = [now - 40 * int(DAY_MS), now - 20 * int(DAY_MS), now - 3, now - 2, now - 1]
    events = pl.DataFrame(
        {
            "user_idx": [0] * 5 + [1] * 5,
            "item_idx": list(range(10)),
            "event": ["view"] * 10,
            "level": [1] * 10,
            "ts_ms": ts[::-1] + ts,  # user 0's rows newest first: the order must not matter
        }
    )
    kept = recent_events(events, now, days=30, per_user=3)
    assert sorted(kept.filter(pl.col("user_idx") == 1)["item_idx"].to_list()) == [7, 8, 9]
    assert sorted(kept.filter(pl.col("user_idx") == 0)["item_idx"].to_list()) == [0, 1, 2]
    wide = recent_events(events, now, days=30, per_user=100)
    assert wide.height == 8 and wide["ts_ms"].min() == now - 20 * int(DAY_MS)


def test_gate_lists_hold_only_items_the_model_knows(fitted, tmp_path: Path):
    """The gate's two-stage list of a model (production's, say) built on a newer ETL output
    leaves out items its vectors do not know, though history and cascade propose them: the
    service could not serve them either."""
    from recfb.pipeline.gate import Vectors
    from recfb.rank.publish import save_ranker
    from recfb.rank.twostage import two_stage_lists

    cfg, result = fitted
    rank_dir = save_ranker(result, cfg, tmp_path / "rank")
    etl = Path(cfg.data)
    items = pl.read_parquet(etl / "items.parquet").sort("item_idx")
    users = pl.read_parquet(etl / "users.parquet").sort("user_idx")
    rng = np.random.default_rng(0)
    full = Vectors(
        users["user_id"].cast(pl.String).to_numpy(),
        rng.normal(size=(users.height, 8)).astype(np.float32),
        items["item_id"].cast(pl.String).to_numpy(),
        rng.normal(size=(items.height, 8)).astype(np.float32),
    )
    lists = two_stage_lists(str(etl), full, str(rank_dir), k=10)
    listed = {i for row in lists.values() for i in row}
    # the model lacks the half of the catalogue its full lists use most
    counts = Counter(i for row in lists.values() for i in row)
    dropped = {i for i, _ in counts.most_common(len(listed) // 2)}
    keep = ~np.isin(full.item_ids, list(dropped))
    partial = Vectors(
        full.user_ids, full.user_vectors, full.item_ids[keep], full.item_vectors[keep]
    )
    lists_partial = two_stage_lists(str(etl), partial, str(rank_dir), k=10)
    assert dropped and not dropped & {i for row in lists_partial.values() for i in row}
    assert sum(len(row) for row in lists_partial.values()) == sum(len(r) for r in lists.values())


def test_compiled_ranker_scores_as_lightgbm(fitted, tmp_path: Path, monkeypatch):
    """The service's native-code ranker (lleaves) gives LightGBM's scores on real candidate
    features, NaNs (missing features) included, and a second load reuses the compiled file."""
    from recfb.rank.publish import save_ranker
    from recfb.rank.ranker import Ranker, compiled_predictor

    monkeypatch.setenv("RECFB_CACHE_DIR", str(tmp_path / "cache"))
    cfg, result = fitted
    rank_dir = save_ranker(result, cfg, tmp_path / "rank")
    ranker = Ranker.load(rank_dir / "ranker.txt", result.ranker.columns)
    x = result.test_stage.features[:, [result.test_stage.columns.index(c) for c in ranker.columns]]
    assert np.isnan(x).any() and len(x) > 1000
    predict = compiled_predictor(rank_dir / "ranker.txt", ranker)
    np.testing.assert_allclose(predict(x), ranker.predict(x), rtol=1e-9, atol=1e-9)
    cached = list((tmp_path / "cache").glob("ranker-*.o"))
    assert len(cached) == 1
    again = compiled_predictor(rank_dir / "ranker.txt", ranker)
    np.testing.assert_array_equal(again(x[:50]), predict(x[:50]))
    assert predict(x[:0]).shape == (0,)

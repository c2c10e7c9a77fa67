"""`recfb.Recommender`: every family fits on in-memory data, recommends by external id with the
signal map's exclusion, falls back to popularity for strangers, folds in new events, and
saves/loads to the same lists; `recfb recommend` runs every family's logged model; fitting
without a tracker never touches MLflow, fitting with one logs a pyfunc model.
"""

from __future__ import annotations

import json
import os

import mlflow
import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

import recfb
from recfb.simulate import SimConfig, simulate

from conftest import CONF

FAMILIES = ["mf", "lightgcn", "gnolr", "popularity", "itemknn", "cascade", "als", "bpr_implicit"]
QUICK = {"trainer": {"max_epochs": 2, "batch_size": 1024}}
K = 8


def quick_config(family: str) -> dict:
    if family in ("mf", "lightgcn", "gnolr"):
        return QUICK | {"model": {"family": family, "dim": 8}, "eval": {"ks": [10, 20]}}
    if family in ("als", "bpr_implicit"):
        return {"model": {"family": family, "dim": 8}}
    return {"model": {"family": family}}


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> recfb.Interactions:
    base = tmp_path_factory.mktemp("library")
    simulate(SimConfig(seed=11, n_users=400, n_items=200, n_events=40_000), base / "sim")
    events = pl.read_parquet(base / "sim" / "events")
    return recfb.etl.run(events, CONF / "signals" / "simulator.yaml")


@pytest.fixture(scope="module")
def fitted(shop: recfb.Interactions) -> dict[str, recfb.Recommender]:
    return {f: recfb.Recommender.create(f, quick_config(f)).fit(shop) for f in FAMILIES}


def bought_not_refunded(shop: recfb.Interactions) -> pl.DataFrame:
    """(user_id, item_id) the simulator's map hides (no level repeats there): pairs whose
    label is the deepest level (purchase, not refunded) or an explicit negative, in any split."""
    deepest = len(shop.stats["signal_map_spec"]["levels"])
    assert deepest == 4  # view < click < engage < purchase in conf/signals/simulator.yaml
    pairs = pl.concat([shop.train, shop.valid, shop.test]).select("user_idx", "item_idx", "label")
    hidden = pairs.filter((pl.col("label") == -1) | (pl.col("label") == deepest))
    return (
        hidden.join(shop.users, on="user_idx")
        .join(shop.items.select("item_idx", "item_id"), on="item_idx")
        .select(pl.col("user_id").cast(pl.String), pl.col("item_id").cast(pl.String))
    )


def most_popular(shop: recfb.Interactions, k: int) -> list[str]:
    """Items by positive pairs over every split (ties by item index), counted here."""
    pairs = pl.concat([shop.train, shop.valid, shop.test]).filter(pl.col("label") >= 1)
    counts = pairs.group_by("item_idx").len().sort(["len", "item_idx"], descending=[True, False])
    top = counts.head(k).join(shop.items, on="item_idx", maintain_order="left")
    return top["item_id"].cast(pl.String).to_list()


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_recommends_by_id_with_the_exclusion_rule(fitted, shop, family):
    model = fitted[family]
    heavy = (
        pl.concat([shop.train, shop.valid])
        .group_by("user_idx")
        .len()
        .sort("len", descending=True)
        .head(5)
        .join(shop.users, on="user_idx")["user_id"]
        .cast(pl.String)
        .to_list()
    )
    recs = model.recommend([*heavy, "a-stranger"], k=K)
    assert recs.columns == ["user_id", "rank", "item_id", "score", "source"]
    assert recs.group_by("user_id", maintain_order=True).len()["len"].to_list() == [K] * 6
    assert recs.filter(pl.col("user_id") == heavy[0])["rank"].to_list() == list(range(1, K + 1))
    assert recs["user_id"].unique(maintain_order=True).to_list() == [*heavy, "a-stranger"]
    clash = recs.join(bought_not_refunded(shop), on=["user_id", "item_id"])
    assert clash.height == 0, clash
    known = recs.filter(pl.col("user_id") != "a-stranger")
    assert set(known["source"].to_list()) <= {"model", "session"}
    # a stranger gets the most popular items, computed independently
    stranger = recs.filter(pl.col("user_id") == "a-stranger")
    assert stranger["source"].unique().to_list() == ["popularity"]
    assert set(stranger["item_id"].to_list()) == set(most_popular(shop, K))
    # lists are personal: the heavy users do not all get the same list
    lists = {tuple(g["item_id"].to_list()) for _, g in known.group_by("user_id")}
    assert len(lists) > 1 or family == "popularity"


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_load_give_the_same_lists(fitted, shop, family, tmp_path):
    model = fitted[family]
    users = shop.users["user_id"].cast(pl.String).head(20).to_list() + ["nobody"]
    path = model.save(tmp_path / family)
    assert json.loads((path / "recommender.json").read_text())["family"] == family
    again = recfb.Recommender.load(path)
    assert again.recommend(users, k=K).equals(model.recommend(users, k=K))
    items = shop.items["item_id"].cast(pl.String).head(3).to_list()
    assert again.similar_items(items, k=4).equals(model.similar_items(items, k=4))


def test_a_tampered_saved_model_is_refused(fitted, tmp_path):
    path = fitted["mf"].save(tmp_path / "mf")
    vectors = np.load(path / "item_vectors.npy")
    np.save(path / "item_vectors.npy", vectors * 2)
    with pytest.raises(recfb.recommender.RecfbError, match="checksum"):
        recfb.Recommender.load(path)


@pytest.mark.parametrize("family", ["mf", "itemknn", "als"])
def test_similar_items_are_the_nearest_by_the_models_own_geometry(fitted, shop, family):
    model = fitted[family]
    item = most_popular(shop, 1)[0]
    similar = model.similar_items([item], k=5)
    assert similar.height == 5 and item not in similar["similar_item_id"].to_list()
    assert similar["score"].to_list() == sorted(similar["score"].to_list(), reverse=True)
    assert model.similar_items(["no-such-item"], k=5).height == 0


@pytest.mark.parametrize("family", ["mf", "itemknn", "popularity"])
def test_recalculate_user_folds_in_new_events(fitted, shop, family):
    model = recfb.Recommender.load(fitted[family].path)  # a copy: the fixture stays unchanged
    end = int(shop.events.select(pl.col("ts").max()).collect().item().timestamp() * 1000)
    before = model.recommend(["newcomer"], k=K)
    bought = before["item_id"][0]
    viewed = most_popular(shop, 40)[20:25]
    events = pl.DataFrame(
        {
            "user_id": ["newcomer"] * 6,
            "item_id": [*viewed, bought],
            "event": ["click"] * 5 + ["purchase"],
            "ts": [end - 60_000 * (6 - i) for i in range(6)],
            "value": [30.0] * 5 + [None],
        }
    )
    model.recalculate_user(events)
    after = model.recommend(["newcomer"], k=K)
    assert bought not in after["item_id"].to_list()  # bought: hidden by the signal map
    if family != "popularity":
        assert after["source"].unique().to_list() == ["session" if family == "mf" else "model"]
        assert after["item_id"].to_list() != before["item_id"].to_list()


def test_recommend_filters_and_exclusions(fitted, shop):
    model = fitted["mf"]
    user = shop.users["user_id"].cast(pl.String)[0]
    full = model.recommend([user], k=K)["item_id"].to_list()
    hidden = model.recommend([user], k=K, exclude=full[:3])["item_id"].to_list()
    assert not set(full[:3]) & set(hidden) and hidden[: K - 3] == full[3:]
    allowed = shop.items["item_id"].cast(pl.String).head(30).to_list()
    only = model.recommend([user], k=K, filter=allowed)["item_id"].to_list()
    assert only and set(only) <= set(allowed)
    with pytest.raises(ValueError, match="exclude"):
        model.recommend([user], exclude="everything")
    with pytest.raises(recfb.recommender.NotFittedError):
        recfb.Recommender.create("mf").recommend([user])


def test_a_fit_without_tracker_never_touches_mlflow(shop, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    calls = []
    for name in ("start_run", "log_metrics", "log_params", "log_artifact", "set_experiment"):
        monkeypatch.setattr(mlflow, name, lambda *a, _n=name, **k: calls.append(_n))
    model = recfb.Recommender.create("mf", quick_config("mf")).fit(shop)
    assert model.metrics["test/ndcg@10"] > 0
    assert calls == [] and not any(tmp_path.iterdir())


def test_a_tracked_fit_logs_a_pyfunc_model_that_predicts_the_same_lists(shop, tmp_path):
    from recfb.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, MlflowTracker

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    tracker = MlflowTracker("library-test", tracking_uri=uri)
    old = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        model = recfb.Recommender.create("itemknn").fit(shop, tracker=tracker)
        run_id = model.fitted.run_id
        client = mlflow.MlflowClient(uri)
        experiment = client.get_experiment_by_name("library-test")
        assert experiment.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
        assert "test/ndcg_at_10" in client.get_run(run_id).data.metrics
        mlflow.set_tracking_uri(uri)
        loaded = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
        users = shop.users["user_id"].cast(pl.String).head(5).to_list()
        frame = pl.DataFrame({"user_id": users}).to_pandas()
        predicted = pl.from_pandas(loaded.predict(frame, params={"k": 5}))
        as_dict = pl.from_pandas(loaded.predict({"user_id": users}, params={"k": 5}))
        assert as_dict.equals(predicted)
        expected = model.recommend(users, k=5)
        assert predicted.select("user_id", "item_id").equals(expected.select("user_id", "item_id"))
    finally:
        if old is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old


def test_a_pyfunc_model_pickled_without_its_loader_fails_with_a_clear_error():
    from recfb.tracking.pyfunc import RecommenderModel

    old = RecommenderModel.__new__(RecommenderModel)  # as unpickled from an older recfb
    with pytest.raises(RuntimeError, match="older recfb without its loader"):
        old.load_context(None)


@pytest.mark.parametrize("family", FAMILIES)
def test_recfb_recommend_runs_every_familys_logged_model(shop, tmp_path, family, monkeypatch):
    from recfb.cli import app
    from recfb.tracking import MlflowTracker

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("RECFB_CACHE_DIR", str(tmp_path / "cache"))
    model = recfb.Recommender.create(family, quick_config(family))
    model.fit(shop, tracker=MlflowTracker("cli-test"))
    users = tmp_path / "users.txt"
    some = shop.users["user_id"].cast(pl.String).head(4).to_list()
    users.write_text("\n".join([*some, "no-such-user"]) + "\n")
    out = tmp_path / "recs.parquet"
    args = ["recommend", "--run-id", model.fitted.run_id, "--users", str(users), "-k", "5"]
    result = CliRunner().invoke(app, [*args, "-o", str(out)])
    assert result.exit_code == 0, result.output
    frame = pl.read_parquet(out)
    assert frame.drop("score").equals(model.recommend([*some, "no-such-user"], k=5).drop("score"))
    stranger = frame.filter(pl.col("user_id") == "no-such-user")
    assert stranger["source"].to_list() == ["popularity"] * 5

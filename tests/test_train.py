"""Training, evaluation, MLflow runs and batch recommendations, end to end on small data."""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from pathlib import Path

import mlflow
import numpy as np
import polars as pl
import pytest
import torch

from recfb.config import build_model
from recfb.errors import InputError
from recfb.models.base import tce_drop_share
from recfb.models.baselines import Popularity
from recfb.models.config import FAMILIES
from recfb.recommender import Recommender, train
from recfb.serving.fetch import resolve
from recfb.simulate import SimConfig, simulate
from recfb.train.config import DenoiseConfig, TrainConfig
from recfb.train.data import Interactions, recency_weighted
from recfb.train.fit import evaluate_scorer
from recfb.train.runs import load_run

from conftest import CONF, RandomScorer, run


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small simulated shop run through the ETL (temporal split)."""
    base = tmp_path_factory.mktemp("shop")
    simulate(SimConfig(seed=3, n_users=1_500, n_items=400, n_events=150_000), base / "sim")
    run(base, [base / "sim" / "events"], CONF / "signals" / "simulator.yaml")
    return base / "out"


@pytest.fixture(autouse=True)
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test writes to its own SQLite store and artifact folder."""
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    return uri


def config(data: Path, family: str, **overrides) -> TrainConfig:
    model = {"family": family}
    if "dim" in FAMILIES[family].config.model_fields:  # each family takes only its own keys
        model["dim"] = 16
    base = {
        "data": str(data),
        "model": model,
        "trainer": {"max_epochs": 4, "batch_size": 1024, "lr": 0.01, "patience": 5},
        "eval": {"ks": [10, 20]},
    }
    for key, value in overrides.items():
        base[key] = base.get(key, {}) | value if isinstance(value, dict) else value
    return build_model(TrainConfig, base, "test")


@pytest.mark.parametrize("family", ["mf", "lightgcn", "gnolr"])
def test_models_learn_better_than_random(shop: Path, family: str):
    result = train(config(shop, family), quiet=True)
    data = Interactions.load(shop)
    cfg = config(shop, family)
    random = evaluate_scorer(RandomScorer(data.n_items), data, data.test, cfg)
    assert result.metrics["test/ndcg@20"] > 2 * random["ndcg@20"], (result.metrics, random)
    assert len(result.history) >= 1 and "train/loss" in result.history[0]


def test_training_is_deterministic_by_seed(shop: Path):
    a = train(config(shop, "mf", trainer={"max_epochs": 2}), quiet=True)
    b = train(config(shop, "mf", trainer={"max_epochs": 2}), quiet=True)
    assert a.metrics["test/ndcg@20"] == b.metrics["test/ndcg@20"]
    ua, _ = a.model.vectors()
    ub, _ = b.model.vectors()
    assert torch.equal(ua, ub)


def test_gnolr_ranks_by_the_deepest_level_and_reports_level_auc(shop: Path):
    result = train(config(shop, "gnolr"), quiet=True)
    model = result.model
    levels = Interactions.load(shop).level_names
    for name in levels.values():
        assert 0.5 < result.metrics[f"test/auc/{name}"] <= 1.0
    # one inner product equals z_T + a_T for every pair
    users, items = torch.arange(5), torch.arange(5)
    z = model.level_scores(users, items)
    q, v = model.vectors()
    inner = (q[users] * v[items]).sum(-1)
    assert torch.allclose(inner, z[:, -1] + model.thresholds[-1], atol=1e-4)


@pytest.mark.parametrize(
    "switch",
    [
        {"denoise": {"method": "pld", "warmup_epochs": 1}},
        {"denoise": {"method": "tce", "warmup_epochs": 1, "max_drop": 0.3, "ramp_epochs": 2}},
        {"debias": {"ips": True}},
        {"model": {"family": "mf", "dim": 16, "loss": "softmax"}},
        {"model": {"family": "mf", "dim": 16, "loss": "bce"}, "debias": {"ips": True}},
    ],
)
def test_denoising_and_debiasing_switches_train(shop: Path, switch: dict):
    result = train(config(shop, "mf", **switch), quiet=True)
    assert np.isfinite(result.history[-1]["train/loss"])
    assert result.metrics["test/ndcg@20"] > 0


def test_tce_drops_nothing_during_warm_up_then_ramps_to_its_maximum():
    cfg = DenoiseConfig(method="tce", warmup_epochs=3, ramp_epochs=2, max_drop=0.2)
    shares = [tce_drop_share(cfg, epoch) for epoch in range(7)]
    assert shares == pytest.approx([0, 0, 0, 0.1, 0.2, 0.2, 0.2])
    assert tce_drop_share(DenoiseConfig(method="pld"), 10) == 0


def test_valid_folds_into_train_deepest_label_unless_newest_is_negative(shop: Path):
    data = Interactions.load(shop)
    row = dict(weight=1.0, matured=True)
    data.train = pl.DataFrame(
        [
            {"user_idx": 0, "item_idx": 1, "label": 3, **row},
            {"user_idx": 0, "item_idx": 2, "label": 2, **row},
            {"user_idx": 1, "item_idx": 1, "label": 1, **row},
        ],
        schema=data.train.schema,
    )
    data.valid = pl.DataFrame(
        [
            {"user_idx": 0, "item_idx": 1, "label": 1, "weight": 2.0, "matured": False},
            {"user_idx": 0, "item_idx": 2, "label": -1, **row},
            {"user_idx": 2, "item_idx": 5, "label": 2, **row},
        ],
        schema=data.valid.schema,
    )
    merged = data.with_valid_in_train()
    got = {(r["user_idx"], r["item_idx"]): r for r in merged.train.iter_rows(named=True)}
    assert {k: v["label"] for k, v in got.items()} == {(0, 1): 3, (0, 2): -1, (1, 1): 1, (2, 5): 2}
    assert got[(0, 1)]["weight"] == 2.0 and got[(0, 1)]["matured"] is False
    assert merged.valid.height == 0 and merged.train.schema == data.train.schema


def test_recency_weights_halve_per_half_life_and_make_popularity_trending():
    day = datetime(2026, 1, 10)
    train = pl.DataFrame(
        {
            "user_idx": [0, 1, 2, 3],
            "item_idx": [0, 0, 1, 1],
            "label": [1, 1, 1, 1],
            "weight": [1.0, 1.0, 2.0, 1.0],
            "matured": [True] * 4,
            "last_ts": [day - timedelta(days=4), day - timedelta(days=2), day, day],
        }
    )
    decayed = recency_weighted(train, half_life_days=2.0)
    assert decayed["weight"].to_list() == pytest.approx([0.25, 0.5, 2.0, 1.0])
    assert recency_weighted(train, None)["weight"].to_list() == [1.0, 1.0, 2.0, 1.0]
    # all-time: two users each; trending: item 1's recent weight 3.0 against item 0's 0.75
    assert Popularity().fit(train, 4, 2).popularity_vector().tolist() == [2.0, 2.0]
    trending = Popularity(use_weights=True).fit(decayed, 4, 2).popularity_vector()
    assert trending.tolist() == pytest.approx([0.75, 3.0])


def test_refit_trains_on_valid_for_the_chosen_epochs_and_masks_it_at_test(shop: Path):
    result = train(config(shop, "mf", eval={"ks": [10, 20], "refit": True}), quiet=True)
    best = max(result.history, key=lambda row: row["valid/ndcg@20"])
    assert result.metrics["refit_epochs"] == best["epoch"] + 1
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(result.run_id, "checkpoint")}
    assert "checkpoint/refit.ckpt" in artifacts, artifacts
    data = Interactions.load(shop)
    random = evaluate_scorer(RandomScorer(data.n_items), data, data.test, config(shop, "mf"))
    assert result.metrics["test/ndcg@20"] > 2 * random["ndcg@20"]
    # its recommendations exclude what the signal map hides from the valid window (bought,
    # disliked), as they would in production, and are the run's model, not the fallback
    served = Recommender.load(resolve(f"runs:/{result.run_id}/model"))
    hidden = data.valid.filter(pl.col("label").is_in(list(data.hidden_labels)))
    user = int(hidden["user_idx"][0])
    user_id = pl.read_parquet(shop / "users.parquet").filter(pl.col("user_idx") == user)
    recs = served.recommend(user_id["user_id"].to_list(), 50)
    hidden_items = set(
        hidden.filter(pl.col("user_idx") == user)
        .join(pl.read_parquet(shop / "items.parquet"), on="item_idx")["item_id"]
        .to_list()
    )
    assert recs["source"].to_list() == ["model"] * 50
    assert hidden_items and not hidden_items & set(recs["item_id"].to_list())


def test_run_is_recorded_in_mlflow_and_reloads_for_recommend(shop: Path, tmp_path: Path):

    result = train(config(shop, "mf", run_name="recorded"), quiet=True)
    client = mlflow.MlflowClient()
    recorded = client.get_run(result.run_id)
    assert recorded.data.params["model.family"] == "mf"
    assert recorded.data.tags["model_family"] == "mf"
    assert "data_fingerprint" in recorded.data.tags
    assert "test/ndcg_at_20" in recorded.data.metrics
    history = client.get_metric_history(result.run_id, "train/loss")
    assert len(history) == len(result.history)
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {
        "config.yaml",
        "dataset_stats.json",
        "embeddings",
        "learning_curves.png",
        "metrics_by_level.png",
        "checkpoint",
    } <= artifacts

    cfg, scorer = load_run(result.run_id)
    assert cfg.model.family == "mf"
    assert scorer.item_vectors.shape[1] == 16
    data = Interactions.load(shop)
    users = pl.read_parquet(shop / "users.parquet")["user_id"].head(3).to_list()
    model = Recommender.load(resolve(f"runs:/{result.run_id}/model"))  # the logged MLflow model
    recs = model.recommend(users + ["never-seen"], 10, exclude="any")
    assert recs.columns == ["user_id", "rank", "item_id", "score", "source"]
    assert recs.filter(pl.col("user_id") == "never-seen")["source"].unique().to_list() == [
        "popularity"
    ]
    assert recs.group_by("user_id").len()["len"].to_list() == [10] * 4
    # masked: no recommended item is one the user already interacted with in train
    seen = data.train.join(pl.read_parquet(shop / "users.parquet"), on="user_idx").join(
        pl.read_parquet(shop / "items.parquet"), on="item_idx"
    )
    clash = recs.join(seen.select("user_id", "item_id"), on=["user_id", "item_id"])
    assert clash.height == 0


@pytest.mark.parametrize("family", ["popularity", "itemknn", "als"])
def test_baselines_run_in_the_same_harness(shop: Path, family: str):
    pytest.importorskip("implicit")
    result = train(config(shop, family), quiet=True)
    assert result.metrics["test/ndcg@20"] > 0
    assert mlflow.MlflowClient().get_run(result.run_id).data.tags["model_family"] == family


def test_unknown_etl_dir_is_a_clear_error(tmp_path: Path):
    from recfb.errors import InputError

    with pytest.raises(InputError, match="recfb etl"):
        train(config(tmp_path / "nope", "mf"), quiet=True)
    assert os.environ["MLFLOW_TRACKING_URI"].startswith("sqlite")


def test_cold_users_are_served_popularity():
    from recfb.train.fallback import PopularityFallback

    train = pl.DataFrame(
        {"user_idx": [0, 0, 1, 2], "item_idx": [1, 2, 2, 0], "label": [1, 2, 3, -1]},
        schema={"user_idx": pl.UInt32, "item_idx": pl.UInt32, "label": pl.Int8},
    )

    class Fixed:
        def score(self, users: torch.Tensor) -> torch.Tensor:
            return torch.tensor([[9.0, 0.0, 0.0]]).repeat(len(users), 1)

    served = PopularityFallback.from_train(Fixed(), train, n_users=4, n_items=3)
    scores = served.score(torch.tensor([0, 1, 2, 3]))
    assert scores[0].tolist() == [9.0, 0.0, 0.0] and scores[1].tolist() == [9.0, 0.0, 0.0]
    # user 2 only disliked, user 3 never appeared: item 2 (two users) > item 1 > item 0
    assert scores[2].tolist() == [0.0, 1.0, 2.0] and scores[3].tolist() == [0.0, 1.0, 2.0]


def test_item_feature_tower_shares_what_a_category_learned(shop: Path):
    from recfb.train.fit import item_feature_codes

    data = Interactions.load(shop)
    codes = item_feature_codes(data, ["category"])["category"].numpy()
    pairs = pl.concat(
        [pl.read_parquet(shop / f"{s}.parquet") for s in ("train", "valid", "test")]
    ).unique(["item_idx", "category"])
    truth = dict(zip(pairs["item_idx"].to_list(), pairs["category"].to_list(), strict=True))
    # one code per category value, 0 only for items the ETL never saw with one
    mapping: dict[int, int] = {}
    for item, category in truth.items():
        assert mapping.setdefault(category, codes[item]) == codes[item] != 0
    assert len(set(mapping.values())) == len(mapping)
    result = train(config(shop, "mf", model={"item_features": ["category"]}), quiet=True)
    model = result.model
    _, items = model.encode()
    table = model.feature_tables["category"].weight
    expected = model.item_embedding.weight + table[model.codes_category]
    assert torch.allclose(items, expected)
    assert table[1:].abs().sum() > 0  # the category embeddings were trained
    random = evaluate_scorer(RandomScorer(data.n_items), data, data.test, config(shop, "mf"))
    assert result.metrics["test/ndcg@20"] > 2 * random["ndcg@20"]


def test_unknown_item_feature_is_a_clear_error(shop: Path):
    with pytest.raises(InputError, match="does not carry"):
        train(config(shop, "mf", model={"item_features": ["colour"]}), quiet=True)


def test_symmetric_lgconv_matches_pyg_lgconv_values_and_gradients():
    from torch_geometric.nn import LGConv

    from recfb.models.lightgcn import SymmetricLGConv, normalized_adjacency

    gen = torch.Generator().manual_seed(0)
    users = torch.randint(0, 50, (300,), generator=gen)
    items = torch.randint(0, 30, (300,), generator=gen)
    adjacency = normalized_adjacency(users, items, torch.rand(300, generator=gen), 50, 30)
    x_pyg = torch.randn(80, 8, generator=gen, requires_grad=True)
    x_sym = x_pyg.detach().clone().requires_grad_(True)
    upstream = torch.randn(80, 8, generator=gen)
    out_pyg = LGConv(normalize=False)(x_pyg, adjacency)
    out_sym = SymmetricLGConv(normalize=False)(x_sym, adjacency)
    (out_pyg * upstream).sum().backward()
    (out_sym * upstream).sum().backward()
    assert torch.allclose(out_pyg, out_sym, atol=1e-6)
    assert torch.allclose(x_pyg.grad, x_sym.grad, atol=1e-6)
    assert x_sym.grad.abs().sum() > 0


def test_a_key_of_another_family_is_an_error_naming_that_family() -> None:
    with pytest.raises(ValueError, match=r"model\.layers .*family 'mf'.*lightgcn"):
        TrainConfig.model_validate({"model": {"family": "mf", "layers": 2}})
    with pytest.raises(ValueError, match="not a known family"):
        TrainConfig.model_validate({"model": {"family": "svd"}})
    cfg = TrainConfig.model_validate({"model": {"family": "itemknn", "k": 20}})
    assert cfg.kind == "baseline" and cfg.model.k == 20
    assert TrainConfig().model.family == "mf" and TrainConfig().kind == "embedding"

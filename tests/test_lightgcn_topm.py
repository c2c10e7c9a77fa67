"""LightGCN's pruned top-m propagation operator (model.propagation: topm)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from recfb.config import build_model
from recfb.models.lightgcn import LightGCN, normalized_adjacency, propagation_operator
from recfb.recommender import train
from recfb.simulate import SimConfig, simulate
from recfb.train.config import TrainConfig
from recfb.train.data import Interactions
from recfb.train.fit import evaluate_scorer

from conftest import CONF, RandomScorer, run

N_USERS, N_ITEMS = 7, 6


def tiny_graph() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    users = torch.randint(0, N_USERS, (25,), generator=gen)
    items = torch.randint(0, N_ITEMS, (25,), generator=gen)
    weights = torch.rand(25, generator=gen) + 0.1  # distinct weights: no ties when pruning
    return normalized_adjacency(users, items, weights, N_USERS, N_ITEMS)


def dense_mean_powers(adjacency: torch.Tensor, layers: int) -> torch.Tensor:
    a = adjacency.to_dense().double()
    return sum(torch.linalg.matrix_power(a, k) for k in range(layers + 1)) / (layers + 1)


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_operator_without_pruning_is_the_mean_of_adjacency_powers(layers: int):
    adjacency = tiny_graph()
    n = N_USERS + N_ITEMS
    operator = propagation_operator(adjacency, layers, m=n)  # no row has more than n others
    expected = dense_mean_powers(adjacency, layers)
    assert torch.allclose(operator.to_dense().double(), expected, atol=1e-6)


def test_pruning_keeps_each_node_and_its_m_largest_weights():
    adjacency = tiny_graph()
    expected = dense_mean_powers(adjacency, 1)  # one layer: a single pruning of A
    operator = propagation_operator(adjacency, 1, m=2).to_dense().double()
    for row in range(expected.shape[0]):
        others = expected[row].clone()
        others[row] = 0
        top = others.topk(2).indices
        kept = {row} | {int(i) for i in top if others[i] > 0}
        assert set(operator[row].nonzero().squeeze(1).tolist()) == kept
        for col in kept:
            assert operator[row, col] == pytest.approx(float(expected[row, col]), abs=1e-6)


def model(propagation: str, topm: int = 4, layers: int = 2) -> LightGCN:
    config = {"model": {"family": "lightgcn", "dim": 8, "layers": layers}}
    config["model"] |= {"propagation": propagation, "topm": topm}
    cfg = build_model(TrainConfig, config, "test")
    return LightGCN(N_USERS, N_ITEMS, 1, cfg.embedding_settings().model_dump(mode="json"))


def test_unpruned_topm_encodes_as_full_propagation_and_batches_match():
    full, topm = model("full"), model("topm", topm=N_USERS + N_ITEMS)
    full.adjacency = topm.adjacency = tiny_graph()
    with torch.no_grad():
        topm.embedding.weight.copy_(full.embedding.weight)
    users_full, items_full = full.encode()
    users, items = topm.encode()
    assert users.shape == (N_USERS, 8) and items.shape == (N_ITEMS, 8)
    assert torch.allclose(users, users_full, atol=1e-5)
    assert torch.allclose(items, items_full, atol=1e-5)
    user_vectors, item_vectors = topm.batch_encoder()
    some_items = torch.tensor([[0, 5, 2], [3, 3, 1]])
    assert torch.allclose(user_vectors(torch.tensor([6, 0])), users_full[[6, 0]], atol=1e-5)
    assert torch.allclose(item_vectors(some_items), items_full[some_items], atol=1e-5)


def test_topm_step_reaches_only_the_bags_of_its_nodes():
    topm = model("topm", topm=2)
    topm.adjacency = tiny_graph()
    neighbours, weights = topm.operator_bags()
    user_vectors, item_vectors = topm.batch_encoder()
    (user_vectors(torch.tensor([1])) * item_vectors(torch.tensor([2]))).sum().backward()
    touched = set(topm.embedding.weight.grad.abs().sum(1).nonzero().squeeze(1).tolist())
    bags = set(neighbours[1][weights[1] > 0].tolist())
    bags |= set(neighbours[N_USERS + 2][weights[N_USERS + 2] > 0].tolist())
    assert len(bags) <= 2 * 3  # the node and at most 2 neighbours, twice
    assert len(touched) > 0 and touched <= bags


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("shop")
    simulate(SimConfig(seed=3, n_users=1_500, n_items=400, n_events=150_000), base / "sim")
    run(base, [base / "sim" / "events"], CONF / "signals" / "simulator.yaml")
    return base / "out"


def test_topm_training_learns(shop: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns.db'}")
    monkeypatch.chdir(tmp_path)
    spec = {
        "data": str(shop),
        "model": {"family": "lightgcn", "dim": 16, "propagation": "topm", "topm": 8},
        "trainer": {"max_epochs": 4, "batch_size": 1024, "lr": 0.01, "patience": 5},
        "eval": {"ks": [10, 20]},
    }
    cfg = build_model(TrainConfig, spec, "test")
    result = train(cfg, quiet=True)
    losses = [row["train/loss"] for row in result.history]
    assert losses[-1] < losses[0], losses
    data = Interactions.load(shop)
    random = evaluate_scorer(RandomScorer(data.n_items), data, data.test, cfg)
    assert result.metrics["test/ndcg@20"] > 2 * random["ndcg@20"], (result.metrics, random)
    users, items = result.model.vectors()
    assert users.shape == (data.n_users, 16) and items.shape == (data.n_items, 16)


def backward_of_a_loss(topm: LightGCN, users: torch.Tensor, items: torch.Tensor) -> None:
    user_vectors, item_vectors = topm.batch_encoder()
    uvec, ivec = user_vectors(users), item_vectors(items)
    signs = torch.linspace(-1, 1, ivec.shape[1]).unsqueeze(1)
    (uvec.unsqueeze(1) * ivec * signs).sum().backward()


def table_gradient(topm: LightGCN, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    topm.embedding.weight.grad = None
    backward_of_a_loss(topm, users, items)
    return topm.embedding.weight.grad.clone()


@pytest.mark.parametrize(
    "items",
    [[[0, 1], [1, 0]], [[0, 5, 2], [3, 3, 4]]],  # few items: per-node bags; most: all items
    ids=["few-items", "most-items"],
)
def test_step_gradient_into_the_kept_buffer_equals_autograd(items: list[list[int]]):
    """The topm step's own backward (a kept gradient buffer; the item side through the
    transposed operator when most items are in the batch) gives autograd's gradient."""
    fast, plain = model("topm", topm=3), model("topm", topm=3)
    fast.adjacency = plain.adjacency = tiny_graph()
    plain._bag_into_grad = False
    with torch.no_grad():
        plain.embedding.weight.copy_(fast.embedding.weight)
    users, batch = torch.tensor([6, 0]), torch.tensor(items)
    expected = table_gradient(plain, users, batch)
    assert expected.abs().sum() > 0
    assert torch.allclose(table_gradient(fast, users, batch), expected, atol=1e-6)
    # a second backward before the optimiser clears it accumulates, as autograd's does
    once = table_gradient(fast, users, batch)
    backward_of_a_loss(fast, users, batch)
    assert torch.allclose(fast.embedding.weight.grad, 2 * once, atol=1e-6)


def test_topm_fused_adam_moves_the_table_as_adam():
    """The topm step (kept gradient buffer, fused Adam) moves the table as autograd and
    torch's default Adam do, over steps that reuse the buffer."""
    fast, plain = model("topm", topm=3), model("topm", topm=3)
    fast.adjacency = plain.adjacency = tiny_graph()
    plain._bag_into_grad = False
    with torch.no_grad():
        plain.embedding.weight.copy_(fast.embedding.weight)
    (fused,) = fast.configure_optimizers()
    reference = torch.optim.Adam(plain.parameters(), lr=fast.cfg.optim.lr)
    for _ in range(3):
        for topm, opt in ((fast, fused), (plain, reference)):
            opt.zero_grad()
            backward_of_a_loss(
                topm, torch.tensor([6, 0, 2]), torch.tensor([[0, 5], [2, 1], [4, 4]])
            )
            opt.step()
    assert torch.allclose(fast.embedding.weight, plain.embedding.weight, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "expected"), [("adam", torch.optim.Adam), ("sgd", torch.optim.SGD)]
)
def test_topm_honours_the_configured_optimizer(name, expected):
    cfg = {
        "model": {"family": "lightgcn", "dim": 4, "propagation": "topm", "topm": 2},
        "optim": {"optimizer": name},
    }
    (opt,) = LightGCN(5, 4, 2, cfg).configure_optimizers()
    assert type(opt) is expected

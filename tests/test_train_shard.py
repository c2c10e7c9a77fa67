"""Data-parallel training on users' shards (`recfb.train.shard`): what a DDP rank reads, the
statistics it is handed, the batches it steps on, and the valid figures the ranks combine,
each against the same thing computed on the whole ETL output. The combination runs over a
real two-process gloo group on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import torch.multiprocessing as mp

from recfb.config import build_model as build_config
from recfb.errors import ConfigError
from recfb.simulate import SimConfig, simulate
from recfb.train.config import TrainConfig
from recfb.train.data import SPLITS, Interactions
from recfb.train.fit import build_model, evaluate_scorer, heldout_of
from recfb.train.shard import PaddedBatches, TrainTotals, user_shards

from conftest import CONF, free_port, run


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small simulated shop run through the ETL (temporal split: every split has pairs)."""
    base = tmp_path_factory.mktemp("shop")
    simulate(SimConfig(seed=5, n_users=1_500, n_items=400, n_events=120_000), base / "sim")
    run(base, [base / "sim" / "events"], CONF / "signals" / "simulator.yaml")
    return base / "out"


def config(data: Path, family: str = "mf", **overrides) -> TrainConfig:
    base = {
        "data": str(data),
        "model": {"family": family, "dim": 8},
        "trainer": {"max_epochs": 1, "batch_size": 256},
        "eval": {"ks": [5, 20]},
    } | overrides
    return build_config(TrainConfig, base, "test")


def test_a_shard_holds_exactly_its_users_pairs_and_the_whole_vocabularies(shop: Path):
    whole = Interactions.load(shop)
    part = Interactions.load(shop, users=(300, 900))
    for split in SPLITS:
        expected = getattr(whole, split).filter(pl.col("user_idx").is_between(300, 899))
        assert expected.height > 0
        assert getattr(part, split).equals(expected), split
    assert part.users.equals(whole.users) and part.items.equals(whole.items)
    assert part.n_levels == whole.n_levels
    # with `columns`, as training loads
    narrow = Interactions.load(shop, columns=["user_idx", "item_idx"], users=(300, 900))
    assert narrow.train.columns == ["user_idx", "item_idx"]
    assert narrow.train.height == part.train.height


@pytest.mark.parametrize("ranks", [1, 2, 3, 5])
def test_user_shards_cover_every_user_once_with_about_equal_positives(shop: Path, ranks: int):
    data = Interactions.load(shop)
    positives = data.train.filter(pl.col("label") >= 1)
    per_user = np.bincount(positives["user_idx"].to_numpy(), minlength=data.n_users)
    shards = user_shards(data.train, data.n_users, 1, ranks)
    assert len(shards) == ranks
    assert shards[0].start == 0 and shards[-1].stop == data.n_users
    assert all(a.stop == b.start for a, b in zip(shards, shards[1:], strict=False))
    for s in shards:
        assert s.positives == per_user[s.start : s.stop].sum() > 0
        assert s.per_epoch == max(x.positives for x in shards)
    assert sum(s.positives for s in shards) == positives.height
    # each share is within one user's positives of an equal split
    sizes = [s.positives for s in shards]
    assert max(sizes) - positives.height / ranks <= per_user.max()
    assert positives.height / ranks - min(sizes) <= per_user.max()


def test_more_workers_than_users_with_positives_is_a_clear_error():
    train = pl.DataFrame({"user_idx": [0, 0, 1], "label": [1, 2, -1]})
    with pytest.raises(ConfigError, match="ray.workers=2.*fewer workers"):
        user_shards(train, 2, 1, 2)


def test_padded_batches_give_every_rank_the_same_steps_over_its_own_positions():
    short, long = PaddedBatches(10, 13, 4, seed=0), PaddedBatches(13, 13, 4, seed=1)
    assert len(short) == len(long) == 4
    epochs = []
    for sampler, n in ((short, 10), (long, 13)):
        for _ in range(2):
            batches = list(sampler)
            assert len(batches) == len(sampler)
            drawn = torch.cat(batches)
            assert len(drawn) == 13 and int(drawn.max()) < n
            assert set(drawn.tolist()) == set(range(n))  # every own position, each epoch
            epochs.append(drawn)
    assert not torch.equal(epochs[0], epochs[1])  # a fresh order per epoch
    with pytest.raises(ValueError, match="at least the positions"):
        PaddedBatches(13, 10, 4, seed=0)


def test_a_model_built_on_shards_has_the_whole_models_statistics(shop: Path):
    """GNOLR with recency weighting: its level rates, the popularity it samples negatives
    from and the recency reference all sum over every user."""
    cfg = config(shop, "gnolr", recency_half_life_days=2.0)
    whole_data = Interactions.load(shop)
    totals = TrainTotals.of(whole_data, cfg)
    whole = build_model(cfg, whole_data)
    pairs = []
    for s in user_shards(whole_data.train, whole_data.n_users, 1, 2):
        part = build_model(cfg, Interactions.load(shop, users=(s.start, s.stop)), totals)
        for name in ("log_q", "thresholds", "propensity"):
            assert torch.equal(getattr(part, name), getattr(whole, name)), name
        pairs.append(
            pl.DataFrame(
                {
                    "u": part.pos_users.numpy(),
                    "i": part.pos_items.numpy(),
                    "w": part.pos_weights.numpy(),
                }
            )
        )
    expected = pl.DataFrame(
        {"u": whole.pos_users.numpy(), "i": whole.pos_items.numpy(), "w": whole.pos_weights.numpy()}
    )
    assert pl.concat(pairs).sort("u", "i").equals(expected.sort("u", "i"))
    assert float(expected["w"].min()) < 0.5 * float(expected["w"].max())  # recency did weigh


class TableScorer:
    """Fixed random scores per (user, item): the same on every rank."""

    def __init__(self, n_users: int, n_items: int) -> None:
        self.table = torch.rand(n_users, n_items, generator=torch.Generator().manual_seed(0))

    def score(self, users: torch.Tensor) -> torch.Tensor:
        return self.table[users]


def _rank_metrics(rank: int, world: int, port: int, shop: str, shards: list, out) -> None:
    """One rank of a gloo group: the valid figures over its own users, combined."""
    import torch.distributed as dist

    from recfb.train.shard import all_reduce

    dist.init_process_group("gloo", f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        cfg = config(Path(shop))
        totals = TrainTotals.of(Interactions.load(shop), cfg)
        s = shards[rank]
        data = Interactions.load(shop, users=(s.start, s.stop))
        scorer = TableScorer(data.n_users, data.n_items)
        valid = heldout_of(data, "valid", cfg)
        out.put((rank, evaluate_scorer(scorer, data, valid, cfg, totals, all_reduce)))
    finally:
        dist.destroy_process_group()


def test_valid_figures_of_ranks_on_their_shards_combine_into_the_whole_splits(shop: Path):
    data = Interactions.load(shop)
    cfg = config(shop)
    expected = evaluate_scorer(TableScorer(data.n_users, data.n_items), data, data.valid, cfg)
    assert 0 < expected["cold_user_share"] < 1  # the popularity fallback is in the figures
    shards = user_shards(data.train, data.n_users, 1, 2)
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    mp.start_processes(
        _rank_metrics, args=(2, free_port(), str(shop), shards, out), nprocs=2, start_method="spawn"
    )
    results = dict(out.get() for _ in range(2))
    for rank in (0, 1):
        got = results[rank]
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-12), (rank, key)

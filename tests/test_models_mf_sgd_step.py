"""MF's fused SGD step (recfb/models/mf.py: `sgd_step`) must move the tables as the gradient
path with RowSparseSGD does, and several optimiser steps per loader batch
(`EmbeddingRecommender.training_step`, loop.train_loader) must train as one step per batch:
both change a step's cost only."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from test_models_mf_closed_form import CASES, _model

from recfb.models.base import RowSparseSGD
from recfb.train.fit import positions_loader

LR = 0.5


def _tables(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("size", [9, 256])  # below the catalogue (autograd's batch) and above
@pytest.mark.parametrize(
    "case",
    [c for c in CASES if not c["model"].get("item_features")],
    ids=lambda c: str(c).replace(" ", ""),
)
def test_fused_sgd_step_equals_gradient_and_sgd(case: dict, size: int) -> None:
    settings = {k: v for k, v in case.items() if k != "model"}
    model_cfg = {"family": "mf", "dim": 8, "n_negatives": 3} | case["model"]
    reference = _model(**settings, model=model_cfg)
    order = torch.randperm(len(reference.pos_users), generator=torch.Generator().manual_seed(2))
    idx = order[:size]
    reference.train()
    opt = RowSparseSGD(reference.parameters(), lr=LR)
    torch.manual_seed(5)  # the same negatives (and PLD draws) on both paths
    expected_loss = reference.closed_form_backward(idx)
    if expected_loss is None:
        expected_loss = reference.batch_loss(idx)
        expected_loss.backward()
    opt.step()

    model = _model(**settings, model=model_cfg)
    model.train()
    start = _tables(model)
    torch.manual_seed(5)
    loss = model.sgd_step(idx, LR)
    assert loss is not None
    assert torch.allclose(loss, expected_loss.detach(), rtol=1e-5, atol=1e-7)
    for name, table in _tables(reference).items():
        got = dict(model.named_parameters())[name].detach()
        assert not torch.equal(got, start[name]), name  # the step moved it
        assert torch.allclose(got, table, rtol=1e-5, atol=1e-6), name


def test_item_features_keep_the_gradient_path() -> None:
    model = _model(model={"family": "mf", "dim": 8, "item_features": ["category"]})
    assert model.sgd_step(torch.arange(32), LR) is None


class _Cfg:
    seed = 3

    class trainer:  # noqa: N801
        batch_size = 64


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_several_steps_per_loader_batch_train_as_one_per_batch(optimizer: str) -> None:
    """742 pairs, batch 64: 12 steps an epoch (the last one partial), in loader batches of 1
    or 4 steps, over two epochs."""
    fitted = []
    for steps in (1, 4):
        model = _model(optim={"optimizer": optimizer, "lr": 0.05, "step_batch": 64})
        trainer = L.Trainer(
            max_epochs=2,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
            deterministic=True,
        )
        torch.manual_seed(11)
        trainer.fit(model, positions_loader(model, _Cfg(), steps))  # type: ignore[arg-type]
        assert len(model.pos_users) == 742
        assert trainer.global_step == 2 * 12  # every step counts (checkpointing needs it)
        fitted.append((_tables(model), float(trainer.callback_metrics["train/loss"])))
    (one, loss_one), (several, loss_several) = fitted
    for name, table in one.items():
        assert torch.allclose(several[name], table, rtol=1e-6, atol=1e-7), name
    assert loss_several == pytest.approx(loss_one, rel=1e-5)


def test_train_loader_holds_several_steps_on_one_device_only() -> None:
    from recfb.train.config import TrainConfig
    from recfb.train.fit import STEPS_PER_LOADER_BATCH, train_loader

    model = _model()
    one = TrainConfig(trainer={"batch_size": 64, "accelerator": "cpu"})
    assert train_loader(model, one).batch_sampler.batch_size == 64 * STEPS_PER_LOADER_BATCH
    for trainer in ({"strategy": "ddp"}, {"devices": 2}, {"num_nodes": 2}):
        cfg = TrainConfig(trainer={"batch_size": 64, "accelerator": "cpu"} | trainer)
        assert train_loader(model, cfg).batch_sampler.batch_size == 64

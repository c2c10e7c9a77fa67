"""Training on Ray Train (`engine: ray`): Lightning's DDP across `ray.workers` workers (CPU
here, a GPU each where the cluster has them), with the same config and the same model.

Each worker reads its own shard of the ETL output (a path every worker can read): the pairs
of a range of consecutive users, with about equal training positives per worker
(`recfb.train.shard`). The driver, which reads the whole output anyway, hands them the
statistics over every user (item popularity, GNOLR's level rates, exposure, the recency
reference). LightGCN's propagation needs the whole graph, so its workers read every pair and
Lightning's DistributedSampler gives each its share of the positions.

Every worker builds the model with the config's seed (DDP starts every replica from rank 0's
weights anyway) and steps on its share of each batch: the batch size per worker is
`batch_size / workers`, so the batch the averaged gradient stands for, and SGD's rate per
example, keep their meaning. Embedding tables take dense gradients here (DDP's all-reduce
cannot sum sparse ones), so the row-sparse and closed-form steps of one process are off.
Buffers are not broadcast: they are each rank's own data (its pairs) or the same everywhere.
After each epoch every worker evaluates the valid split over its users and the sums are
combined, so every rank has the whole split's figure and early stopping agrees; rank 0
reports the best epoch's weights. The driver goes on as after a local fit (test metrics,
MLflow: one writer).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from recfb import tracking
from recfb.distributed.cluster import connect
from recfb.errors import ConfigError


def worker_config(cfg: Any) -> Any:
    """The config one of `workers` DDP workers trains with: its share of the batch, SGD's
    rate scaled so that rate x batch (the rate per example) is unchanged, a DDP strategy
    (which turns the sparse-gradient paths off)."""
    workers = cfg.ray.workers
    t = cfg.trainer
    if t.batch_size % workers:
        raise ConfigError(
            f"trainer.batch_size={t.batch_size} must be a multiple of ray.workers={workers} "
            "(each worker steps on an equal share of the batch)"
        )
    lr = t.lr * workers if t.optimizer == "sgd" else t.lr
    trainer = t.model_copy(
        update={"batch_size": t.batch_size // workers, "lr": lr, "strategy": "ddp"}
    )
    return cfg.model_copy(update={"trainer": trainer, "engine": "local"})


def _train_worker(config: dict) -> None:
    """One Ray Train worker: the local fit under Ray's DDP strategy."""
    import lightning as L
    import ray.train
    from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment, prepare_trainer

    from recfb.etl import Interactions
    from recfb.train.config import TrainConfig
    from recfb.train.fit import (
        build_model,
        early_stopping,
        evaluate_scorer,
        finish_fit,
        heldout_of,
        lightning_quiet,
        lightning_trainer,
        positions_loader,
    )
    from recfb.train.fit import warm_start as warm
    from recfb.train.shard import PaddedBatches, all_reduce

    cfg = TrainConfig.model_validate(config["cfg"])
    rank = ray.train.get_context().get_world_rank()
    torch.set_num_threads(max(1, int(config["threads"])))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    shard = config["shards"][rank] if config["shards"] else None
    totals = config["totals"]  # the whole table's statistics (a shard cannot sum them)
    users = (shard.start, shard.stop) if shard is not None else None
    data = Interactions.load(config["data"], users=users)
    model = build_model(cfg, data, totals)
    if cfg.init_from_run:
        warm(model, cfg, data)
    # every rank was seeded alike, for the same initial weights; from here each draws its own
    # negatives (alike, every rank would sample the same items for its users at each step)
    L.seed_everything(cfg.seed + rank, workers=True, verbose=False)
    evaluator = batches = None
    if shard is not None:
        if config["has_valid"]:  # this rank's share may be empty: it evaluates still
            valid = heldout_of(data, "valid", cfg)

            def evaluator(m: Any) -> dict[str, float]:
                return evaluate_scorer(m, data, valid, cfg, totals, all_reduce)

        # the same number of batches on every rank, each from its own positions
        batch = cfg.trainer.batch_size
        batches = PaddedBatches(len(model.pos_users), shard.per_epoch, batch, cfg.seed + rank)
    callbacks, checkpoint = early_stopping(model, cfg, data, evaluator)
    # Lightning gives every rank rank 0's checkpoint directory: the one made here is this
    # rank's own (empty on the others), removed below
    own_dir = checkpoint.dirpath if checkpoint is not None else None
    gpu = config["gpu"]
    with lightning_quiet(True):
        trainer = lightning_trainer(
            cfg,
            callbacks,
            checkpoint,
            True,
            accelerator="gpu" if gpu else "cpu",
            devices="auto",
            num_nodes=1,
            strategy=RayDDPStrategy(broadcast_buffers=False),
            plugins=[RayLightningEnvironment()],
            use_distributed_sampler=batches is None,
        )
        trainer = prepare_trainer(trainer)
        if cfg.trainer.max_epochs > 0:
            trainer.fit(model, positions_loader(model, cfg, 1, batches))
    if rank != 0:
        if own_dir is not None and not cfg.checkpoint_dir:
            shutil.rmtree(own_dir, ignore_errors=True)  # rank 0 alone saves checkpoints
        ray.train.report({})  # and reports the weights
        return
    # the best epoch's weights, as a local fit takes them (no MLflow run here: nothing logged)
    model, _ = finish_fit(model, cfg, checkpoint, log_history=False)
    out = Path(tempfile.mkdtemp(prefix="recfb-ray-fit-"))
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, out / "state.pt")
    (out / "history.json").write_text(json.dumps(model.history))
    ray.train.report({"epochs": len(model.history)}, checkpoint=ray.train.Checkpoint(str(out)))
    shutil.rmtree(out, ignore_errors=True)  # reported: Ray has its copy in the run's storage


def fit_on_ray(cfg: Any, data: Any, quiet: bool, log_history: bool = True) -> tuple[Any, list]:
    """`_fit_embedding` on Ray Train: the fitted model (weights of the best epoch) and its
    per-epoch history, as a local fit returns them."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from recfb.train.fit import build_model, finish_fit
    from recfb.train.shard import TrainTotals, user_shards

    if data.directory is None:
        raise ConfigError(
            "engine: ray trains from an ETL output directory its workers can read "
            "(data=...); these interactions are in memory"
        )
    connect(cfg.ray)
    gpu = cfg.trainer.accelerator in ("gpu", "cuda") or (
        cfg.trainer.accelerator == "auto" and torch.cuda.is_available()
    )
    totals = TrainTotals.of(data, cfg)
    shards = None
    if cfg.model.family != "lightgcn":  # LightGCN propagates over the whole graph
        shards = user_shards(data.train, data.n_users, cfg.train_min_label, cfg.ray.workers)
        tracking.log_params({"ray.train_shards": _described(shards)})
    storage = Path(tempfile.mkdtemp(prefix="recfb-ray-train-", dir=cfg.checkpoint_dir))
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={
            "cfg": worker_config(cfg).model_dump(mode="json"),
            "data": str(Path(data.directory).resolve()),
            "shards": shards,
            "totals": totals,
            "has_valid": data.valid.height > 0,
            "threads": cfg.ray.cpus_per_worker,
            "gpu": gpu,
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.ray.workers,
            use_gpu=gpu,
            resources_per_worker={"CPU": cfg.ray.cpus_per_worker},
        ),
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        run_config=RunConfig(storage_path=str(storage), name="fit"),
    )
    try:
        result = trainer.fit()
        if result.error is not None:
            raise result.error
        with result.checkpoint.as_directory() as found:
            state = torch.load(Path(found) / "state.pt", map_location="cpu", weights_only=True)
            history = json.loads((Path(found) / "history.json").read_text())
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    model = build_model(cfg, data, totals)
    model.load_state_dict(state, strict=False)
    model.history = history
    return finish_fit(model, cfg, None, log_history)  # the history logged, as a local fit


def _described(shards: list[Any]) -> str:
    """Each worker's users and training positives, for the run's parameters."""
    return ", ".join(f"users {s.start}-{s.stop - 1}: {s.positives} positives" for s in shards)

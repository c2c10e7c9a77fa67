"""One fit's parts, shared by a fit in this process (`recfb.train.loop`) and on Ray Train
(`recfb.train.on_ray`): the model built from the data, the batches of pair positions, the
valid split's evaluation and early stopping, the Lightning trainer, the best epoch's weights."""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import polars as pl
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler

from recfb import tracking
from recfb.errors import InputError, RecfbError
from recfb.etl.interactions import source_label
from recfb.evaluate import EvalConfig, ranking_sums
from recfb.models import EmbeddingRecommender
from recfb.models.config import family
from recfb.models.lightgcn import normalized_adjacency
from recfb.train.config import TrainConfig
from recfb.train.data import Interactions, csr_by_user, item_attribute, recency_weighted
from recfb.train.fallback import PopularityFallback
from recfb.train.shard import TrainTotals


def eval_config(cfg: TrainConfig, data: Interactions) -> EvalConfig:
    """The evaluation settings of a run on its data (the signal map's exclusion rule)."""
    e = cfg.eval
    return EvalConfig(
        ks=tuple(e.ks),
        exclude=e.exclude,
        exclude_min_level=e.exclude_min_level,
        hidden_labels=data.hidden_labels,
        relevant_min_level=e.relevant_min_level,
    )


def training_tensors(
    data: Interactions, cfg: TrainConfig, totals: TrainTotals
) -> dict[str, torch.Tensor]:
    """Positives, explicit negatives and per-user lookups as tensors for the model's buffers."""
    train = recency_weighted(data.train, cfg.recency_half_life_days, totals.newest)
    pos = train.filter(pl.col("label") >= cfg.train_min_label)
    if pos.height == 0:
        raise ValueError(f"no train pairs with label >= {cfg.train_min_label} in {data.directory}")
    users = pos["user_idx"].to_numpy().astype(np.int64)
    items = pos["item_idx"].to_numpy().astype(np.int64)
    neg = train.filter(pl.col("label") == -1)
    neg_indptr, neg_items = csr_by_user(
        neg["user_idx"].to_numpy().astype(np.int64),
        neg["item_idx"].to_numpy().astype(np.int64),
        data.n_users,
    )
    pos_indptr, pos_by_user = csr_by_user(users, items, data.n_users)
    keys = users * data.n_items + items
    order = np.argsort(keys)
    return {
        "pos_users": torch.as_tensor(users),
        "pos_items": torch.as_tensor(items),
        "pos_labels": torch.as_tensor(pos["label"].to_numpy().astype(np.int64)),
        "pos_weights": torch.as_tensor(pos["weight"].to_numpy().astype(np.float32)),
        "pos_matured": torch.as_tensor(pos["matured"].to_numpy().astype(bool)),
        "neg_indptr": neg_indptr,
        "neg_items": neg_items,
        "pos_indptr": pos_indptr,
        "pos_by_user": pos_by_user,
        "pair_keys": torch.as_tensor(keys[order]),
        "pair_index": torch.as_tensor(order),
    }


def build_model(
    cfg: TrainConfig, data: Interactions, totals: TrainTotals | None = None
) -> EmbeddingRecommender:
    """The model of `cfg` over `data`'s train pairs. `totals`: the whole train table's
    statistics where `data` holds only some users' pairs (a DDP rank's shard)."""
    totals = totals or TrainTotals.of(data, cfg)
    tensors = training_tensors(data, cfg, totals)
    popularity = torch.as_tensor(totals.popularity, dtype=torch.float32)
    kwargs: dict[str, Any] = {}
    if cfg.model.family == "lightgcn":
        edges = data.train.filter(pl.col("label") >= cfg.model.edge_min_label)
        weights = (
            torch.as_tensor(edges["label"].to_numpy().astype(np.float32))
            if cfg.model.edge_weight_by_level
            else torch.ones(edges.height)
        )
        kwargs["adjacency"] = normalized_adjacency(
            torch.as_tensor(edges["user_idx"].to_numpy().astype(np.int64)),
            torch.as_tensor(edges["item_idx"].to_numpy().astype(np.int64)),
            weights,
            data.n_users,
            data.n_items,
        )
    if getattr(cfg.model, "item_features", None):
        kwargs["item_feature_codes"] = item_feature_codes(data, cfg.model.item_features)
    if cfg.model.family == "gnolr":
        total = totals.positives * (1 + cfg.model.n_negatives)
        kwargs["level_rates"] = torch.as_tensor(totals.level_counts / total).float()
    if totals.exposure is not None:
        kwargs["item_exposure"] = torch.as_tensor(totals.exposure, dtype=torch.float32)
    cls = family(cfg.model.family).load_class()
    model = cls(
        data.n_users,
        data.n_items,
        data.n_levels,
        cfg.embedding_settings().model_dump(mode="json"),
        train_pairs=tensors,
        item_popularity=popularity,
        **kwargs,
    )
    model.monitor = cfg.trainer.monitor
    return model


def item_feature_codes(data: Interactions, names: list[str]) -> dict[str, torch.Tensor]:
    """Dense codes (1..V, 0 = unknown) per item for categorical columns of the ETL's pairs."""
    out = {}
    for name in names:
        try:
            values = item_attribute(data.directory, name)
        except InputError as exc:
            raise InputError(
                f"model.item_features names '{name}', which the ETL output does not carry",
                file=exc.file,
                field=name,
            ) from exc
        codes = np.zeros(data.n_items, dtype=np.int64)
        dense = values[name].cast(pl.Utf8).rank("dense").cast(pl.Int64).to_numpy()
        codes[values["item_idx"].to_numpy()] = dense
        out[name] = torch.as_tensor(codes)
    return out


def heldout_of(data: Interactions, split: str, cfg: TrainConfig) -> pl.DataFrame:
    """The held-out pairs a run is evaluated on: the split's, or (eval.organic_only) those
    its users reached organically (`recfb.etl.exposure.organic_heldout`)."""
    pairs = getattr(data, split)
    if not cfg.eval.organic_only:
        return pairs
    from recfb.etl.exposure import organic_heldout

    return organic_heldout(data.events, pairs, split, source_label(data))


def evaluate_scorer(
    scorer: Any,
    data: Interactions,
    heldout: pl.DataFrame,
    cfg: TrainConfig,
    totals: TrainTotals | None = None,
    combine: Callable[[np.ndarray, str], np.ndarray] | None = None,
) -> dict[str, float]:
    """Full-ranking metrics of any object with `score(users)` on a held-out table, served as
    in production: users without train positives get the popularity fallback. On a DDP rank
    that holds only its users' pairs: `totals` (the whole table's popularity) and `combine`
    (`recfb.train.shard.all_reduce`), which adds every rank's sums before they are divided."""
    if heldout.height == 0 and combine is None:
        return {}
    popularity = totals.popularity if totals is not None else data.item_popularity()
    served = PopularityFallback.from_train(
        scorer, data.train, data.n_users, data.n_items, popularity
    )
    sums = ranking_sums(
        served.score,
        data.n_items,
        heldout,
        data.train,
        data.level_names,
        eval_config(cfg, data),
        popularity,
    )
    users = torch.as_tensor(heldout["user_idx"].unique().to_numpy().astype(np.int64))
    cold = np.array([float((~served.is_warm(users)).sum()), float(len(users))])
    if combine is not None:
        sums, cold = sums.combined(combine), combine(cold, "sum")
    metrics = sums.metrics()
    metrics["cold_user_share"] = float(cold[0] / cold[1]) if cold[1] else 0.0
    return metrics


def warm_start(model: EmbeddingRecommender, cfg: TrainConfig, data: Interactions) -> dict:
    """Copy a previous run's vectors into ``model`` by id (users and items it knew); the rest
    keep their fresh initialisation. Returns how many rows were copied."""
    from recfb.train.runs import load_run

    if cfg.model.family != "mf" or getattr(cfg.model, "item_features", None):
        raise RecfbError("init_from_run: warm starts are implemented for MF without item features")
    old_cfg, old = load_run(cfg.init_from_run)
    copied = {}
    for kind, table, vectors in (
        ("user", model.user_embedding, old.user_vectors),
        ("item", model.item_embedding, old.item_vectors),
    ):
        new_ids = pl.read_parquet(
            data.directory / f"{kind}s.parquet", columns=[f"{kind}_idx", f"{kind}_id"]
        )
        old_ids = pl.read_parquet(
            Path(old_cfg.data) / f"{kind}s.parquet", columns=[f"{kind}_idx", f"{kind}_id"]
        )
        both = new_ids.join(old_ids, on=f"{kind}_id", suffix="_old").filter(
            (pl.col(f"{kind}_idx") < table.num_embeddings)
            & (pl.col(f"{kind}_idx_old") < len(vectors))
        )
        if vectors.shape[1] != table.embedding_dim:
            raise RecfbError(
                f"init_from_run: run {cfg.init_from_run} has dim {vectors.shape[1]}, "
                f"this model {table.embedding_dim}"
            )
        new_rows = torch.as_tensor(both[f"{kind}_idx"].to_numpy().astype(np.int64))
        old_rows = torch.as_tensor(both[f"{kind}_idx_old"].to_numpy().astype(np.int64))
        with torch.no_grad():
            table.weight[new_rows] = vectors[old_rows].to(table.weight.dtype)
        copied[kind] = len(new_rows)
    return copied


def early_stopping(
    model: EmbeddingRecommender,
    cfg: TrainConfig,
    data: Interactions,
    evaluator: Callable[[EmbeddingRecommender], dict[str, float]] | None = None,
) -> tuple[list[Any], Any]:
    """Where there is a valid split: the model evaluates itself after each epoch, training
    stops when the monitored metric stops rising, and the best epoch's weights are kept
    (the callbacks, and the checkpoint callback or None). `evaluator`: how (a DDP rank that
    holds only its users' pairs evaluates them and combines); by default `evaluate_scorer`
    on `data`'s valid split, where it has one."""
    monitor = f"valid/{cfg.trainer.monitor}"
    callbacks: list[Any] = []
    checkpoint = None
    if evaluator is None and data.valid.height:
        valid = heldout_of(data, "valid", cfg)

        def evaluator(m: EmbeddingRecommender) -> dict[str, float]:
            return evaluate_scorer(m, data, valid, cfg)

    if evaluator is not None:
        model.evaluator = evaluator
        callbacks.append(
            EarlyStopping(
                monitor=monitor,
                mode="max",
                patience=cfg.trainer.patience,
                check_on_train_epoch_end=True,
            )
        )
        if cfg.checkpoint_dir:
            Path(cfg.checkpoint_dir).mkdir(parents=True, exist_ok=True)
        checkpoint = ModelCheckpoint(
            dirpath=tempfile.mkdtemp(prefix="recfb-ckpt-", dir=cfg.checkpoint_dir),
            monitor=monitor,
            mode="max",
            save_top_k=1,
            save_on_train_epoch_end=True,
        )
        callbacks.append(checkpoint)
    return callbacks, checkpoint


@contextmanager
def lightning_quiet(quiet: bool) -> Iterator[None]:
    """Lightning's start-up notes (accelerators, tips) at WARNING while a quiet fit runs."""
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    if quiet:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def lightning_trainer(
    cfg: TrainConfig, callbacks: list, checkpoint: Any, quiet: bool, **placement: Any
) -> L.Trainer:
    """The Lightning trainer of a fit; `placement` (strategy, devices, plugins...) overrides
    the config's where another engine places the work (Ray Train's workers)."""
    t = cfg.trainer
    where = {
        "accelerator": t.accelerator,
        "devices": t.devices,
        "strategy": t.strategy,
        "num_nodes": t.num_nodes,
    }
    return L.Trainer(
        max_epochs=t.max_epochs,
        **(where | placement),
        precision=t.precision,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=checkpoint is not None,
        enable_progress_bar=not quiet,
        enable_model_summary=False,
        deterministic=True,
        num_sanity_val_steps=0,
    )


class PairPositions(Dataset):
    """Positions 0..n-1 of the train pairs, fetched a whole batch at a time: the default
    fetch (one 0-d tensor per position, then stacked) took ~20 ms per 4096-batch."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor(index)

    def __getitems__(self, indices: list[int] | torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(indices, dtype=torch.long)


class ShuffledBatches(BatchSampler):
    """The batches a BatchSampler over a seeded RandomSampler yields (the same positions in
    the same order), as slices of the epoch's permutation: the default path yields each
    position as a Python int and lists them (~5 ms a 32768-batch at 10M pairs, profiled).
    Any other sampler (Lightning's DistributedSampler under DDP) batches as BatchSampler."""

    def __iter__(self) -> Iterator[Any]:
        sampler = self.sampler
        if (
            type(sampler) is not RandomSampler
            or sampler.replacement
            or sampler.generator is None
            or sampler.num_samples != len(sampler.data_source)
            or self.drop_last
        ):
            yield from super().__iter__()
            return
        n, size = sampler.num_samples, self.batch_size
        order = torch.randperm(n, generator=sampler.generator)
        for start in range(0, n, size):
            if start + size > n:  # RandomSampler runs out while this partial batch fills...
                self._spent_draw(n)
            yield order[start : start + size]
        if n % size == 0:  # ...or on the call after the last full batch
            self._spent_draw(n)

    def _spent_draw(self, n: int) -> None:
        """RandomSampler draws a second permutation (sliced to nothing) when it runs out: drawn
        at the same moment, so that the next epoch's order is the same as with it (a trainer
        that stops after len(loader) batches never makes the call after the last one)."""
        torch.randperm(n, generator=self.sampler.generator)


def as_batch(batch: torch.Tensor) -> torch.Tensor:
    return batch


# optimiser steps per loader batch where a fit runs in one process (`train_loader`)
STEPS_PER_LOADER_BATCH = 8


def train_loader(model: EmbeddingRecommender, cfg: TrainConfig) -> DataLoader:
    """The loader a fit trains on: on one device in one process, each of its batches holds
    STEPS_PER_LOADER_BATCH steps' positions (the model steps once per `batch_size` of them,
    `EmbeddingRecommender.training_step`), so that Lightning's work per batch (hooks,
    logging, progress: ~0.9 ms of CPU, a sixth of an SGD step at batch 4096 on 10M pairs,
    1 thread, measured) is paid once for them. The steps see the same positions in the same
    order as with one step per batch. Under several devices or processes (DDP) each step
    must synchronise: one step per batch."""
    t = cfg.trainer
    devices = str(t.devices)
    one_device = devices == "1" or (
        devices == "auto" and (t.accelerator == "cpu" or torch.cuda.device_count() <= 1)
    )
    single = (
        one_device
        and t.num_nodes == 1
        and str(t.strategy) in ("auto", "single_device")
        and not model.cfg.optim.distributed
    )
    return positions_loader(model, cfg, STEPS_PER_LOADER_BATCH if single else 1)


def positions_loader(
    model: EmbeddingRecommender, cfg: TrainConfig, steps: int = 1, batches: Sampler | None = None
) -> DataLoader:
    """Shuffled batches of positive-pair positions (a map-style dataset, so Lightning can
    shard it with a DistributedSampler under DDP), `steps` x batch_size positions each;
    `batches`: another batch sampler over them (a DDP rank's own shard: `PaddedBatches`)."""
    positions = PairPositions(len(model.pos_users))
    if batches is not None:
        return DataLoader(positions, batch_sampler=batches, collate_fn=as_batch)
    # one generator for the loader's base seed and the order, drawn in the order that
    # DataLoader(shuffle=True, generator=...) draws them: the same batches as before
    generator = torch.Generator().manual_seed(cfg.seed)
    shuffled = RandomSampler(positions, generator=generator)
    return DataLoader(
        positions,
        batch_sampler=ShuffledBatches(shuffled, cfg.trainer.batch_size * steps, drop_last=False),
        generator=generator,
        collate_fn=as_batch,
    )


def finish_fit(
    model: EmbeddingRecommender, cfg: TrainConfig, checkpoint: Any, log_history: bool
) -> tuple[EmbeddingRecommender, list[dict[str, float]]]:
    """The best checkpoint's weights back into the model, the history logged."""
    history = list(model.history)
    for row in history if log_history else []:
        tracking.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))
    if checkpoint is not None and checkpoint.best_model_path:
        state = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=False)
        model.load_state_dict(state["state_dict"], strict=False)
        tracking.log_file(checkpoint.best_model_path, "checkpoint")
    drop_checkpoints(checkpoint, cfg)
    model.eval()
    model._cache = None
    return model, history


def drop_checkpoints(checkpoint: Any, cfg: TrainConfig) -> None:
    """Remove the temporary checkpoint directory `early_stopping` made (kept where the
    config names one), saved into or not (no epoch ran, or another DDP rank saved)."""
    if checkpoint is not None and not cfg.checkpoint_dir:
        shutil.rmtree(checkpoint.dirpath, ignore_errors=True)

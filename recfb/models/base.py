"""The training loop every embedding model shares: sampling, losses, denoising, debiasing.

A model only says how it turns ids into vectors (`encode`) and, if it needs to, how a batch
becomes per-example losses (`example_losses`). Everything else lives here once:
- batched negative sampling on the device (uniform, with a user's explicit negatives swapped
  in as hard negatives), so sampling never dominates a step;
- a step touches only its batch's rows where the model allows it (`batch_encoder`), and
  embedding tables get sparse gradients and `RowSparseAdam` (SparseAdam's update, applied
  with row index operations), so its cost does not grow with the catalogue (graph models,
  which must propagate everything, use dense Adam);
- losses: BPR, sampled softmax (in-batch + uniform negatives with log-q correction), BCE;
- PLD: after warm-up, each positive is resampled from a pool of the user's own positives with
  probability softmax(-loss/tau), so the user's noisy positives (high loss) are drawn less;
- T-CE: after warm-up, the highest-loss share of positives is dropped, ramped up over epochs;
- IPS (Rel-MF): propensity theta_i = (pop_i / max pop)^eta, clipped; with the BCE loss the
  unbiased estimator (y/theta) l(s,1) + (1 - y/theta) l(s,0), otherwise 1/theta weights.
  `debias.propensity: exposure` puts the logged impressions per item (`item_exposure`) in
  place of the popularity proxy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from recfb.models.config import DenoiseConfig, EmbeddingSettings


class EmbeddingRecommender(L.LightningModule):
    """Base class: inner-product recommenders trained on positive pairs."""

    family = "base"

    def __init__(
        self,
        n_users: int,
        n_items: int,
        n_levels: int,
        config: dict[str, Any],
        train_pairs: dict[str, torch.Tensor] | None = None,
        item_popularity: torch.Tensor | None = None,
        item_exposure: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(
            ignore=[
                "train_pairs",
                "item_popularity",
                "item_exposure",
                "adjacency",
                "level_rates",
                "item_feature_codes",
            ]
        )
        self.cfg = EmbeddingSettings.model_validate(config)
        self.n_users, self.n_items, self.n_levels = n_users, n_items, n_levels
        pairs = train_pairs or _empty_pairs()
        for name, tensor in pairs.items():
            self.register_buffer(name, tensor, persistent=False)
        pop = item_popularity if item_popularity is not None else torch.ones(n_items)
        pop = pop.float().clamp(min=0)
        self.register_buffer("log_q", torch.log((pop + 1) / (pop + 1).sum()), persistent=False)
        debias = self.cfg.debias
        counts = pop
        if debias.propensity == "exposure":
            if item_exposure is None and debias.ips and train_pairs is not None:
                raise ValueError(
                    "debias.propensity=exposure needs the logged impressions per item "
                    "(item_exposure); the data gives none"
                )
            if item_exposure is not None:
                counts = item_exposure.float().clamp(min=0)
        theta = (counts / counts.max().clamp(min=1)).pow(debias.eta)
        self.register_buffer("propensity", theta.clamp(min=debias.clip), persistent=False)
        # sparse gradients on the embedding tables (RowSparseAdam), unless weight decay is asked
        # for or a DDP strategy is used (NCCL cannot all-reduce sparse gradients)
        optim = self.cfg.optim
        self.sparse_embeddings = (
            optim.sparse_embeddings and optim.weight_decay == 0 and not optim.distributed
        )
        # optimisation is manual so that sparse and dense parameters can have their own
        # optimisers (Lightning's automatic mode takes one)
        self.automatic_optimization = False
        self.monitor: str | None = None  # the validation metric shown on the progress bar
        self.evaluator: Callable[[EmbeddingRecommender], dict[str, float]] | None = None
        self.history: list[dict[str, float]] = []
        self._cache: tuple[torch.Tensor, torch.Tensor] | None = None

    # --- what a model provides ----------------------------------------------------------
    def encode(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(query vectors of all users, vectors of all items); score = inner product."""
        raise NotImplementedError

    def batch_encoder(
        self,
    ) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
        """Functions from user ids / item ids to vectors for one training step.

        The default encodes everything once per step (what graph models need); models whose
        vectors are row lookups override it, so that a step reads and updates only its rows."""
        users_all, items_all = self.encode()
        return users_all.__getitem__, items_all.__getitem__

    def embedding_table(self, n: int, dim: int) -> nn.Embedding:
        """An embedding table, N(0, 0.1) initialised, sparse when the trainer allows it."""
        table = nn.Embedding(n, dim, sparse=self.sparse_embeddings)
        nn.init.normal_(table.weight, std=0.1)
        return table

    def example_losses(
        self,
        users_vec: torch.Tensor,
        pos_vec: torch.Tensor,
        neg_vec: torch.Tensor,
        pos: torch.Tensor,
        labels: torch.Tensor,
        matured: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-positive loss (B,) from the query, positive (B,D) and negative (B,N,D) vectors.

        `matured` says which labels are final; an ordinal model treats the others as censored
        (the pair may still go deeper), the pairwise losses need only that it is positive."""
        s_pos = (users_vec * pos_vec).sum(-1)
        # elementwise, not einsum: its backward runs as (B, D, 1) x (B, 1, N) batched matrix
        # products, the largest single cost of an MF step on CPU (profiled)
        s_neg = (users_vec.unsqueeze(1) * neg_vec).sum(-1)
        if self.cfg.model.loss in ("bpr", "bce"):
            return self.pairwise_losses(s_pos, s_neg, pos)
        # sampled softmax: the other positives of the batch plus uniform negatives, log-q
        # corrected (in-batch items are drawn by popularity, uniform ones with q = 1/n)
        t = self.cfg.model.temperature
        in_batch = users_vec @ pos_vec.T - self.log_q[pos].unsqueeze(0)
        same = pos.unsqueeze(0) == pos.unsqueeze(1)
        eye = torch.eye(len(pos), dtype=torch.bool, device=pos.device)
        in_batch = in_batch.masked_fill(same & ~eye, float("-inf"))
        uniform = s_neg + torch.log(torch.tensor(float(self.n_items), device=s_neg.device))
        logits = torch.cat([in_batch, uniform], dim=1) / t
        out = F.cross_entropy(logits, torch.arange(len(pos), device=pos.device), reduction="none")
        return out / self.propensity[pos] if self.cfg.debias.ips else out

    def pairwise_losses(
        self, s_pos: torch.Tensor, s_neg: torch.Tensor, pos: torch.Tensor
    ) -> torch.Tensor:
        """Per-positive BPR or BCE loss (B,) from the positive (B,) and negative (B,N) scores."""
        if self.cfg.model.loss == "bpr":
            out = F.softplus(-(s_pos.unsqueeze(1) - s_neg)).mean(1)
            return out / self.propensity[pos] if self.cfg.debias.ips else out
        neg_term = F.softplus(s_neg).mean(1)
        if self.cfg.debias.ips:
            inv = 1.0 / self.propensity[pos]
            return (
                inv * F.softplus(-s_pos)
                + self._bce_negative_weight(inv) * F.softplus(s_pos)
                + neg_term
            )
        return F.softplus(-s_pos) + neg_term

    def _bce_negative_weight(self, inv: torch.Tensor) -> torch.Tensor:
        """IPS-BCE's weight (1 - y/theta) of a positive's l(s, 0) term."""
        return (1 - inv).clamp(min=0) if self.cfg.debias.nonnegative else 1 - inv

    @torch.no_grad()
    def pairwise_step(
        self, scores: torch.Tensor, pos: torch.Tensor, weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch loss of `batch_loss` and its gradient with respect to the scores, in
        closed form (no autograd): scores (B, 1+N) hold the positive's score in column 0.

        Covers the pairwise losses (BPR, BCE; IPS weights; T-CE's drop). With
        l_b the per-positive loss and c_b = w_b / sum(w), the loss is sum_b c_b l_b, so
        dL/ds = c_b dl_b/ds: BPR's dl/ds_neg_n = sigmoid(s_neg_n - s_pos) / N (/ theta),
        dl/ds_pos = -sum_n of that; BCE's dl/ds_neg_n = sigmoid(s_neg_n) / N and
        dl/ds_pos = -a sigmoid(-s_pos) + b sigmoid(s_pos) (a = 1/theta, b = 1 - 1/theta with
        IPS; a = 1, b = 0 without)."""
        s_pos, s_neg = scores[:, 0], scores[:, 1:]
        losses = self.pairwise_losses(s_pos, s_neg, pos)
        drop = tce_drop_share(self.cfg.denoise, self.current_epoch)
        if drop > 0:  # only the kept positives count, and only their weights normalise
            keep = max(1, int(round(len(losses) * (1 - drop))))
            kept = torch.topk(losses, keep, largest=False).indices
            weights = torch.zeros_like(weights).index_copy_(0, kept, weights[kept])
        coef = weights / weights.sum().clamp(min=1e-8)
        loss = (losses * coef).sum()
        grad = torch.empty_like(scores)
        n = s_neg.shape[1]
        ips = self.cfg.debias.ips
        if self.cfg.model.loss == "bpr":
            scale = coef / self.propensity[pos] if ips else coef
            grad[:, 1:] = torch.sigmoid(s_neg - s_pos.unsqueeze(1)).mul_((scale / n).unsqueeze(1))
            grad[:, 0] = -grad[:, 1:].sum(1)
            return loss, grad
        grad[:, 1:] = torch.sigmoid(s_neg).mul_((coef / n).unsqueeze(1))
        if ips:
            inv = 1.0 / self.propensity[pos]
            d_pos = -inv * torch.sigmoid(-s_pos) + self._bce_negative_weight(inv) * torch.sigmoid(
                s_pos
            )
        else:
            d_pos = -torch.sigmoid(-s_pos)
        grad[:, 0] = d_pos * coef
        return loss, grad

    def closed_form_backward(self, idx: torch.Tensor) -> torch.Tensor | None:
        """Set the parameters' gradients of `batch_loss(idx)` without autograd and return the
        loss, where a model can (MF's pairwise losses); None: the step uses autograd."""
        return None

    # --- sampling ------------------------------------------------------------------------
    def sample_negatives(self, users: torch.Tensor) -> torch.Tensor:
        n = self.cfg.model.n_negatives
        neg = torch.randint(0, self.n_items, (len(users), n), device=users.device)
        start, end = self.neg_indptr[users], self.neg_indptr[users + 1]
        has = end > start
        if has.any() and self.cfg.model.hard_negative_prob > 0:
            pick = start + (torch.rand(len(users), device=users.device) * (end - start)).long()
            pick = pick.clamp(max=max(len(self.neg_items) - 1, 0))
            swap = has & (
                torch.rand(len(users), device=users.device) < self.cfg.model.hard_negative_prob
            )
            if len(self.neg_items):
                neg[:, 0] = torch.where(swap, self.neg_items[pick], neg[:, 0])
        return neg

    def _pld_resample(
        self,
        uvec: torch.Tensor,
        item_vectors: Callable[[torch.Tensor], torch.Tensor],
        users: torch.Tensor,
        pos: torch.Tensor,
        neg: torch.Tensor,
    ) -> torch.Tensor:
        """Resample each positive from a pool of the user's positives by softmax(-loss/tau):
        k positives of the user (the drawn one in column 0), each with its pairwise loss
        against the mean negative score."""
        k = self.cfg.denoise.pool
        start, end = self.pos_indptr[users], self.pos_indptr[users + 1]
        pick = (
            start.unsqueeze(1)
            + (torch.rand(len(users), k, device=users.device) * (end - start).unsqueeze(1)).long()
        )
        pool = self.pos_by_user[pick]  # (B, k)
        pool[:, 0] = pos
        with torch.no_grad():
            s_pool = torch.einsum("bd,bkd->bk", uvec, item_vectors(pool))
            s_neg = torch.einsum("bd,bnd->bn", uvec, item_vectors(neg)).mean(1, keepdim=True)
            pool_loss = F.softplus(-(s_pool - s_neg))
            weights = torch.softmax(-pool_loss / self.cfg.denoise.tau, dim=1)
            choice = torch.multinomial(weights, 1).squeeze(1)
        return pool.gather(1, choice.unsqueeze(1)).squeeze(1)

    # --- Lightning hooks -----------------------------------------------------------------
    def batch_loss(self, idx: torch.Tensor) -> torch.Tensor:
        """The weighted training loss of one batch of positive-pair indices."""
        users = self.pos_users[idx]
        neg = self.sample_negatives(users)
        user_vectors, item_vectors = self.batch_encoder()
        uvec = user_vectors(users)
        idx = self._denoised_index(idx, users, neg, uvec, item_vectors)
        pos, labels, weights = self.pos_items[idx], self.pos_labels[idx], self.pos_weights[idx]
        matured = self.pos_matured[idx] if len(self.pos_matured) else None
        # positives and negatives in one lookup: one sparse gradient per table, not two that
        # autograd must concatenate; split (its backward concatenates), not slicing (its
        # backward zero-fills a full-size gradient per slice)
        rows = item_vectors(torch.cat([pos.unsqueeze(1), neg], 1))
        pos_vec, neg_vec = rows.split([1, neg.shape[1]], dim=1)
        losses = self.example_losses(uvec, pos_vec.squeeze(1), neg_vec, pos, labels, matured)
        drop = tce_drop_share(self.cfg.denoise, self.current_epoch)
        if drop > 0:
            keep = max(1, int(round(len(losses) * (1 - drop))))
            kept = torch.topk(losses.detach(), keep, largest=False).indices
            losses, weights = losses[kept], weights[kept]
        return (losses * weights).sum() / weights.sum().clamp(min=1e-8)

    def _denoised_index(
        self,
        idx: torch.Tensor,
        users: torch.Tensor,
        neg: torch.Tensor,
        uvec: torch.Tensor,
        item_vectors: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """The batch's pair indices, with PLD's resampled positives once it is warm."""
        dn = self.cfg.denoise
        if dn.method == "pld" and self.current_epoch >= dn.warmup_epochs:
            new_pos = self._pld_resample(uvec, item_vectors, users, self.pos_items[idx], neg)
            # a resampled positive brings its own pair's label, weight and maturity
            idx = self._pair_index(users, new_pos, idx)
        return idx

    def _trains_in_float32(self) -> bool:
        """Whether the trainer (if any) runs at 32-bit precision: the closed-form steps'
        condition, which compute in the tables' own dtype outside autocast."""
        trainer = self._trainer
        return trainer is None or str(trainer.precision) in ("32-true", "32")

    def sgd_step(self, idx: torch.Tensor, lr: float) -> torch.Tensor | None:
        """One plain SGD step of `batch_loss(idx)` at rate `lr` done by the model itself, the
        update added straight into its tables, and its loss; None: the step goes through
        gradients and the optimiser. Called only when one RowSparseSGD holds every
        parameter (MF's pairwise losses do it)."""
        return None

    def training_step(self, idx: torch.Tensor, batch_idx: int) -> torch.Tensor:
        """One optimiser step per `optim.step_batch` positions of the loader's batch (one
        per batch when unset): the loader may hand several steps' positions at once, so
        that Lightning's own per-batch work is paid once for them."""
        self._cache = None
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        lr = _sole_sgd_rate(optimizers)
        size = self.cfg.optim.step_batch
        parts = idx.split(size) if size and len(idx) > size else (idx,)
        losses = []
        for part in parts:
            loss = None if lr is None else self.sgd_step(part, lr)
            if loss is None:
                for opt in optimizers:
                    opt.zero_grad()
                loss = self.closed_form_backward(part)
                if loss is None:
                    loss = self.batch_loss(part)
                    self.manual_backward(loss)
            # after `sgd_step` no table has a gradient and this only counts the step: Lightning's
            # global step, which checkpointing needs (it saves only when the step has moved)
            for opt in optimizers:
                opt.step()
            losses.append(loss.detach())
        if len(parts) > 1:  # the batch's mean, as the epoch's mean weighs it
            sizes = torch.tensor([len(p) for p in parts], dtype=losses[0].dtype)
            loss = (torch.stack(losses) * sizes).sum() / len(idx)
        self.log("train/loss", loss, on_step=False, on_epoch=True, batch_size=len(idx))
        return loss

    def _pair_index(
        self, users: torch.Tensor, items: torch.Tensor, fallback: torch.Tensor
    ) -> torch.Tensor:
        """Index of the (user, item) positive pairs via the sorted pair keys (else fallback)."""
        keys = users * self.n_items + items
        where = torch.searchsorted(self.pair_keys, keys).clamp(max=len(self.pair_keys) - 1)
        found = self.pair_keys[where] == keys
        return torch.where(found, self.pair_index[where], fallback)

    def on_train_epoch_end(self) -> None:
        self._cache = None
        row: dict[str, float] = {"epoch": float(self.current_epoch)}
        loss = self.trainer.callback_metrics.get("train/loss")
        if loss is not None:
            row["train/loss"] = float(loss)
        if self.evaluator is not None:
            was_training = self.training
            self.eval()
            metrics = self.evaluator(self)
            self.train(was_training)
            for key, value in metrics.items():
                self.log(f"valid/{key}", value, prog_bar=key == self.monitor)
                row[f"valid/{key}"] = value
        self.history.append(row)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """`optim.optimizer`'s row-sparse form for sparse embedding tables (RowSparseAdam,
        RowSparseAdagrad, RowSparseSGD), torch's own for every other parameter."""
        sparse = [m.weight for m in self.modules() if isinstance(m, nn.Embedding) and m.sparse]
        sparse_ids = {id(p) for p in sparse}
        dense = [p for p in self.parameters() if id(p) not in sparse_ids]
        lr, decay = self.cfg.optim.lr, self.cfg.optim.weight_decay
        row_sparse, dense_cls = OPTIMIZERS[self.cfg.optim.optimizer]
        optimizers: list[torch.optim.Optimizer] = []
        if sparse:
            optimizers.append(row_sparse(sparse, lr=lr))
        if dense:
            optimizers.append(dense_cls(dense, lr=lr, weight_decay=decay))
        return optimizers

    # --- inference -----------------------------------------------------------------------
    @torch.no_grad()
    def vectors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached (user query vectors, item vectors) for scoring and export."""
        if self._cache is None or self.training:
            self._cache = tuple(t.detach() for t in self.encode())  # type: ignore[assignment]
        return self._cache  # type: ignore[return-value]

    @torch.no_grad()
    def score(self, users: torch.Tensor) -> torch.Tensor:
        """Scores of every item for each user (B, n_items); higher is better."""
        users_all, items_all = self.vectors()
        return users_all[users.to(users_all.device)] @ items_all.T


def set_row_gradient(param: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> None:
    """param.grad = the sparse row gradient that puts values[k] on row index[k] (repeats
    summed), left uncoalesced: an optimiser that needs distinct rows merges them
    (`unique_rows`), plain SGD adds the rows as they are."""
    param.grad = torch.sparse_coo_tensor(
        index.unsqueeze(0), values, param.shape, check_invariants=False
    )


def distinct_slots(index: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted distinct values of `index`, each entry's position among them), for ids below n,
    found by marking an n-sized mask instead of sorting: O(n + len(index))."""
    mark = torch.zeros(n, dtype=torch.bool, device=index.device)
    mark[index] = True
    distinct = mark.nonzero().squeeze(1)
    slot = torch.empty(n, dtype=torch.long, device=index.device)
    slot[distinct] = torch.arange(len(distinct), device=index.device)
    return distinct, slot[index]


def unique_rows(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted distinct rows, their summed gradient rows) of a sparse row gradient, without
    the sort that coalescing does over the batch's (B x rows-per-example) indices."""
    index, values = grad._indices()[0], grad._values()
    if grad.is_coalesced():  # already distinct and sorted (a closed-form step's gradient)
        return index, values
    rows, slots = distinct_slots(index, grad.shape[0])
    summed = torch.zeros((len(rows), *values.shape[1:]), dtype=values.dtype, device=values.device)
    return rows, summed.index_add_(0, slots, values)


class _RowSparseOptimizer(torch.optim.Optimizer):
    """The step loop the row-sparse optimisers share; each says what one table's update is.
    They take sparse row gradients only (nn.Embedding(sparse=True))."""

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.grad.is_sparse:
                    raise RuntimeError(
                        f"{type(self).__name__} takes sparse gradients (nn.Embedding(sparse=True))"
                    )
                self._update(p, group, self.state[p])
        return loss

    def _update(self, p: torch.Tensor, group: dict, state: dict) -> None:
        raise NotImplementedError


class RowSparseAdam(_RowSparseOptimizer):
    """torch's SparseAdam update (only the rows in the gradient move, lazily) done with row
    index operations. torch's own coalesces by sorting and adds sparse into dense tensors at
    O(table) per step (profiled: two thirds of an MF step at 1M pairs)."""

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    def _update(self, p: torch.Tensor, group: dict, state: dict) -> None:
        beta1, beta2 = group["betas"]
        rows, grad = unique_rows(p.grad)
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        m = state["exp_avg"].index_select(0, rows).lerp_(grad, 1 - beta1)
        v = state["exp_avg_sq"].index_select(0, rows).mul_(beta2)
        v.addcmul_(grad, grad, value=1 - beta2)
        state["exp_avg"].index_copy_(0, rows, m)
        state["exp_avg_sq"].index_copy_(0, rows, v)
        step = state["step"]
        step_size = group["lr"] * (1 - beta2**step) ** 0.5 / (1 - beta1**step)
        # scaled before the add: index_add_ with alpha takes a path ~3x slower
        p.index_add_(0, rows, m.div_(v.sqrt_().add_(group["eps"])).mul_(-step_size))


class RowSparseAdagrad(_RowSparseOptimizer):
    """torch's Adagrad (no lr decay, zero initial sum) on sparse row gradients, with row index
    operations: one state row (the running sum of squared gradients) read and written per
    touched row, half of Adam's state traffic. Adagrad leaves a row with a zero gradient
    as it is, so this equals dense Adagrad on the dense gradient exactly."""

    def __init__(self, params: Any, lr: float = 1e-2, eps: float = 1e-10) -> None:
        super().__init__(params, {"lr": lr, "eps": eps})

    def _update(self, p: torch.Tensor, group: dict, state: dict) -> None:
        rows, grad = unique_rows(p.grad)
        if not state:
            state["sum"] = torch.zeros_like(p)
        total = state["sum"].index_select(0, rows).addcmul_(grad, grad)
        state["sum"].index_copy_(0, rows, total)
        update = torch.div(grad, total.sqrt_().add_(group["eps"]), out=total)
        p.index_add_(0, rows, update.mul_(-group["lr"]))


class RowSparseSGD(_RowSparseOptimizer):
    """Plain SGD on sparse row gradients: one index_add of the gradient's rows (repeated
    rows need no merging, index_add sums them), no state: what implicit's BPR does, per
    batch. `lr` multiplies the batch-mean loss's gradient (the training config passes its
    per-example rate x batch size). It consumes the gradient: its values are scaled by -lr
    in place (index_add_ with alpha takes a path ~3x slower, a scaled copy costs a pass over
    fresh memory) and `grad` is None after the step."""

    def __init__(self, params: Any, lr: float = 1e-2) -> None:
        super().__init__(params, {"lr": lr})

    def _update(self, p: torch.Tensor, group: dict, state: dict) -> None:
        grad = p.grad
        p.index_add_(0, grad._indices()[0], grad._values().mul_(-group["lr"]))
        p.grad = None


def _sole_sgd_rate(optimizers: list) -> float | None:
    """The rate of a single RowSparseSGD (Lightning's wrapper or not) that holds every
    parameter the model optimises, else None."""
    if len(optimizers) != 1:
        return None
    opt = getattr(optimizers[0], "optimizer", optimizers[0])
    if type(opt) is not RowSparseSGD or len(opt.param_groups) != 1:
        return None
    return float(opt.param_groups[0]["lr"])


# optim.optimizer -> (the row-sparse form for sparse embedding tables, torch's for the rest)
OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], type[torch.optim.Optimizer]]] = {
    "adam": (RowSparseAdam, torch.optim.Adam),
    "adagrad": (RowSparseAdagrad, torch.optim.Adagrad),
    "sgd": (RowSparseSGD, torch.optim.SGD),
}


def tce_drop_share(denoise: DenoiseConfig, epoch: int) -> float:
    """T-CE's share of a batch's highest-loss positives dropped at this epoch: none during
    warm-up, then ramped linearly to `max_drop`. Losses tell noise apart only once the model
    has learnt something (simulator, 20% noise: after 3 plain epochs the top-loss fifth is as
    noisy as the rest, after 10 it is twice as noisy), so dropping from the start only
    throws away true positives."""
    if denoise.method != "tce" or epoch < denoise.warmup_epochs:
        return 0.0
    return denoise.max_drop * min(1.0, (epoch - denoise.warmup_epochs + 1) / denoise.ramp_epochs)


def _empty_pairs() -> dict[str, torch.Tensor]:
    """Buffers of a model rebuilt for inference (no training data needed)."""
    long = torch.zeros(0, dtype=torch.long)
    return {
        "pos_users": long,
        "pos_items": long,
        "pos_labels": long,
        "pos_weights": torch.zeros(0),
        "pos_matured": torch.zeros(0, dtype=torch.bool),
        "neg_indptr": long,
        "neg_items": long,
        "pos_indptr": long,
        "pos_by_user": long,
        "pair_keys": long,
        "pair_index": long,
    }

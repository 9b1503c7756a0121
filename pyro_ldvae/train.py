"""The SVI loop: data split, Adam, KL warm-up, validation, early stopping, history.

The loss of one step is ``-ELBO / n_train``, where the ELBO is the full-training-set estimate
from one minibatch (the ``cells`` plate scales local terms by ``n_train / cells``). Dividing by
the constant ``n_train`` makes the gradient the minibatch mean over cells of
``reconstruction + kl_weight * KL_z + KL_l``, exactly scvi-tools' loss, so that Adam with
scvi-tools' settings (lr 1e-3, eps 0.01, weight decay 1e-6) follows the same trajectory;
global latent variables (priors on loadings) keep their unscaled, unbiased contribution.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyro
import torch
from tqdm.auto import tqdm

from .data import CellData
from .module import LDVAE

logger = logging.getLogger(__name__)


@dataclass
class TrainingPlan:
    """Optimiser and annealing settings; defaults are scvi-tools' ``TrainingPlan`` defaults."""

    lr: float = 1e-3
    weight_decay: float = 1e-6
    eps: float = 0.01
    n_epochs_kl_warmup: int | None = 400
    max_kl_weight: float = 1.0
    min_kl_weight: float = 0.0

    def kl_weight(self, epoch: int) -> float:
        """Linear warm-up by epoch, exactly 0 in the first epoch (scvi-tools' ``_compute_kl_weight``)."""
        if self.n_epochs_kl_warmup and epoch < self.n_epochs_kl_warmup:
            return (self.max_kl_weight - self.min_kl_weight) * epoch / self.n_epochs_kl_warmup + self.min_kl_weight
        return self.max_kl_weight


def split_indices(
    n_obs: int,
    train_size: float | None = None,
    validation_size: float | None = None,
    batch_size: int = 128,
    seed: int = 0,
    shuffle: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation cell indices, drawn exactly as scvi-tools' ``DataSplitter`` does.

    With the same ``seed`` as ``scvi.settings.seed`` both libraries use the same cells. When
    ``train_size`` is left at its default and the last training minibatch would hold one or two
    cells (BatchNorm cannot train on one), those cells move to validation, as in scvi-tools.
    """
    size_given = train_size is not None
    train_size = 0.9 if train_size is None else train_size
    if not 0 < train_size <= 1:
        raise ValueError(f"train_size must be in (0, 1], got {train_size}.")
    n_train = math.ceil(train_size * n_obs)
    n_val = n_obs - n_train if validation_size is None else math.floor(n_obs * validation_size)
    if n_train + n_val > n_obs:
        raise ValueError(f"train_size + validation_size must be at most 1, got {train_size} + {validation_size}.")
    if n_train == 0:
        raise ValueError(f"No training cells: n_obs={n_obs}, train_size={train_size}.")
    remainder = n_train % batch_size
    if 0 < remainder < 3:
        if size_given:
            warnings.warn(
                f"The last training minibatch holds only {remainder} cell(s); batch norm needs at least 2. "
                f"It is dropped each epoch. Change batch_size or train_size to use every cell.",
                UserWarning,
                stacklevel=3,
            )
        else:
            n_train -= remainder
            n_val += remainder
            logger.info("%d cell(s) moved from training to validation to avoid a tiny last minibatch.", remainder)
    order = np.random.RandomState(seed=seed).permutation(n_obs) if shuffle else np.arange(n_obs)
    return order[n_val : n_val + n_train], order[:n_val]


@torch.no_grad()
def evaluate_elbo(module: LDVAE, data: CellData, indices: np.ndarray, batch_size: int = 1024) -> torch.Tensor:
    """Per-cell ELBO ``(cells,)`` in eval mode (running batch-norm statistics, no dropout)."""
    was_training = module.training
    module.eval()
    try:
        parts = [module.elbo(mb)[1] for mb in data.iter_minibatches(indices, batch_size, module.device)]
    finally:
        module.train(was_training)
    return torch.cat(parts) if parts else torch.zeros(0)


def _minibatch_indices(train_idx: np.ndarray, batch_size: int, generator: torch.Generator):
    """Shuffled minibatches of positions into ``train_idx``; a last minibatch of one cell is dropped."""
    order = torch.randperm(len(train_idx), generator=generator).numpy()
    for start in range(0, len(order), batch_size):
        positions = order[start : start + batch_size]
        if len(positions) > 1:
            yield positions


def train_svi(
    module: LDVAE,
    data: CellData,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    max_epochs: int,
    plan: TrainingPlan | None = None,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
    seed: int = 0,
    early_stopping: bool = False,
    early_stopping_patience: int = 45,
    early_stopping_min_delta: float = 0.0,
    progress_bar: bool = True,
    check_val_every_n_epoch: int = 1,
) -> dict[str, pd.DataFrame]:
    """Fit ``module`` to the cells ``train_idx`` of ``data`` by stochastic variational inference.

    Returns the history, scvi-tools style: a dict of one-column DataFrames indexed by epoch
    (``elbo_train``, ``elbo_validation``, ``reconstruction_loss_train``, ``kl_local_train``,
    ``kl_weight``, ``train_loss_epoch``). As in scvi-tools, the ``elbo_*`` entries are the
    mean per-cell *negative* ELBO (lower is better).
    """
    plan = plan or TrainingPlan()
    pyro.set_rng_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    module.to(device).train()
    optimizer = torch.optim.Adam(module.parameters(), lr=plan.lr, eps=plan.eps, weight_decay=plan.weight_decay)
    n_train = len(train_idx)
    rows: list[dict[str, float]] = []
    best, epochs_since_best = math.inf, 0
    bar = tqdm(range(max_epochs), desc="Training", disable=not progress_bar, unit="epoch")
    for epoch in bar:
        start = time.perf_counter()
        kl_weight = plan.kl_weight(epoch)
        elbo_sum = torch.zeros((), device=device)
        for positions in _minibatch_indices(train_idx, batch_size, generator):
            mb = data.minibatch(train_idx[positions], device, plate_idx=positions)
            optimizer.zero_grad(set_to_none=True)
            elbo, per_cell = module.elbo(mb, n_obs=n_train, kl_weight=kl_weight)
            loss = -elbo / n_train
            loss.backward()
            optimizer.step()
            elbo_sum += per_cell.detach().sum()
        row = {"epoch": epoch, "kl_weight": kl_weight, "elbo_train": -(elbo_sum / n_train).item()}
        row["train_time"] = time.perf_counter() - start
        if len(val_idx) and (epoch + 1) % check_val_every_n_epoch == 0:
            row["elbo_validation"] = -evaluate_elbo(module, data, val_idx).mean().item()
        rows.append(row)
        if not math.isfinite(row["elbo_train"]):
            raise FloatingPointError(
                f"The ELBO became {row['elbo_train']} in epoch {epoch}; lower the learning rate "
                "(plan_kwargs={'lr': ...}) or check the input for non-count values."
            )
        bar.set_postfix(elbo_train=f"{row['elbo_train']:.1f}", elbo_val=f"{row.get('elbo_validation', float('nan')):.1f}")
        if early_stopping and "elbo_validation" in row:
            if row["elbo_validation"] < best - early_stopping_min_delta:
                best, epochs_since_best = row["elbo_validation"], 0
            else:
                epochs_since_best += 1
                if epochs_since_best >= early_stopping_patience:
                    logger.info("Early stopping in epoch %d: validation ELBO has not improved for %d epochs.", epoch, epochs_since_best)
                    break
    frame = pd.DataFrame(rows).set_index("epoch")
    return {name: frame[[name]] for name in frame.columns}

"""The training plan: optimiser, KL warm-up and the train/validation split, as scvi-tools sets them.

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
import warnings
from dataclasses import dataclass

import numpy as np
import torch

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
    global_lr: float = 3e-2  # learning rate of the guide of global sites (loadings priors)

    def kl_weight(self, epoch: int) -> float:
        """Linear warm-up by epoch, exactly 0 in the first epoch (scvi-tools' ``_compute_kl_weight``)."""
        if self.n_epochs_kl_warmup and epoch < self.n_epochs_kl_warmup:
            return (self.max_kl_weight - self.min_kl_weight) * epoch / self.n_epochs_kl_warmup + self.min_kl_weight
        return self.max_kl_weight


def make_optimizer(module: torch.nn.Module, plan: TrainingPlan, capturable: bool = False) -> torch.optim.Optimizer:
    """Adam with scvi-tools' settings; one fused kernel over all parameters where torch has one.

    The guide of global sites (loadings priors), where there is one, learns at ``plan.global_lr``.

    ``capturable`` keeps the step count on the device, as a CUDA graph of the step needs."""
    global_guide = getattr(module, "global_guide", None)
    global_ids = set() if global_guide is None else {id(p) for p in global_guide.parameters()}
    params = [{"params": [p for p in module.parameters() if id(p) not in global_ids]}]
    if global_ids:  # the posterior of loadings and their shrinkage scales: see LDVAE.plan_defaults
        params.append({"params": list(global_guide.parameters()), "lr": plan.global_lr})
    settings = dict(lr=plan.lr, eps=plan.eps, weight_decay=plan.weight_decay, capturable=capturable)
    try:
        return torch.optim.Adam(params, **settings, fused=True)
    except (RuntimeError, TypeError):  # a device or dtype without a fused Adam
        return torch.optim.Adam(params, **settings, foreach=True)


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

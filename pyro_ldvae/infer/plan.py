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
from collections.abc import Callable
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau

logger = logging.getLogger(__name__)


OPTIMIZERS = ("Adam", "AdamW", "SGD", "Custom")
MONITORS = ("elbo_validation", "reconstruction_loss_validation", "kl_local_validation")  # the loop's validation figures

# scvi-tools plan_kwargs that change nothing here, and why.
NO_EFFECT = {
    "compile": "the training step is already replayed from a recorded graph (traced_step, cuda_graphs)",
    "compile_kwargs": "the training step is already replayed from a recorded graph (traced_step, cuda_graphs)",
}


@dataclass
class TrainingPlan:
    """Optimiser, learning-rate schedule and KL annealing; defaults are scvi-tools' ``TrainingPlan`` defaults.

    ``optimizer`` is 'Adam', 'AdamW', 'SGD' or 'Custom' (then ``optimizer_creator(params)`` builds
    it). ``reduce_lr_on_plateau`` multiplies the learning rate by ``lr_factor`` (not below
    ``lr_min``) when the validation ELBO has not improved by more than ``lr_threshold`` for
    ``lr_patience`` validations (``torch.optim.lr_scheduler.ReduceLROnPlateau``, threshold mode
    'abs', as scvi-tools). The KL weight warms up linearly from ``min_kl_weight`` to
    ``max_kl_weight`` over ``n_epochs_kl_warmup`` epochs or, when that is None, over
    ``n_steps_kl_warmup`` minibatch steps.
    """

    lr: float = 1e-3
    weight_decay: float = 1e-6
    eps: float = 0.01
    optimizer: str = "Adam"
    optimizer_creator: Callable | None = None
    n_steps_kl_warmup: int | None = None
    n_epochs_kl_warmup: int | None = 400
    reduce_lr_on_plateau: bool = False
    lr_factor: float = 0.6
    lr_patience: int = 30
    lr_threshold: float = 0.0
    lr_scheduler_metric: str = "elbo_validation"
    lr_min: float = 0.0
    max_kl_weight: float = 1.0
    min_kl_weight: float = 0.0
    global_lr: float = 3e-2  # learning rate of the guide of global sites (loadings priors)
    on_step: bool = False  # with on_epoch: scvi-tools' (Lightning's) _step/_epoch history names
    on_epoch: bool = True

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)}, got {self.optimizer!r}.")
        if self.optimizer == "Custom" and not callable(self.optimizer_creator):
            raise ValueError("optimizer='Custom' needs optimizer_creator, a function of the parameters.")
        if self.lr_scheduler_metric not in MONITORS:
            raise ValueError(
                f"lr_scheduler_metric={self.lr_scheduler_metric!r} is not computed here; supported: {list(MONITORS)}."
            )
        if self.min_kl_weight > self.max_kl_weight:
            raise ValueError(f"min_kl_weight={self.min_kl_weight} is larger than max_kl_weight={self.max_kl_weight}.")

    @classmethod
    def from_kwargs(cls, plan_kwargs: dict | None) -> TrainingPlan:
        """The plan of scvi-tools' ``plan_kwargs``; keys with no effect here, or unknown, warn and are ignored."""
        known = {f.name for f in fields(cls)}
        kwargs = {}
        for key, value in (plan_kwargs or {}).items():
            if key in known:
                kwargs[key] = value
            else:
                why = NO_EFFECT.get(key, "it is not a setting of this training plan")
                warnings.warn(
                    f"plan_kwargs[{key!r}] has no effect: {why}. Known keys: {sorted(known)}.",
                    UserWarning,
                    stacklevel=4,
                )
        return cls(**kwargs)

    def overridden_warmup(self) -> str | None:
        """A warning when ``n_epochs_kl_warmup`` overrides a given ``n_steps_kl_warmup`` (as in scvi-tools)."""
        if self.n_steps_kl_warmup and self.n_epochs_kl_warmup:
            return (
                f"n_epochs_kl_warmup={self.n_epochs_kl_warmup} overrides n_steps_kl_warmup, as in scvi-tools; pass "
                "n_epochs_kl_warmup=None to warm the KL weight up by steps."
            )
        return None

    @property
    def by_step(self) -> bool:
        """Whether the KL weight changes every step (``n_steps_kl_warmup``) rather than every epoch."""
        return not self.n_epochs_kl_warmup and bool(self.n_steps_kl_warmup)

    def kl_weight(self, epoch: int, step: int = 0) -> float:
        """The KL weight in ``epoch`` at global ``step``, as scvi-tools' ``_compute_kl_weight``.

        Linear warm-up by epoch (exactly ``min_kl_weight`` in the first), else by step, else ``max_kl_weight``.
        """
        slope = self.max_kl_weight - self.min_kl_weight
        if self.n_epochs_kl_warmup:
            if epoch < self.n_epochs_kl_warmup:
                return slope * epoch / self.n_epochs_kl_warmup + self.min_kl_weight
        elif self.n_steps_kl_warmup and step < self.n_steps_kl_warmup:
            return slope * step / self.n_steps_kl_warmup + self.min_kl_weight
        return self.max_kl_weight

    def graph_reasons(self) -> list[str]:
        """Why a CUDA graph could not capture this plan's optimizer step."""
        if self.optimizer in ("Adam", "AdamW"):
            return []
        return [f"optimizer={self.optimizer!r} is not captured (Adam and AdamW are)"]


def global_rate_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters that learn at ``plan.global_lr``: the global guide's, and any the module names.

    A module may list more with a ``global_rate_parameters()`` method (a query model names its
    new batches' decoder columns and theta rows, per-gene parameters like the loadings).
    """
    named = getattr(module, "global_rate_parameters", None)
    if named is not None:
        return list(named())
    global_guide = getattr(module, "global_guide", None)
    return [] if global_guide is None else list(global_guide.parameters())


def make_optimizer(module: torch.nn.Module, plan: TrainingPlan, capturable: bool = False) -> torch.optim.Optimizer:
    """The plan's optimizer with scvi-tools' settings; Adam(W) as one fused kernel where torch has one.

    ``capturable`` keeps the step count on the device, as a CUDA graph of the step needs; with
    ``reduce_lr_on_plateau`` the learning rates are then device tensors that the scheduler changes
    in place, so the replayed graph sees them. The guide of global sites (loadings priors), where
    there is one, learns at ``plan.global_lr``.
    """
    if plan.optimizer == "Custom":
        return plan.optimizer_creator(list(module.parameters()))
    device = next(module.parameters()).device
    tensor_lr = capturable and plan.reduce_lr_on_plateau

    def rate(value: float) -> float | torch.Tensor:
        return torch.tensor(value, device=device) if tensor_lr else value

    global_params = global_rate_parameters(module)
    global_ids = {id(p) for p in global_params}
    params = [{"params": [p for p in module.parameters() if id(p) not in global_ids], "lr": rate(plan.lr)}]
    if global_ids:  # the posterior of loadings and their shrinkage scales: see LDVAE.plan_defaults
        params.append({"params": global_params, "lr": rate(plan.global_lr)})
    if plan.optimizer == "SGD":
        return torch.optim.SGD(params, lr=plan.lr, weight_decay=plan.weight_decay)
    cls = torch.optim.Adam if plan.optimizer == "Adam" else torch.optim.AdamW
    settings = dict(lr=rate(plan.lr), eps=plan.eps, weight_decay=plan.weight_decay, capturable=capturable)
    try:
        return cls(params, **settings, fused=True)
    except (RuntimeError, TypeError):  # a device or dtype without a fused Adam
        return cls(params, **settings, foreach=True)


def make_scheduler(optimizer: torch.optim.Optimizer, plan: TrainingPlan) -> ReduceLROnPlateau | None:
    """scvi-tools' ``ReduceLROnPlateau`` on the validation ELBO, or None without ``reduce_lr_on_plateau``."""
    if not plan.reduce_lr_on_plateau:
        return None
    return ReduceLROnPlateau(
        optimizer,
        patience=plan.lr_patience,
        factor=plan.lr_factor,
        threshold=plan.lr_threshold,
        min_lr=plan.lr_min,
        threshold_mode="abs",
    )


def split_cells(
    n_obs: int,
    train_size: float | None = None,
    validation_size: float | None = None,
    batch_size: int = 128,
    seed: int = 0,
    shuffle: bool = True,
    drop_last: bool = False,
    external_indexing: list | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train, validation and test cell indices, as scvi-tools' ``DataSplitter``.

    With the same ``seed`` as ``scvi.settings.seed`` both libraries use the same cells. When
    ``train_size`` is left at its default and the last training minibatch would hold one or two
    cells (BatchNorm cannot train on one), those cells move to validation, as in scvi-tools.
    ``external_indexing=[train, validation, test]`` gives the indices instead (missing entries are
    empty). Unless ``drop_last``, a last training minibatch of exactly one cell is a ValueError and
    one of two cells a warning.

    Examples
    --------
    >>> train, val, test = split_cells(1000, train_size=0.8, validation_size=0.1)
    >>> len(train), len(val), len(test)
    (800, 100, 100)
    """
    if external_indexing is not None:
        train, val, test = _external_split(n_obs, external_indexing)
        _check_last_minibatch(len(train), batch_size, drop_last, "change the given external indices")
        return train, val, test
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
    if size_given:
        _check_last_minibatch(n_train, batch_size, drop_last, "change train_size")
    elif 0 < remainder < 3 and not drop_last:
        n_train -= remainder
        n_val += remainder
        logger.info("%d cell(s) moved from training to validation to avoid a tiny last minibatch.", remainder)
    order = np.random.RandomState(seed=seed).permutation(n_obs) if shuffle else np.arange(n_obs)
    return order[n_val : n_val + n_train], order[:n_val], order[n_val + n_train :]


def _check_last_minibatch(n_train: int, batch_size: int, drop_last: bool, fix: str) -> None:
    """A last training minibatch of one cell is an error (batch norm cannot train on it), of two a warning."""
    remainder = n_train % batch_size
    if drop_last or not 0 < remainder < 3:
        return
    advice = (
        f"Pass datasplitter_kwargs={{'drop_last': True}} to drop it each epoch, choose another batch_size "
        f"(now {batch_size}) or {fix}."
    )
    if remainder == 1:
        raise ValueError(
            f"The last training minibatch would hold exactly 1 of {n_train} cells; batch norm cannot train on one "
            f"cell. {advice}"
        )
    warnings.warn(f"The last training minibatch holds only {remainder} cells. {advice}", UserWarning, stacklevel=4)


def _external_split(n_obs: int, external_indexing: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """scvi-tools' checks of ``external_indexing``.

    A list of up to three integer arrays, without duplicates, overlaps or indices out of range.
    """
    if not isinstance(external_indexing, (list, tuple)) or len(external_indexing) > 3:
        raise ValueError("external_indexing must be a list [train_indices, validation_indices, test_indices].")
    parts = list(external_indexing) + [None] * (3 - len(external_indexing))
    parts = [np.array([], dtype=np.int64) if p is None else np.asarray(p) for p in parts]
    names = ("train", "validation", "test")
    for name, part in zip(names, parts):
        if part.ndim != 1 or (part.size and not np.issubdtype(part.dtype, np.integer)):
            raise ValueError(f"external_indexing's {name} indices must be a 1-d array of integers.")
        if part.size and (part.min() < 0 or part.max() >= n_obs):
            raise ValueError(f"external_indexing's {name} indices must lie in [0, {n_obs}).")
        if len(np.unique(part)) < len(part):
            raise ValueError(f"external_indexing's {name} indices hold duplicates.")
    for a, b in ((0, 1), (0, 2), (1, 2)):
        if np.intersect1d(parts[a], parts[b]).size:
            raise ValueError(f"external_indexing's {names[a]} and {names[b]} indices overlap.")
    if not len(parts[0]):
        raise ValueError("external_indexing gives no training cells.")
    return tuple(part.astype(np.int64) for part in parts)

"""Training options, defined once: ``LinearSCVI.train``, ``tl.ldvae`` and the CLI's ``fit`` derive from them.

Each field's metadata holds its help line and, for the options the command line offers, its
flag (``cli``); a ``bool | None`` option whose flag starts with ``--no-`` sets it to False.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from .plan import TrainingPlan
from .resolve import resolve

Accelerator = Literal["auto", "cpu", "gpu", "cuda"]


def _option(default: Any, help: str, cli: str | None = None) -> Any:
    return field(default=default, metadata={"help": help, "cli": cli})


@dataclass(frozen=True)
class TrainOptions:
    """Every option of a training run, with scvi-tools' names and defaults.

    Examples
    --------
    >>> options = TrainOptions(max_epochs=50, batch_size=256)
    >>> model.train(**options.as_kwargs())
    """

    max_epochs: int | None = _option(
        None, "default: scvi-tools' rule min(round(20000 / n_cells * 400), 400)", "--max-epochs"
    )
    accelerator: Accelerator = _option("auto", "where to train: auto picks CUDA when present", "--accelerator")
    device: str | int = _option("auto", "the CUDA device ('cuda:1', 1) or 'auto'")
    train_size: float | None = _option(None, "fraction of cells to train on (default 0.9)", "--train-size")
    validation_size: float | None = _option(None, "fraction of cells to validate on (default: the rest)")
    shuffle_set_split: bool = _option(True, "draw the split at random (else the first cells validate)")
    load_sparse_tensor: bool = _option(False, "no effect: minibatches are always cut from sparse counts")
    batch_size: int = _option(128, "cells per minibatch", "--batch-size")
    early_stopping: bool = _option(False, "stop when the validation ELBO stalls", "--early-stopping")
    datasplitter_kwargs: dict | None = _option(None, "drop_last; external_indexing=[train, validation, test]")
    early_stopping_patience: int = _option(
        45, "epochs without improvement before stopping", "--early-stopping-patience"
    )
    early_stopping_min_delta: float = _option(0.0, "the least improvement that counts")
    early_stopping_monitor: str = _option("elbo_validation", "the figure early stopping watches")
    early_stopping_mode: Literal["min", "max"] = _option("min", "'min': lower is better; 'max': higher")
    early_stopping_warmup_epochs: int = _option(0, "validations before early stopping may stop")
    plan_kwargs: dict | None = _option(None, "TrainingPlan settings: lr, weight_decay, eps, KL warm-up")
    check_val_every_n_epoch: int = _option(1, "epochs between validation ELBOs")
    seed: int | None = _option(None, "seed of the split, minibatch order and sampling (default: the model's)")
    progress_bar: bool = _option(True, "show a progress bar")
    gradient_clip_val: float | None = _option(
        None, "clip the gradient's total norm to this value", "--gradient-clip-val"
    )
    checkpoint_dir: str | None = _option(
        None,
        "write last.ckpt here every checkpoint_every epochs; under torchrun --max-restarts a restarted group resumes from it",
        "--checkpoint-dir",
    )
    checkpoint_every: int = _option(1, "epochs between checkpoints", "--checkpoint-every")
    resume_from: str | None = _option(None, "a checkpoint (or its directory) to continue from", "--resume-from")
    data_on_device: bool | None = _option(None, "keep the counts on the training device (default: on CUDA if they fit)")
    cuda_graphs: bool | None = _option(
        None, "on a GPU, launch each training step from Python instead of replaying a CUDA graph", "--no-cuda-graphs"
    )
    traced_step: bool | None = _option(
        None, "on CPU, take eager steps instead of replaying a recorded graph of the step", "--no-traced-step"
    )
    callbacks: list | None = _option(None, "objects with on_epoch_end(module, epoch, history); True stops")
    trainer_kwargs: dict | None = _option(None, "Lightning Trainer keywords: accepted, warned about, no effect")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The option names, in order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    def as_kwargs(self) -> dict[str, Any]:
        """The options as keyword arguments of ``LinearSCVI.train``."""
        return {name: getattr(self, name) for name in self.names()}

    def replace(self, **changes: Any) -> TrainOptions:
        """A copy with ``changes``; an unknown name is a TypeError that lists the known ones."""
        unknown = sorted(set(changes) - set(self.names()))
        if unknown:
            raise TypeError(f"unknown training option(s) {unknown}; the options are {list(self.names())}.")
        return dataclasses.replace(self, **changes)

    def plan(self, module: Any = None) -> TrainingPlan:
        """The optimiser and annealing settings.

        ``plan_kwargs`` over ``module.plan_defaults`` (keys with no effect warn).
        """
        return TrainingPlan.from_kwargs({**getattr(module, "plan_defaults", {}), **(self.plan_kwargs or {})})

    def resolved(self) -> TrainOptions:
        """These options, resolved: keywords that mean nothing here warned about and removed.

        Lightning names are mapped to ours and the rest checked; resolving again changes nothing.
        """
        return resolve(self)

    def epochs(self, n_obs: int) -> int:
        """``max_epochs``, or scvi-tools' rule for ``n_obs`` cells when it is None."""
        if self.max_epochs is not None:
            return self.max_epochs
        return int(min(round(20000 / n_obs * 400), 400))

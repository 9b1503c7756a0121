"""scvi-tools' training keywords that mean nothing here: warned about (never a TypeError) and removed.

scvi-tools passes ``**trainer_kwargs`` to a Lightning ``Trainer``, ``datasplitter_kwargs`` to its
``DataSplitter`` and ``plan_kwargs`` to its ``TrainingPlan``. The same calls work here: the
keywords with a meaning are mapped to ours, the others warn with the reason and are dropped.
"""

from __future__ import annotations

import warnings
from typing import Any

from . import callbacks as cb
from .plan import MONITORS, TrainingPlan

# Trainer keywords whose counterpart is one of our options.
TRAINER_ALIASES = {"enable_progress_bar": "progress_bar", "devices": "device"}
SPLITTER_KEYS = ("drop_last", "external_indexing")
NOT_LIGHTNING = "the training loop is not Lightning (see docs/design.md)"
# Why some well-known keywords have no effect.
REASONS = {
    "logger": "the history is model.history; " + NOT_LIGHTNING,
    "log_every_n_steps": "figures are recorded once per epoch; " + NOT_LIGHTNING,
    "enable_checkpointing": "pass checkpoint_dir= for checkpoints; " + NOT_LIGHTNING,
    "checkpointing_monitor": "pass checkpoint_dir= for checkpoints; " + NOT_LIGHTNING,
    "learning_rate_monitor": "with reduce_lr_on_plateau the history records lr; " + NOT_LIGHTNING,
    "strategy": "run under torchrun for data-parallel training; " + NOT_LIGHTNING,
    "load_sparse_tensor": "minibatches are always cut from sparse counts",
    "num_workers": "minibatches are cut in the training process, without a DataLoader",
    "pin_memory": "minibatches are cut in the training process, without a DataLoader",
}


def _warn(where: str, key: str) -> None:
    why = REASONS.get(key, NOT_LIGHTNING)
    warnings.warn(f"{where}{key!r} has no effect here: {why}.", UserWarning, stacklevel=5)


def resolve(options: Any) -> Any:
    """``options`` (``TrainOptions``) with keywords that mean nothing here warned about and dropped.

    Aliases are mapped and the early-stopping settings checked; idempotent.
    """
    changes: dict[str, Any] = {}
    if options.load_sparse_tensor:
        _warn("", "load_sparse_tensor")
        changes["load_sparse_tensor"] = False
    for key, value in (options.trainer_kwargs or {}).items():
        if key == "devices" and isinstance(value, (list, tuple)):
            if len(value) != 1:
                raise ValueError(f"devices={value!r}: one device trains here; run under torchrun for several.")
            changes["device"] = value[0]
        elif key in TRAINER_ALIASES:
            changes[TRAINER_ALIASES[key]] = value
        elif key in options.names() and key != "trainer_kwargs":
            changes[key] = value
        else:
            _warn("", key)
    if options.trainer_kwargs is not None:
        changes["trainer_kwargs"] = None
    splitter = dict(options.datasplitter_kwargs or {})
    for key in list(splitter):
        if key not in SPLITTER_KEYS:
            _warn("datasplitter_kwargs: ", key)
            del splitter[key]
    if options.datasplitter_kwargs is not None and splitter != options.datasplitter_kwargs:
        changes["datasplitter_kwargs"] = splitter or None
    if options.plan_kwargs:
        plan = TrainingPlan.from_kwargs(options.plan_kwargs)  # warns once about keys with no effect
        known = set(TrainingPlan.__dataclass_fields__)
        if plan.overridden_warmup():  # scvi-tools' rule: the epochs win; the steps are dropped, so warned once
            warnings.warn(plan.overridden_warmup(), UserWarning, stacklevel=4)
            known.discard("n_steps_kl_warmup")
        changes["plan_kwargs"] = {k: v for k, v in options.plan_kwargs.items() if k in known} or None
    if options.callbacks:
        changes["callbacks"] = cb.usable(options.callbacks) or None
    resolved = options.replace(**changes) if changes else options
    if resolved.early_stopping_monitor not in MONITORS:
        raise ValueError(
            f"early_stopping_monitor={resolved.early_stopping_monitor!r} is not computed here; supported: "
            f"{list(MONITORS)}."
        )
    if resolved.early_stopping_mode not in ("min", "max"):
        raise ValueError(f"early_stopping_mode must be 'min' or 'max', got {resolved.early_stopping_mode!r}.")
    return resolved

"""The training history, and the fault raised when the loss turns NaN or infinite."""

from __future__ import annotations

import pandas as pd
import torch

from . import checkpoint as ckpt


class History(dict):
    """The history dict of ``train_svi``; ``stop_reason`` is 'completed', 'early_stopping' or 'interrupted'."""

    stop_reason: str = "completed"


class TrainingFault(FloatingPointError):
    """The loss became NaN or infinite.

    ``history`` holds the epochs completed before, whose parameters the module was restored to.
    """

    history: dict = {}


def make_history(rows: list[dict], stop_reason: str = "completed") -> History:
    """Rows of per-epoch figures as scvi-tools' history: one one-column DataFrame per figure, by epoch.

    ``train_loss_step`` (each row holds its epoch's list) by global step.
    """
    out = History()
    if rows:
        frame = pd.DataFrame([{k: v for k, v in row.items() if k != "train_loss_step"} for row in rows])
        frame = frame.set_index("epoch")
        out.update({name: frame[[name]] for name in frame.columns})
        steps = [loss for row in rows for loss in row.get("train_loss_step", torch.zeros(0)).tolist()]
        if steps:
            out["train_loss_step"] = pd.DataFrame(
                {"train_loss_step": steps}, index=pd.RangeIndex(len(steps), name="step")
            )
    out.stop_reason = stop_reason
    return out


def fault(epoch: int, snapshot: dict, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> TrainingFault:
    """Roll module and optimizer back to ``snapshot`` and describe the fault of ``epoch``."""
    ckpt.restore_parameters(snapshot, module, optimizer)
    kept = f"epoch {snapshot['epoch'] - 1}" if snapshot["epoch"] else "initialisation"
    err = TrainingFault(
        f"Training stopped: the loss became NaN or infinite in epoch {epoch}. The model keeps the parameters "
        f"of the last good epoch (those after {kept}). Remedies: lower the learning rate "
        "(plan_kwargs={'lr': 1e-4}), clip gradients (gradient_clip_val=1.0), and check that the input holds raw "
        "counts without extreme outliers."
    )
    err.history = make_history(snapshot["rows"])
    return err


def all_finite(tensors) -> bool:
    """Whether all ``tensors`` are finite, with one device sync."""
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())

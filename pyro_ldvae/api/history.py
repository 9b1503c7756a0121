"""The training history of a ``LinearSCVI``: joined across ``train`` calls, kept on a fault."""

from __future__ import annotations

from typing import Any, Callable

import pandas as pd

STEP_KEYS = ("train_loss_step",)  # figures indexed by step, not epoch
NOT_LOGGED = ("train_time", "kl_weight", "lr")  # our own figures, not metrics scvi-tools logs


def keeping_history_on_fault(model: Any, train_fn: Callable) -> Callable:
    """``train_fn`` that records the history of the good epochs when the loss turns NaN, then re-raises.

    On ``FloatingPointError`` the module was rolled back to its last good epoch; that history goes onto
    ``model``.
    """

    def run(*args, **kwargs):
        try:
            return train_fn(*args, **kwargs)
        except FloatingPointError as err:
            model.history_ = append_history(model.history_, dict(getattr(err, "history", {})))
            model.module.eval()
            raise

    return run


def append_history(old: dict[str, pd.DataFrame], new: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """``new`` after ``old``, its epochs numbered on from ``old``'s (when ``train`` is called again)."""
    if not old:
        return new
    offset = max(len(v) for key, v in old.items() if key not in STEP_KEYS)
    out = dict(old)
    for key, frame in new.items():
        frame = frame.set_axis(frame.index + (len(old.get(key, ())) if key in STEP_KEYS else offset))
        out[key] = pd.concat([old[key], frame]) if key in old else frame
    return out


def lightning_names(history: dict[str, pd.DataFrame], on_step: bool, on_epoch: bool) -> dict[str, pd.DataFrame]:
    """The history with scvi-tools' names under ``plan_kwargs={'on_step': True, 'on_epoch': True}``.

    Lightning logs a metric as ``<name>_step`` and ``<name>_epoch`` when both are on: every per-epoch
    metric gets an ``_epoch`` copy and ``validation_loss`` a ``validation_loss_step`` copy (one value per
    validation pass: the validation cells are evaluated in one pass). The plain names stay.
    """
    if not (on_step and on_epoch):
        return history
    out = dict(history)
    for key, frame in history.items():
        if key not in STEP_KEYS and key not in NOT_LOGGED and not key.endswith("_epoch"):
            out[f"{key}_epoch"] = frame.set_axis([f"{key}_epoch"], axis=1)
    if "validation_loss" in history:
        out["validation_loss_step"] = history["validation_loss"].set_axis(["validation_loss_step"], axis=1)
    return out

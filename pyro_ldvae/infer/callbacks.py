"""Callbacks of the training loop: objects the loop calls after every epoch.

A callback is any object with a method ``on_epoch_end(module, epoch, history)`` (or a plain
function of the same arguments): ``module`` is the LDVAE being trained, ``epoch`` the epoch just
completed (0-based), ``history`` the list of per-epoch rows so far (dicts with ``epoch``,
``elbo_train``, ``elbo_validation`` when validated, ``kl_weight``, ...; the last row is this
epoch's). Returning True stops training after this epoch; the history's ``stop_reason`` is then
'callback'. Lightning callbacks do not apply: the loop is not Lightning (docs/design.md).

Examples
--------
>>> class StopBelow:
...     def on_epoch_end(self, module, epoch, history):
...         return history[-1]["elbo_train"] < 1000.0
>>> model.train(max_epochs=400, callbacks=[StopBelow()])
"""

from __future__ import annotations

import warnings
from typing import Any, Protocol


class EpochCallback(Protocol):
    """What the loop calls after each epoch; True stops training."""

    def on_epoch_end(self, module: Any, epoch: int, history: list[dict]) -> bool | None:
        """React to the end of ``epoch`` given the history so far; return True to stop training."""


def is_lightning(callback: Any) -> bool:
    """Whether ``callback`` is a (PyTorch) Lightning callback."""
    return any(cls.__module__.split(".")[0] in ("lightning", "pytorch_lightning") for cls in type(callback).__mro__)


def usable(callbacks: list | None) -> list:
    """The callbacks the loop can call; Lightning callbacks and other objects warn and are left out."""
    kept = []
    for callback in callbacks or []:
        if not is_lightning(callback) and (hasattr(callback, "on_epoch_end") or callable(callback)):
            kept.append(callback)
            continue
        what = "a Lightning callback" if is_lightning(callback) else "not a callback (no on_epoch_end)"
        warnings.warn(
            f"callbacks: {type(callback).__name__} is {what} and is ignored. The training loop is not Lightning "
            "(see docs/design.md); pass objects with on_epoch_end(module, epoch, history), returning True to stop.",
            UserWarning,
            stacklevel=5,
        )
    return kept


def call(callbacks: list, module: Any, epoch: int, history: list[dict]) -> bool:
    """Call every callback after ``epoch``; whether any asks to stop."""
    stop = False
    for callback in callbacks:
        fn = getattr(callback, "on_epoch_end", callback)
        stop = bool(fn(module, epoch, history)) or stop
    return stop

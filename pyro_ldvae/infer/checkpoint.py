"""Training state: in-memory snapshots, atomic checkpoint files, resumption, Ctrl-C handling.

A training state is a plain dict of tensors, numbers, strings, lists and tuples (nothing that
needs arbitrary unpickling), so checkpoint files load with ``torch.load(weights_only=True)``:

    format, version     "pyro_ldvae.train_state", CHECKPOINT_VERSION
    epoch               number of completed epochs
    module, optimizer   state dicts (tensors cloned, so later steps do not change a snapshot)
    rng                 torch and CUDA RNG states and the minibatch generator's state
    rows                the history rows of the completed epochs
    best, epochs_since_best   early-stopping state
    train_idx, val_idx  the split the state belongs to, (n_train,) and (n_val,) int64

The trainer takes a snapshot after every completed epoch; it is what the model falls back to
when the loss turns NaN or the user presses Ctrl-C, and what a checkpoint file holds. Resuming
from it with the same seed continues bit for bit as if training had not stopped.
"""

from __future__ import annotations

import copy
import logging
import os
import signal
import threading
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "pyro_ldvae.train_state"
CHECKPOINT_VERSION = 1
CHECKPOINT_NAME = "last.ckpt"


def _rng_state(generator: torch.Generator, device: torch.device) -> dict:
    """The streams training draws from: torch's on the CPU and ``device``, and the minibatch order."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "generator": generator.get_state(),
    }


def _set_rng_state(state: dict, generator: torch.Generator, device: torch.device) -> None:
    """Set the streams of ``_rng_state``.

    Numpy's and Python's of older checkpoints are left alone (training does not draw from them, and they are the
    user's).
    """
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    generator.set_state(state["generator"])


def capture(
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    epoch: int,
    rows: list[dict],
    best: float,
    epochs_since_best: int,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau | None = None,
) -> dict:
    """A deep copy of everything training needs to continue from the end of epoch ``epoch - 1``."""
    device = next(module.parameters()).device
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "epoch": int(epoch),
        "module": {k: v.detach().clone() for k, v in module.state_dict().items()},
        "optimizer": copy.deepcopy(optimizer.state_dict()),
        "rng": _rng_state(generator, device),
        "rows": copy.deepcopy(rows),
        "best": float(best),
        "epochs_since_best": int(epochs_since_best),
        "train_idx": torch.as_tensor(np.asarray(train_idx, dtype=np.int64)),
        "val_idx": torch.as_tensor(np.asarray(val_idx, dtype=np.int64)),
        "scheduler": None if scheduler is None else copy.deepcopy(scheduler.state_dict()),
    }


def restore_parameters(state: dict, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Put the module's parameters/buffers and the optimizer's state back to ``state``."""
    module.load_state_dict(state["module"])
    optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))


def restore(
    state: dict,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    source: str = "checkpoint",
) -> None:
    """Restore parameters, optimizer and every RNG from ``state``; the split must match."""
    if not (
        np.array_equal(state["train_idx"].numpy(), np.asarray(train_idx))
        and np.array_equal(state["val_idx"].numpy(), np.asarray(val_idx))
    ):
        raise ValueError(
            f"{source} was written for a different train/validation split ({len(state['train_idx'])} training "
            f"cells there, {len(train_idx)} here); resume on the same data with the same seed, train_size, "
            "validation_size and batch_size."
        )
    try:
        restore_parameters(state, module, optimizer)
    except (RuntimeError, ValueError, KeyError) as err:
        raise ValueError(
            f"{source} does not fit this model (different genes, n_latent, likelihood or dispersion?): {err}"
        ) from None
    device = next(module.parameters()).device
    _set_rng_state(state["rng"], generator, device)


def checkpoint_path(path: str | os.PathLike) -> Path:
    """A checkpoint file, or the ``last.ckpt`` inside a checkpoint directory."""
    path = Path(path)
    return path / CHECKPOINT_NAME if path.is_dir() else path


def save(state: dict, directory: str | os.PathLike) -> Path:
    """Write ``state`` to ``directory/last.ckpt`` atomically: a temporary file, fsync, then rename.

    A crash in the middle leaves the previous checkpoint intact (and at worst a stray
    ``.tmp`` file), never a truncated ``last.ckpt``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / CHECKPOINT_NAME
    tmp = directory / f".{CHECKPOINT_NAME}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    logger.info("Checkpoint of epoch %d written to %s.", state["epoch"], target)
    return target


def load(path: str | os.PathLike) -> dict:
    """Read a checkpoint with ``torch.load(weights_only=True)``; clear errors name the file."""
    file = checkpoint_path(path)
    if not file.exists():
        raise FileNotFoundError(
            f"No checkpoint at {file}; pass the checkpoint_dir of an earlier run or its {CHECKPOINT_NAME}."
        )
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, corrupted or not a torch file, or holds disallowed objects
        raise ValueError(
            f"Cannot read checkpoint {file}: it is truncated, corrupted or not a pyro_ldvae checkpoint ({err})."
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{file} is not a pyro_ldvae training checkpoint.")
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(
            f"{file} was written by checkpoint format version {state.get('version')}; this pyro_ldvae reads version "
            f"{CHECKPOINT_VERSION}."
        )
    return state


class InterruptGuard:
    """Within ``with``: the first Ctrl-C sets ``requested`` (training stops after the current step).

    A second one raises ``KeyboardInterrupt`` at once. Outside the main thread it does nothing and a Ctrl-C arrives as
    ``KeyboardInterrupt``, which the trainer handles the same way.
    """

    def __init__(self):
        self.requested = False
        self._installed = False
        self._previous = None

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("Interrupt received: stopping after the current step (press Ctrl-C again to stop now).")

    def __enter__(self) -> InterruptGuard:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
            self._installed = True
        return self

    def __exit__(self, *exc) -> None:
        if self._installed:
            previous = signal.default_int_handler if self._previous is None else self._previous
            signal.signal(signal.SIGINT, previous)
            self._installed = False

"""Training state: in-memory snapshots, atomic hash-checked checkpoint files, resumption, Ctrl-C.

A training state is a plain dict of tensors, numbers, strings, lists and tuples (nothing that
needs arbitrary unpickling):

    format, version     "pyro_ldvae.train_state", CHECKPOINT_VERSION
    epoch               number of completed epochs
    module, optimizer   state dicts (tensors cloned, so later steps do not change a snapshot)
    rng                 torch and CUDA RNG states and the minibatch generator's state; under
                        torchrun also ``by_rank``, every rank's torch and CUDA states
    rows                the history rows of the completed epochs
    best, epochs_since_best   early-stopping state
    train_idx, val_idx  the split the state belongs to, (n_train,) and (n_val,) int64
    run                 the settings that fix the training trajectory (``elastic.run_fingerprint``)

The trainer takes a snapshot after every completed epoch; it is what the model falls back to
when the loss turns NaN or the user presses Ctrl-C, and what a checkpoint file holds. Resuming
from it with the same seed continues bit for bit as if training had not stopped.

A checkpoint file is ``{"format", "version", "epoch", "sha256", "state"}``, where ``state`` is
the serialised training state as a uint8 tensor and ``sha256`` its hash, so the file loads with
``torch.load(weights_only=True)`` and every reader verifies what it loads. A directory holds
``last.ckpt`` and the one before it, ``previous.ckpt``: each is written whole under a temporary
name, fsynced and renamed, so a crash leaves at least one intact file, and a reader that finds
``last.ckpt`` missing or corrupted falls back to ``previous.ckpt`` with a warning.
"""

from __future__ import annotations

import copy
import hashlib
import io
import logging
import os
import signal
import threading
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "pyro_ldvae.train_state"
CHECKPOINT_VERSION = 2
CHECKPOINT_NAME = "last.ckpt"
PREVIOUS_NAME = "previous.ckpt"  # the checkpoint before last.ckpt: the fallback when last.ckpt is bad


def _rng_state(generator: torch.Generator, device: torch.device) -> dict:
    """The streams training draws from: torch's on the CPU and ``device``, and the minibatch order."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "generator": generator.get_state(),
    }


def _set_rng_state(state: dict, generator: torch.Generator, device: torch.device, rank: int = 0) -> None:
    """Set the streams of ``_rng_state``.

    With ``by_rank`` (written under torchrun) the torch and CUDA streams are this ``rank``'s own.
    """
    own = state["by_rank"][rank] if state.get("by_rank") else state
    torch.set_rng_state(own["torch"])
    if own.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(own["cuda"], device)
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
    run: dict | None = None,
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
        # A row is never changed after its epoch (nor its tensor of step losses): copying each dict
        # suffices, where a deep copy of the growing list made every epoch slower than the last.
        "rows": [dict(row) for row in rows],
        "best": float(best),
        "epochs_since_best": int(epochs_since_best),
        "train_idx": torch.as_tensor(np.asarray(train_idx, dtype=np.int64)),
        "val_idx": torch.as_tensor(np.asarray(val_idx, dtype=np.int64)),
        "scheduler": None if scheduler is None else copy.deepcopy(scheduler.state_dict()),
        "run": dict(run or {}),
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
    rank: int = 0,
) -> None:
    """Restore parameters, optimizer and every RNG (``rank``'s own, if recorded) from ``state``.

    The split must match.
    """
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
    _set_rng_state(state["rng"], generator, device, rank)


def checkpoint_path(path: str | os.PathLike) -> Path:
    """A checkpoint file, or the ``last.ckpt`` inside a checkpoint directory."""
    path = Path(path)
    return path / CHECKPOINT_NAME if path.is_dir() else path


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_directory(directory: Path) -> None:
    """Make the renames in ``directory`` durable (where the platform allows opening a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save(state: dict, directory: str | os.PathLike) -> Path:
    """Write ``state`` to ``directory/last.ckpt`` atomically, with its SHA-256.

    The checkpoint it replaces becomes ``previous.ckpt``. The file is written whole under a temporary name, fsynced, then renamed: a crash at any point
    leaves ``last.ckpt`` or ``previous.ckpt`` intact (and at worst a stray ``.tmp`` file), never a
    truncated checkpoint under either name.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    record = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "epoch": int(state["epoch"]),
        "sha256": hashlib.sha256(payload).hexdigest(),
        "state": torch.frombuffer(bytearray(payload), dtype=torch.uint8),
    }
    buffer = io.BytesIO()
    torch.save(record, buffer)
    target, previous = directory / CHECKPOINT_NAME, directory / PREVIOUS_NAME
    tmp = directory / f".{CHECKPOINT_NAME}.{os.getpid()}.tmp"
    try:
        _write_synced(tmp, buffer.getvalue())
        if target.exists():
            os.replace(target, previous)
        os.replace(tmp, target)
        _fsync_directory(directory)
    finally:
        if tmp.exists():
            tmp.unlink()
    logger.info("Checkpoint of epoch %d written to %s.", state["epoch"], target)
    return target


def read_verified(file: str | os.PathLike, expected_sha256: str | None = None) -> tuple[dict, str]:
    """The training state in checkpoint ``file`` and its SHA-256, after checking the hash.

    Read with ``torch.load(weights_only=True)``. A file that is unreadable, of another format or
    version, whose contents do not match their recorded hash, or (``expected_sha256``) whose hash
    is not the expected one is a ValueError naming the file.
    """
    file = Path(file)
    try:
        record = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, corrupted or not a torch file, or holds disallowed objects
        raise ValueError(
            f"Cannot read checkpoint {file}: it is truncated, corrupted or not a pyro_ldvae checkpoint ({err})."
        ) from None
    if not isinstance(record, dict) or record.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{file} is not a pyro_ldvae training checkpoint.")
    if record.get("version") != CHECKPOINT_VERSION:
        raise ValueError(
            f"{file} was written by checkpoint format version {record.get('version')}; this pyro_ldvae reads version "
            f"{CHECKPOINT_VERSION}."
        )
    payload = record["state"].numpy().tobytes()
    digest = hashlib.sha256(payload).hexdigest()
    if digest != record.get("sha256"):
        raise ValueError(
            f"{file} is corrupted: the SHA-256 of its contents ({digest[:16]}...) is not the one recorded when it "
            f"was written ({str(record.get('sha256'))[:16]}...)."
        )
    if expected_sha256 is not None and digest != expected_sha256:
        raise ValueError(
            f"{file} is not the checkpoint rank 0 chose (SHA-256 {digest[:16]}... here, {expected_sha256[:16]}... "
            "there): under torchrun on several machines, checkpoint_dir must be on a filesystem they all share."
        )
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"Cannot read the training state in checkpoint {file} ({err}).") from None
    return state, digest


def newest(directory: str | os.PathLike) -> tuple[dict, Path, str] | None:
    """The newest intact checkpoint of ``directory``: ``(state, file, sha256)``, or None if it holds none.

    ``last.ckpt`` first; when it is missing, unreadable or fails its hash, ``previous.ckpt``
    (with a warning). Files present but all bad are a ValueError naming each problem.
    """
    directory = Path(directory)
    problems = []
    for file in (directory / CHECKPOINT_NAME, directory / PREVIOUS_NAME):
        if not file.exists():
            continue
        try:
            state, digest = read_verified(file)
        except ValueError as err:
            problems.append(str(err))
            continue
        if problems:
            logger.warning("%s Falling back to %s (epoch %d).", problems[0], file, state["epoch"])
        return state, file, digest
    if problems:
        raise ValueError(" ".join(problems) + " No intact checkpoint is left in " + str(directory) + ".")
    return None


def load(path: str | os.PathLike) -> dict:
    """The training state of a checkpoint file, or of the newest intact checkpoint of a directory.

    Every load verifies the file's SHA-256; clear errors name the file.
    """
    path = Path(path)
    if path.is_dir():
        found = newest(path)
        if found is None:
            raise FileNotFoundError(
                f"No checkpoint in {path}; pass the checkpoint_dir of an earlier run or its {CHECKPOINT_NAME}."
            )
        return found[0]
    if not path.exists():
        raise FileNotFoundError(
            f"No checkpoint at {path}; pass the checkpoint_dir of an earlier run or its {CHECKPOINT_NAME}."
        )
    return read_verified(path)[0]


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

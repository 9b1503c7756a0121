"""Surviving a dying process under torchrun: where a run starts, and checkpoints all ranks agree on.

With ``torchrun --max-restarts=N``, when one worker dies (killed, out of memory, a lost node)
the elastic agent stops the others and starts the whole group again with
``TORCHELASTIC_RESTART_COUNT`` one higher. A run given a ``checkpoint_dir`` then resumes on its
own: on a restart (count above 0) rank 0 picks the newest intact checkpoint of the directory
(``last.ckpt``, else ``previous.ckpt``), tells every rank its file and SHA-256, and each rank
loads that file and verifies the hash before restoring parameters, optimizer, history and its
own random streams. The rest of training is then bit-identical to an uninterrupted run with the
same seed (CPU with gloo). A first attempt (count 0) starts afresh and replaces what the
directory holds, as a single-process run does.

Checkpoints are agreed: rank 0 writes one after an epoch that every rank completed (the epoch
ends with an all-reduce of the ELBO), holding every rank's random-stream states, and all ranks
wait at a barrier until it is on disk. A checkpoint records the settings that fix the training
trajectory (``run_fingerprint``); resuming automatically from one of a different run is an error
naming the settings that differ, and resuming explicitly (``resume_from``) from one warns.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from .distributed import DistributedContext

logger = logging.getLogger(__name__)

RESTART_COUNT = "TORCHELASTIC_RESTART_COUNT"  # set by torchrun's elastic agent in every worker


def restart_count() -> int:
    """How many times torchrun has restarted this worker group (0 outside torchrun)."""
    return int(os.environ.get(RESTART_COUNT, "0") or 0)


def run_fingerprint(
    module: torch.nn.Module,
    plan: object,
    seed: int,
    batch_size: int,
    drop_last: bool,
    gradient_clip_val: float | None,
    n_obs: int,
    n_vars: int,
    world_size: int,
) -> dict[str, str]:
    """The settings that fix a training trajectory, as strings: same fingerprint, same run.

    The model's class, parameter shapes and dropout rates, the plan's plain settings, the seed,
    minibatch size, gradient clipping, data shape and number of processes. The train/validation
    split is checked separately when a state is restored.
    """
    shapes = ";".join(f"{name}:{tuple(value.shape)}" for name, value in module.state_dict().items())
    dropout = [m.p for m in module.modules() if isinstance(m, torch.nn.Dropout)]
    plain = {k: v for k, v in vars(plan).items() if isinstance(v, (int, float, str, bool, type(None)))}
    return {
        "model": type(module).__name__,
        "parameters": shapes,
        "dropout": repr(dropout),
        "plan": repr(sorted(plain.items())),
        "seed": str(seed),
        "batch_size": str(batch_size),
        "drop_last": str(drop_last),
        "gradient_clip_val": repr(gradient_clip_val),
        "data": f"{n_obs} cells x {n_vars} genes",
        "processes": str(world_size),
    }


def _differences(state: dict, fingerprint: dict[str, str]) -> list[str]:
    recorded = state.get("run") or {}
    return [
        f"{key} {recorded.get(key)!r} there, {value!r} here"
        for key, value in fingerprint.items()
        if recorded.get(key) != value
    ]


def starting_state(
    resume_from: str | os.PathLike | None,
    checkpoint_dir: str | os.PathLike | None,
    fingerprint: dict[str, str],
    max_epochs: int,
    ddp: DistributedContext | None,
) -> tuple[dict, Path] | None:
    """The state training continues from, and its file; None to start afresh.

    ``resume_from`` when given (a different fingerprint warns); else, on a torchrun restart with a
    ``checkpoint_dir``, the newest checkpoint there that all ranks agree on (a different
    fingerprint is a ValueError). A checkpoint past ``max_epochs`` is a ValueError.
    """
    if resume_from is not None:
        file = Path(resume_from)
        found = ckpt.newest(file) if file.is_dir() else None  # the file a directory resumes from
        state, file = (found[0], found[1]) if found is not None else (ckpt.load(file), file)
        differences = _differences(state, fingerprint)
        if differences:
            logger.warning("Resuming from %s, written by a run with other settings: %s.", file, "; ".join(differences))
    elif checkpoint_dir is not None and _restarted(ddp):
        found = _agreed_newest(Path(checkpoint_dir), ddp)
        if found is None:
            logger.warning(
                "Restart %d: no checkpoint in %s yet; training starts afresh.", restart_count(), checkpoint_dir
            )
            return None
        state, file = found
        differences = _differences(state, fingerprint)
        if differences:
            raise ValueError(
                f"torchrun restarted this run, but {file} belongs to a different run ({'; '.join(differences)}): "
                "give each run (and each train() call of a script) a checkpoint_dir of its own."
            )
        logger.warning("Restart %d: resuming from %s after %d completed epochs.", restart_count(), file, state["epoch"])
    else:
        return None
    if state["epoch"] > max_epochs:
        raise ValueError(
            f"{file} holds {state['epoch']} completed epochs, more than max_epochs={max_epochs}: pass "
            "max_epochs of at least that, or another checkpoint."
        )
    return state, file


def _restarted(ddp: DistributedContext | None) -> bool:
    """Whether torchrun has restarted the group.

    On several nodes the agents' restart counts can differ, so the ranks agree on the highest.
    """
    if ddp is None:
        return restart_count() > 0
    count = torch.tensor([restart_count()], dtype=torch.int64)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return int(count.item()) > 0


def _agreed_newest(directory: Path, ddp: DistributedContext | None) -> tuple[dict, Path] | None:
    """Load the newest intact checkpoint of ``directory`` that all ranks agree on.

    Rank 0 picks it and sends its name and hash; every rank loads and verifies that file. A failure
    on any rank is raised on every rank (none waits forever).
    """
    choice: list = [None]
    state = None
    if ddp is None or ddp.is_main:
        try:
            found = ckpt.newest(directory)
            if found is not None:
                state, file, digest = found
                choice = [(file.name, digest)]
        except ValueError as err:
            choice = [("error", str(err))]
    if ddp is not None:
        dist.broadcast_object_list(choice, src=0)
    if choice[0] is None:
        return None
    name, digest = choice[0]
    if name == "error":
        raise ValueError(digest)
    file = directory / name
    error = None
    if state is None:
        try:
            state, _ = ckpt.read_verified(file, expected_sha256=digest)
        except (OSError, ValueError) as err:
            error = f"rank {ddp.rank if ddp else 0}: {err}"
    if ddp is not None:
        errors = [None] * ddp.world_size
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e is not None), None)
    if error is not None:
        raise ValueError(error)
    return state, file


def save_agreed(snapshot: dict, directory: str | os.PathLike, ddp: DistributedContext | None) -> None:
    """Write ``snapshot`` as the checkpoint of ``directory``; under torchrun a collective call.

    Every rank's torch (and CUDA) random-stream states go in; rank 0 writes; all ranks leave
    once the file is on disk, or all raise rank 0's error (none waits forever).
    """
    if ddp is None:
        ckpt.save(snapshot, directory)
        return
    own = {"torch": snapshot["rng"]["torch"], "cuda": snapshot["rng"]["cuda"]}
    by_rank: list = [None] * ddp.world_size
    dist.all_gather_object(by_rank, own)
    outcome: list = [None]
    if ddp.is_main:
        try:
            ckpt.save({**snapshot, "rng": {**snapshot["rng"], "by_rank": by_rank}}, directory)
        except OSError as err:
            outcome = [f"rank 0 could not write the checkpoint to {directory}: {err}"]
    dist.broadcast_object_list(outcome, src=0)  # also the barrier: the file is on disk
    if outcome[0] is not None:
        raise OSError(outcome[0])

"""The training loop: epochs, KL warm-up, validation, early stopping, faults, checkpoints, progress.

How one step is taken is not the loop's business: ``policy.choose_step`` picks a step strategy
(``steps``), the strategy declares the minibatch form it consumes, and the source
(``data.sources``) is built in that form. The loop seeds generators of its own and leaves the
user's global random streams as it found them.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.cells import CellData
from ..data.sources import minibatch_source, resident_cells
from ..models.ldvae import LDVAE
from . import callbacks as cb
from . import checkpoint as ckpt
from . import distributed, elastic, policy
from .allocator import keep_freed_memory
from .evaluate import validation_figures, validation_sums
from .history import History, all_finite, fault, make_history
from .options import TrainOptions
from .plan import make_optimizer, make_scheduler
from .steps import STEPS

logger = logging.getLogger(__name__)

# Steps between host-side checks of the running NaN/inf flag (one device sync each).
FAULT_CHECK_EVERY = 100


@contextlib.contextmanager
def own_random_streams(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's generators on the CPU and ``device`` for the block, then give the caller's states back.

    Pyro's draws and dropout use them; Python's and numpy's are not touched.
    """
    devices = (
        [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    )
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)
        for index in devices:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


def train_svi(
    module: LDVAE,
    data: CellData,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    options: TrainOptions | None = None,
    device: torch.device | str = "cpu",
    **changes: Any,
) -> History:
    """Fit ``module`` to the cells ``train_idx`` of ``data`` by stochastic variational inference.

    ``options`` (with ``changes``, any ``TrainOptions`` field by name) sets the run; ``device`` is
    where it runs (the caller resolves ``options.accelerator``). The split options are the
    caller's: ``train_idx`` and ``val_idx`` are given.

    Returns the history, scvi-tools style: a dict of one-column DataFrames indexed by epoch
    (``elbo_train``, ``elbo_validation``, ``kl_weight``, ``train_time``). As in scvi-tools, the
    ``elbo_*`` entries are the mean per-cell *negative* ELBO (lower is better).

    Faults and interruption: the state after every completed epoch is kept in memory. If the
    loss turns NaN or infinite (checked every ``FAULT_CHECK_EVERY`` steps and at the end of each
    epoch, without a device sync per step), the module and optimizer go back to that state and
    ``TrainingFault`` (a ``FloatingPointError``) names the epoch. Ctrl-C stops after the current
    step and keeps the last completed epoch; the history's ``stop_reason`` is then 'interrupted'.
    ``checkpoint_dir`` receives ``last.ckpt`` (atomically, with its SHA-256; the one before is kept as
    ``previous.ckpt``) every ``checkpoint_every`` epochs, at the end and on interruption;
    ``resume_from`` continues from it, bit for bit as an uninterrupted run with the same seed;
    ``max_epochs`` counts the epochs already done. Under ``torchrun --max-restarts=N`` a restarted
    group resumes from ``checkpoint_dir`` by itself (``elastic``).
    """
    options = (options or TrainOptions()).replace(**changes).resolved()
    device = torch.device(device)
    keep_freed_memory()  # the one place the allocator is tuned: when training starts
    seed = 0 if options.seed is None else options.seed
    with own_random_streams(seed, device):
        return _fit(module, data, np.asarray(train_idx), np.asarray(val_idx), options, device, seed)


def _fit(
    module: LDVAE,
    data: CellData,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    options: TrainOptions,
    device: torch.device,
    seed: int,
) -> History:
    plan, batch_size, n_train = options.plan(module), options.batch_size, len(train_idx)
    max_epochs = options.epochs(data.n_obs)
    drop_last = bool((options.datasplitter_kwargs or {}).get("drop_last", False))
    needs_validation = ["early_stopping"] if options.early_stopping else []
    needs_validation += ["reduce_lr_on_plateau"] if plan.reduce_lr_on_plateau else []
    if needs_validation and not len(val_idx):
        raise ValueError(
            f"{needs_validation[0]} watches the validation ELBO, but there are no validation cells "
            "(train_size=1.0?): pass train_size < 1, e.g. 0.9, or turn it off."
        )
    callbacks = list(options.callbacks or [])
    generator = torch.Generator().manual_seed(seed)  # the minibatch order
    module.to(device).train()
    ddp = distributed.current()  # under torchrun: shard cells, average gradients over ranks

    start_epoch, rows, best, epochs_since_best = 0, [], math.inf, 0
    run = elastic.run_fingerprint(
        module,
        plan,
        seed,
        batch_size,
        drop_last,
        options.gradient_clip_val,
        data.n_obs,
        data.n_vars,
        1 if ddp is None else ddp.world_size,
    )
    # resume_from, or under torchrun after a restart the newest checkpoint all ranks agree on
    resumed = elastic.starting_state(options.resume_from, options.checkpoint_dir, run, max_epochs, ddp)
    state, path = resumed if resumed is not None else (None, None)
    if state is not None:
        start_epoch = state["epoch"]
    resident = resident_cells(data, device, options.data_on_device)
    planned = policy.planned_step_kinds(plan, start_epoch, max_epochs, n_train, batch_size, drop_last)
    full_steps = (max_epochs - start_epoch) * (n_train // batch_size)
    kind = policy.choose_step(
        options.cuda_graphs, options.traced_step, module, device, ddp, resident is not None, full_steps, plan
    )
    strategy = STEPS[kind]
    source = minibatch_source(
        data,
        train_idx,
        batch_size,
        device,
        data_on_device=False,
        ddp=ddp,
        form=strategy.form,
        resident=resident,
        drop_last=drop_last,
    )
    optimizer = make_optimizer(module, plan, capturable=kind == "cuda_graph")
    scheduler = make_scheduler(optimizer, plan)
    if state is not None:
        ckpt.restore(state, module, optimizer, generator, train_idx, val_idx, str(path), 0 if ddp is None else ddp.rank)
        rows, best, epochs_since_best = state["rows"], state["best"], state["epochs_since_best"]
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        logger.info("Resuming from %s after epoch %d.", path, start_epoch - 1)
    elbo_fn = module.elbo if ddp is None else distributed.wrap(module, ddp)
    step = strategy(
        module,
        optimizer,
        elbo_fn,
        n_train,
        device,
        gradient_clip_val=options.gradient_clip_val,
        source=source,
        planned_steps=planned,
    )
    logger.info("Training %d epochs with the %s step.", max_epochs - start_epoch, kind)
    params = step.params
    # Each step's running loss sum is copied here (no host read); the epoch reads it once.
    cumulative_loss = torch.zeros(-(-n_train // batch_size) + 1, device=device)
    global_step = sum(len(row.get("train_loss_step", ())) for row in rows)
    sign = 1.0 if options.early_stopping_mode == "min" else -1.0  # early stopping minimises sign * figure
    snapshot = ckpt.capture(
        module, optimizer, generator, start_epoch, rows, best, epochs_since_best, train_idx, val_idx, scheduler, run
    )
    saved_epoch, stop_reason, epoch = start_epoch, "completed", start_epoch
    bar = tqdm(
        range(start_epoch, max_epochs),
        desc="Training",
        disable=not options.progress_bar,
        unit="epoch",
        initial=start_epoch,
        total=max_epochs,
    )
    guard = ckpt.InterruptGuard().__enter__()  # first Ctrl-C: stop after the current step
    try:
        for epoch in bar:
            start = time.perf_counter()
            kl_weight = plan.kl_weight(epoch, global_step)  # by step: the weight of the epoch's first step
            step.begin_epoch(kl_weight)
            n_steps = 0
            for i, item in enumerate(source(generator)):
                if plan.by_step and global_step + i <= plan.n_steps_kl_warmup:
                    step.set_kl_weight(plan.kl_weight(epoch, global_step + i))
                step(item)
                cumulative_loss[i].copy_(step.loss_sum)
                n_steps = i + 1
                if (i + 1) % FAULT_CHECK_EVERY == 0 and not torch.isfinite(step.loss_sum + step.elbo_sum):
                    break
                if guard.requested:
                    raise KeyboardInterrupt
            if not all_finite([step.loss_sum + step.elbo_sum, *params, *module.buffers()]):
                raise fault(epoch, snapshot, module, optimizer)
            epoch_elbo = step.elbo_sum
            if ddp is not None:  # sum the ranks' shares; align batch-norm running statistics
                epoch_elbo = ddp.all_reduce_sum(step.elbo_sum)
                ddp.sync_buffers(module)
            figures = torch.cat([cumulative_loss[:n_steps].double(), (epoch_elbo / n_train).double().reshape(1)]).cpu()
            losses = torch.diff(figures[:-1], prepend=figures.new_zeros(1))  # one host read per epoch
            global_step += n_steps
            row = {"epoch": epoch, "kl_weight": kl_weight, "elbo_train": -figures[-1].item()}
            row["train_loss_epoch"] = figures[-2].item() / n_steps if n_steps else math.nan
            row["train_loss_step"] = losses
            row["train_time"] = time.perf_counter() - start
            if len(val_idx) and (epoch + 1) % options.check_val_every_n_epoch == 0:
                if ddp is None:
                    row.update(validation_figures(validation_sums(module, data, val_idx), kl_weight))
                else:  # each rank a contiguous run of the sorted cells (on disk: its own rows), summed over ranks
                    mine = np.array_split(np.sort(np.asarray(val_idx)), ddp.world_size)[ddp.rank]
                    sums = validation_sums(module, data, mine)
                    row.update(validation_figures(ddp.all_reduce_sum(sums), kl_weight))
            if scheduler is not None:
                row["lr"] = float(optimizer.param_groups[0]["lr"])
                if plan.lr_scheduler_metric in row:
                    scheduler.step(row[plan.lr_scheduler_metric])
            rows.append(row)
            bar.set_postfix(
                elbo_train=f"{row['elbo_train']:.1f}", elbo_val=f"{row.get('elbo_validation', float('nan')):.1f}"
            )
            monitor = options.early_stopping_monitor
            validations = sum(monitor in r for r in rows)
            if options.early_stopping and monitor in row and validations > options.early_stopping_warmup_epochs:
                if sign * row[monitor] < best - options.early_stopping_min_delta:
                    best, epochs_since_best = sign * row[monitor], 0
                else:
                    epochs_since_best += 1
                    if epochs_since_best >= options.early_stopping_patience:
                        logger.info(
                            "Early stopping in epoch %d: %s has not improved for %d validations.",
                            epoch,
                            monitor,
                            epochs_since_best,
                        )
                        stop_reason = "early_stopping"
            if callbacks and cb.call(callbacks, module, epoch, rows) and stop_reason == "completed":
                logger.info("A callback stopped training after epoch %d.", epoch)
                stop_reason = "callback"
            snapshot = ckpt.capture(
                module,
                optimizer,
                generator,
                epoch + 1,
                rows,
                best,
                epochs_since_best,
                train_idx,
                val_idx,
                scheduler,
                run,
            )
            last = epoch + 1 == max_epochs or stop_reason != "completed"
            if options.checkpoint_dir is not None and ((epoch + 1) % options.checkpoint_every == 0 or last):
                elastic.save_agreed(snapshot, options.checkpoint_dir, ddp)  # under torchrun: rank 0 writes
                saved_epoch = epoch + 1
            if stop_reason != "completed":
                break
    except (ValueError, RuntimeError):
        # NaN parameters make the next step fail inside (e.g. a Normal rejects a NaN loc): the same
        # fault. Anything else is a genuine error and propagates unchanged.
        if all_finite([*params, *module.buffers()]):
            raise
        raise fault(epoch, snapshot, module, optimizer) from None
    except KeyboardInterrupt:
        ckpt.restore_parameters(snapshot, module, optimizer)
        rows, stop_reason = snapshot["rows"], "interrupted"
        logger.warning(
            "Training interrupted in epoch %d; the model keeps the last completed epoch (%d), usable and savable.",
            epoch,
            snapshot["epoch"] - 1,
        )
        if options.checkpoint_dir is not None and snapshot["epoch"] > saved_epoch and distributed.is_main_process():
            ckpt.save(snapshot, options.checkpoint_dir)
    finally:
        guard.__exit__(None, None, None)
        bar.close()
    return make_history(rows, stop_reason)

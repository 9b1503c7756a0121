"""The SVI loop: data split, Adam, KL warm-up, validation, early stopping, history.

The loss of one step is ``-ELBO / n_train``, where the ELBO is the full-training-set estimate
from one minibatch (the ``cells`` plate scales local terms by ``n_train / cells``). Dividing by
the constant ``n_train`` makes the gradient the minibatch mean over cells of
``reconstruction + kl_weight * KL_z + KL_l``, exactly scvi-tools' loss, so that Adam with
scvi-tools' settings (lr 1e-3, eps 0.01, weight decay 1e-6) follows the same trajectory;
global latent variables (priors on loadings) keep their unscaled, unbiased contribution.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import platform
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyro
import torch
from tqdm.auto import tqdm

from ..data.cells import CellData, DeviceCells
from ..data.minibatch import Minibatch
from ..models import priors
from ..models.ldvae import LDVAE
from . import checkpoint as ckpt
from . import distributed
from .cuda_graph import GraphedTrainingStep
from .traced_step import TracedTrainingStep

logger = logging.getLogger(__name__)

# Recording the CPU step as a graph (traced_step) costs 0.3-0.7 s, plus about 1 s to import
# torch's tracing machinery once per process; a replayed step saves about 2 ms on the 2-core
# benchmark machine. By default a run records only when it plans at least this many steps.
TRACED_STEP_MIN_STEPS = 1000
# Steps between host-side checks of the running NaN/inf flag (one device sync each).
FAULT_CHECK_EVERY = 100
# NO_VALIDATION: training and evaluation run with Pyro's and torch's distribution argument checks
# off. Each check of a Normal's loc and scale is a reduction plus a host sync (about forty small
# ops a step); the values are finite by construction unless training diverged, and divergence is
# caught by the NaN/inf flag above, which rolls the parameters back.

# PAGE_FAULTS: every step allocates and frees a dozen (cells, genes) buffers (1 MB each at 128 x
# 2,000). With glibc's default thresholds those blocks go back to the kernel when freed (mmap, or
# trimmed off the top of the heap), and the next step touches them as fresh pages that the kernel
# zero-fills: about 1,000 page faults and 1.5 ms of an 8.9 ms step on the 2-core benchmark machine.
# Training (and building a LinearSCVI, for the Monte Carlo tasks: get_marginal_ll 15-30% faster)
# raises the thresholds once per process, so freed blocks up to MMAP_THRESHOLD are reused and up
# to TRIM_THRESHOLD of free heap is kept. Environment settings of the user
# (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_, ...) take precedence: then nothing is changed.
MMAP_THRESHOLD = 32 << 20  # glibc's own ceiling for its dynamic threshold on 64-bit
TRIM_THRESHOLD = 128 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers, from glibc's malloc.h
_allocator_tuned = False


class History(dict):
    """The history dict of ``train_svi``; ``stop_reason`` is 'completed', 'early_stopping' or 'interrupted'."""

    stop_reason: str = "completed"


class TrainingFault(FloatingPointError):
    """The loss became NaN or infinite; ``history`` holds the epochs completed before, whose
    parameters the module was restored to."""

    history: dict = {}


def _history(rows: list[dict], stop_reason: str = "completed") -> History:
    out = History()
    if rows:
        frame = pd.DataFrame(rows).set_index("epoch")
        out.update({name: frame[[name]] for name in frame.columns})
    out.stop_reason = stop_reason
    return out


def _fault(epoch: int, snapshot: dict, module: LDVAE, optimizer: torch.optim.Optimizer) -> TrainingFault:
    """Roll module and optimizer back to ``snapshot`` and describe the fault of ``epoch``."""
    ckpt.restore_parameters(snapshot, module, optimizer)
    kept = f"epoch {snapshot['epoch'] - 1}" if snapshot["epoch"] else "initialisation"
    err = TrainingFault(
        f"Training stopped: the loss became NaN or infinite in epoch {epoch}. The model keeps the parameters "
        f"of the last good epoch (those after {kept}). Remedies: lower the learning rate "
        "(plan_kwargs={'lr': 1e-4}), clip gradients (gradient_clip_val=1.0), and check that the input holds raw "
        "counts without extreme outliers."
    )
    err.history = _history(snapshot["rows"])
    return err


def _all_finite(tensors) -> bool:
    """One device sync: are all ``tensors`` finite?"""
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


@dataclass
class TrainingPlan:
    """Optimiser and annealing settings; defaults are scvi-tools' ``TrainingPlan`` defaults."""

    lr: float = 1e-3
    weight_decay: float = 1e-6
    eps: float = 0.01
    n_epochs_kl_warmup: int | None = 400
    max_kl_weight: float = 1.0
    min_kl_weight: float = 0.0

    def kl_weight(self, epoch: int) -> float:
        """Linear warm-up by epoch, exactly 0 in the first epoch (scvi-tools' ``_compute_kl_weight``)."""
        if self.n_epochs_kl_warmup and epoch < self.n_epochs_kl_warmup:
            return (self.max_kl_weight - self.min_kl_weight) * epoch / self.n_epochs_kl_warmup + self.min_kl_weight
        return self.max_kl_weight


def split_indices(
    n_obs: int,
    train_size: float | None = None,
    validation_size: float | None = None,
    batch_size: int = 128,
    seed: int = 0,
    shuffle: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation cell indices, drawn exactly as scvi-tools' ``DataSplitter`` does.

    With the same ``seed`` as ``scvi.settings.seed`` both libraries use the same cells. When
    ``train_size`` is left at its default and the last training minibatch would hold one or two
    cells (BatchNorm cannot train on one), those cells move to validation, as in scvi-tools.
    """
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
    if 0 < remainder < 3:
        if size_given:
            warnings.warn(
                f"The last training minibatch holds only {remainder} cell(s); batch norm needs at least 2. "
                f"It is dropped each epoch. Change batch_size or train_size to use every cell.",
                UserWarning,
                stacklevel=3,
            )
        else:
            n_train -= remainder
            n_val += remainder
            logger.info("%d cell(s) moved from training to validation to avoid a tiny last minibatch.", remainder)
    order = np.random.RandomState(seed=seed).permutation(n_obs) if shuffle else np.arange(n_obs)
    return order[n_val : n_val + n_train], order[:n_val]


@torch.no_grad()
def evaluate_elbo(module: LDVAE, data: CellData, indices: np.ndarray, batch_size: int = 1024) -> torch.Tensor:
    """Per-cell ELBO ``(cells,)`` in eval mode (running batch-norm statistics, no dropout)."""
    was_training = module.training
    module.eval()
    indices = np.asarray(indices)
    order = np.argsort(indices, kind="stable")  # cells in file order: sequential reads for on-disk data
    try:
        minibatches = data.iter_minibatches(indices[order], batch_size, module.device, sparse=True)
        with pyro.validation_enabled(False):  # see NO_VALIDATION
            parts = [module.elbo(mb)[1] for mb in minibatches]
    finally:
        module.train(was_training)
    if not parts:
        return torch.zeros(0)
    per_cell = torch.empty(len(indices), device=parts[0].device)
    per_cell[torch.from_numpy(order).to(per_cell.device)] = torch.cat(parts)
    return per_cell


def _minibatch_indices(train_idx: np.ndarray, batch_size: int, generator: torch.Generator, ddp=None):
    """Shuffled minibatches of positions into ``train_idx``; a last minibatch of one cell is dropped.
    Under DDP, this rank's strided share of the (shared) permutation."""
    order = torch.randperm(len(train_idx), generator=generator).numpy()
    if ddp is not None:
        order = ddp.shard(order)
    for start in range(0, len(order), batch_size):
        positions = order[start : start + batch_size]
        if len(positions) > 1:
            yield positions


def keep_freed_memory() -> bool:
    """Make glibc's allocator keep freed training buffers for reuse (see PAGE_FAULTS); True if changed.

    Does nothing off glibc, when already done in this process, or when the environment sets any
    ``MALLOC_*_`` tunable (the user's choice wins).
    """
    global _allocator_tuned
    if _allocator_tuned or platform.libc_ver()[0] != "glibc" or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    _allocator_tuned = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    return _allocator_tuned


def make_optimizer(module: torch.nn.Module, plan: TrainingPlan, capturable: bool = False) -> torch.optim.Optimizer:
    """Adam with scvi-tools' settings; one fused kernel over all parameters where torch has one.

    ``capturable`` keeps the step count on the device, as a CUDA graph of the step needs."""
    params = list(module.parameters())
    settings = dict(lr=plan.lr, eps=plan.eps, weight_decay=plan.weight_decay, capturable=capturable)
    try:
        return torch.optim.Adam(params, **settings, fused=True)
    except (RuntimeError, TypeError):  # a device or dtype without a fused Adam
        return torch.optim.Adam(params, **settings, foreach=True)


def resident_cells(data: CellData, device: torch.device | str, data_on_device: bool | None) -> DeviceCells | None:
    """The counts to keep on ``device`` for training, or None to cut each minibatch on the host.

    Default (``data_on_device=None``): on CUDA only, as a dense matrix when that takes at most
    half the free GPU memory (minibatches are then one gather, which a CUDA graph can capture),
    else as CSR when that fits, else on the host. ``True`` keeps them on ``device`` in any case
    (dense on CUDA when that fits, CSR otherwise and on CPU); on-disk data never are.
    """
    device = torch.device(device)
    if hasattr(data, "iter_epoch") or data_on_device is False:
        return None
    if device.type != "cuda":
        return DeviceCells(data, device) if data_on_device else None
    dense = DeviceCells.fits(data, device, dense=True)
    if data_on_device is None and not dense and not DeviceCells.fits(data, device):
        return None
    return DeviceCells(data, device, dense=dense)


class ResidentMinibatches:
    """Each epoch's shuffled training minibatches, cut from counts resident on the device.

    The epoch's permutation is copied to the device once. With ``yield_positions`` a full-size
    minibatch comes as its positions in the training set (an int64 device tensor), for the
    CUDA-graph step to gather itself (see ``cuda_graph``); an epoch's last, smaller minibatch
    always comes as a ``Minibatch``. Every minibatch then has a dense ``x``, also from CSR
    (``DeviceCells.fixed_shape_rows``).
    """

    def __init__(
        self,
        resident: DeviceCells,
        train_idx: np.ndarray,
        batch_size: int,
        ddp: distributed.DistributedContext | None = None,
        yield_positions: bool = False,
    ):
        self.resident, self.batch_size, self.ddp, self.yield_positions = resident, batch_size, ddp, yield_positions
        self.n_train = len(train_idx)
        self.train_cells = torch.from_numpy(np.asarray(train_idx, dtype=np.int64)).to(resident.device)

    def minibatch(self, positions: torch.Tensor) -> Minibatch:
        """With ``yield_positions`` (the CUDA-graph step), ``x`` is dense and cut with fixed shapes."""
        cells = self.train_cells[positions]
        return self.resident.minibatch(cells, plate_idx=positions, fixed_shapes=self.yield_positions)

    def __call__(self, generator: torch.Generator) -> Iterator[Minibatch | torch.Tensor]:
        order = torch.randperm(self.n_train, generator=generator)
        if self.ddp is not None:
            order = torch.from_numpy(self.ddp.shard(order.numpy()))
        order = order.to(self.resident.device)  # one copy per epoch
        for start in range(0, len(order), self.batch_size):
            positions = order[start : start + self.batch_size]
            if self.yield_positions and len(positions) == self.batch_size:
                yield positions
            elif len(positions) > 1:
                yield self.minibatch(positions)


def minibatch_source(
    data: CellData,
    train_idx: np.ndarray,
    batch_size: int,
    device: torch.device | str = "cpu",
    data_on_device: bool | None = None,
    ddp: distributed.DistributedContext | None = None,
) -> Callable[[torch.Generator], Iterator[Minibatch]]:
    """A function of the epoch's generator that yields that epoch's shuffled training minibatches.

    In-memory data are cut per step from CSR (sparse ``x``), or from counts resident on the
    device (see ``resident_cells``); data with their own epoch iterator (on-disk data) use it.
    Every path draws the permutation from the same generator, so they visit cells in the same order.
    """
    device = torch.device(device)
    if hasattr(data, "iter_epoch"):
        return lambda generator: data.iter_epoch(train_idx, batch_size, generator, device, ddp)
    resident = resident_cells(data, device, data_on_device)
    if resident is not None:
        return ResidentMinibatches(resident, train_idx, batch_size, ddp)
    return CutMinibatches(data, train_idx, batch_size, device, ddp)


class CutMinibatches:
    """An epoch's shuffled training minibatches cut from in-memory counts on the host, per step.

    ``x`` is a torch sparse CSR tensor, or :class:`SparseCounts` with ``sparse_counts`` (set for
    the traced CPU step, which takes that form: cutting it directly saves a conversion per step).
    """

    def __init__(self, data: CellData, train_idx: np.ndarray, batch_size: int, device: torch.device, ddp=None):
        self.data, self.train_idx, self.batch_size, self.device, self.ddp = data, train_idx, batch_size, device, ddp
        self.sparse_counts = False

    def __call__(self, generator: torch.Generator) -> Iterator[Minibatch]:
        for positions in _minibatch_indices(self.train_idx, self.batch_size, generator, self.ddp):
            yield self.data.minibatch(
                self.train_idx[positions],
                self.device,
                plate_idx=positions,
                sparse=True,
                sparse_counts=self.sparse_counts,
            )


def _eager_only(module: LDVAE, ddp: object | None) -> list[str]:
    """Why a step could not be replayed from a graph on any device (CUDA graph or traced CPU step)."""
    reasons = []
    if not (priors.capturable(module.loadings_prior) and priors.capturable(module.z_prior)):
        reasons.append("a prior other than the built-in ones runs eagerly (it may build tensors or compute in Python)")
    if ddp is not None:
        reasons.append("distributed training runs eagerly")
    return reasons


def _replay_wanted(option: str, value: bool | None, reasons: list[str]) -> bool:
    """``value`` of the option ``option`` against the ``reasons`` it cannot be met; ``True`` unmet is an error."""
    if value and reasons:
        raise ValueError(f"{option}=True cannot be met: {'; '.join(reasons)}. Pass {option}=None or False.")
    return value is not False and not reasons


def use_cuda_graphs(
    cuda_graphs: bool | None, module: LDVAE, source: Callable, device: torch.device, ddp: object | None
) -> bool:
    """Whether to replay the training step as a CUDA graph; ``True`` that cannot be met is an error."""
    reasons = []
    if device.type != "cuda":
        reasons.append("it needs a CUDA device")
    if not isinstance(source, ResidentMinibatches):
        reasons.append("it needs the counts resident on the GPU (data_on_device; in-memory data that fit)")
    return _replay_wanted("cuda_graphs", cuda_graphs, reasons + _eager_only(module, ddp))


def use_traced_step(
    traced_step: bool | None, module: LDVAE, device: torch.device, ddp: object | None, planned_steps: int
) -> bool:
    """Whether to replay the CPU training step from a recorded graph (``traced_step``); ``True`` that
    cannot be met is an error. By default only for runs of at least ``TRACED_STEP_MIN_STEPS``
    minibatches, which repay the recording."""
    reasons = [] if device.type == "cpu" else ["it runs on CPU (on CUDA the step is a CUDA graph, see cuda_graphs)"]
    wanted = _replay_wanted("traced_step", traced_step, reasons + _eager_only(module, ddp))
    return wanted and (traced_step is not None or planned_steps >= TRACED_STEP_MIN_STEPS)


def planned_step_kinds(
    plan: TrainingPlan, start_epoch: int, max_epochs: int, n_train: int, batch_size: int
) -> dict[tuple[int, bool], int]:
    """How many steps of each ``(cells, KL weight is 0)`` kind the epochs to come will take
    (``TracedTrainingStep`` records a graph only for kinds that repay the recording). The sizes
    are those ``_minibatch_indices`` yields: full minibatches, then the rest unless it is one cell."""
    sizes = [batch_size] * (n_train // batch_size) + ([n_train % batch_size] if n_train % batch_size > 1 else [])
    planned: dict[tuple[int, bool], int] = {}
    for epoch in range(start_epoch, max_epochs):
        masked = plan.kl_weight(epoch) == 0
        for size in sizes:
            planned[size, masked] = planned.get((size, masked), 0) + 1
    return planned


def train_svi(
    module: LDVAE,
    data: CellData,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    max_epochs: int,
    plan: TrainingPlan | None = None,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
    seed: int = 0,
    early_stopping: bool = False,
    early_stopping_patience: int = 45,
    early_stopping_min_delta: float = 0.0,
    progress_bar: bool = True,
    check_val_every_n_epoch: int = 1,
    gradient_clip_val: float | None = None,
    checkpoint_dir: str | None = None,
    checkpoint_every: int = 1,
    resume_from: str | None = None,
    data_on_device: bool | None = None,
    cuda_graphs: bool | None = None,
    traced_step: bool | None = None,
) -> dict[str, pd.DataFrame]:
    """Fit ``module`` to the cells ``train_idx`` of ``data`` by stochastic variational inference.

    ``data_on_device`` keeps the whole count matrix on ``device`` and cuts minibatches there
    (default: on CUDA when the counts fit in half the free GPU memory); see ``resident_cells``.
    ``cuda_graphs`` replays the training step as a CUDA graph (see ``cuda_graph``); default: on
    CUDA whenever it can (counts resident on the GPU, built-in priors only, one process).
    ``traced_step`` replays the CPU step from a graph recorded at the first minibatch of each kind
    that the run takes often enough (``planned_step_kinds``, see ``traced_step``); default: on CPU
    for runs of at least ``TRACED_STEP_MIN_STEPS`` minibatches, with built-in priors only, in one
    process. The results are the eager step's.

    Returns the history, scvi-tools style: a dict of one-column DataFrames indexed by epoch
    (``elbo_train``, ``elbo_validation``, ``reconstruction_loss_train``, ``kl_local_train``,
    ``kl_weight``, ``train_loss_epoch``). As in scvi-tools, the ``elbo_*`` entries are the
    mean per-cell *negative* ELBO (lower is better).

    Faults and interruption: the state after every completed epoch is kept in memory. If the
    loss turns NaN or infinite (checked every ``FAULT_CHECK_EVERY`` steps and at the end of each
    epoch, without a device sync per step), the module and optimizer go back to that state and
    ``TrainingFault`` (a ``FloatingPointError``) names the epoch. Ctrl-C stops after the current
    step and keeps the last completed epoch; the history's ``stop_reason`` is then 'interrupted'.
    ``gradient_clip_val`` clips the gradient's total norm (as Lightning's ``gradient_clip_val``).
    ``checkpoint_dir`` receives ``last.ckpt`` (atomically) every ``checkpoint_every`` epochs, at the
    end and on interruption; ``resume_from`` (that directory or file) continues from it, bit for bit
    as an uninterrupted run with the same seed; ``max_epochs`` counts the epochs already done.
    """
    plan = plan or TrainingPlan()
    keep_freed_memory()  # see PAGE_FAULTS
    pyro.set_rng_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    device = torch.device(device)
    module.to(device).train()
    ddp = distributed.current()  # under torchrun: shard cells, average gradients over ranks
    epoch_minibatches = minibatch_source(data, train_idx, batch_size, device, data_on_device, ddp)
    use_graph = use_cuda_graphs(cuda_graphs, module, epoch_minibatches, device, ddp)
    optimizer = make_optimizer(module, plan, capturable=use_graph)
    elbo_fn = module.elbo if ddp is None else distributed.wrap(module, ddp)
    n_train = len(train_idx)
    rows: list[dict[str, float]] = []
    best, epochs_since_best = math.inf, 0
    start_epoch = 0
    if resume_from is not None:
        state = ckpt.load(resume_from)
        ckpt.restore(state, module, optimizer, generator, train_idx, val_idx, str(ckpt.checkpoint_path(resume_from)))
        start_epoch, rows = state["epoch"], state["rows"]
        best, epochs_since_best = state["best"], state["epochs_since_best"]
        logger.info("Resuming from %s after epoch %d.", ckpt.checkpoint_path(resume_from), start_epoch - 1)
    params = [p for p in module.parameters() if p.requires_grad]
    # Running sums over an epoch, updated in place (a CUDA graph writes to fixed addresses):
    # the per-cell ELBO, and the loss, whose NaN/inf is read every FAULT_CHECK_EVERY steps.
    elbo_sum = torch.zeros((), device=device)
    loss_sum = torch.zeros((), device=device)

    planned_steps = (max_epochs - start_epoch) * (n_train // batch_size)
    traced = None
    if use_traced_step(traced_step, module, device, ddp, planned_steps):
        traced = TracedTrainingStep(
            module, n_train, planned_step_kinds(plan, start_epoch, max_epochs, n_train, batch_size)
        )
        if isinstance(epoch_minibatches, CutMinibatches):
            epoch_minibatches.sparse_counts = True

    def svi_step(mb: Minibatch, kl_weight: float | torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        replayed = traced(mb, kl_weight) if traced is not None and traced.accepts(mb) else None
        if replayed is not None:
            loss, step_elbo = replayed
        else:
            with pyro.validation_enabled(False):  # see NO_VALIDATION
                elbo, per_cell = elbo_fn(mb, n_obs=n_train, kl_weight=kl_weight)
            loss = -elbo / n_train
            loss.backward()
            loss, step_elbo = loss.detach(), per_cell.detach().sum()
        if gradient_clip_val is not None:
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
        optimizer.step()
        elbo_sum.add_(step_elbo)
        loss_sum.add_(loss)

    graphed_step = None
    if use_graph:
        epoch_minibatches.yield_positions = True
        epoch_minibatches.resident.capacity(batch_size)  # read once here, not inside the capture
        graphed_step = GraphedTrainingStep(
            lambda positions, kl_weight: svi_step(epoch_minibatches.minibatch(positions), kl_weight),
            batch_size,
            device,
        )
    snapshot = ckpt.capture(
        module, optimizer, generator, start_epoch, rows, best, epochs_since_best, train_idx, val_idx
    )
    saved_epoch = start_epoch
    stop_reason = "completed"
    bar = tqdm(
        range(start_epoch, max_epochs),
        desc="Training",
        disable=not progress_bar,
        unit="epoch",
        initial=start_epoch,
        total=max_epochs,
    )
    epoch = start_epoch
    guard = ckpt.InterruptGuard().__enter__()  # first Ctrl-C: stop after the current step
    try:
        for epoch in bar:
            start = time.perf_counter()
            kl_weight = plan.kl_weight(epoch)
            elbo_sum.zero_()
            loss_sum.zero_()
            if graphed_step is not None:
                graphed_step.set_kl_weight(kl_weight)
            for step, mb in enumerate(epoch_minibatches(generator)):
                if isinstance(mb, torch.Tensor):  # a full minibatch's positions: the graph gathers it
                    graphed_step(mb)
                else:
                    svi_step(mb, kl_weight)
                if (step + 1) % FAULT_CHECK_EVERY == 0 and not torch.isfinite(loss_sum + elbo_sum):
                    break
                if guard.requested:
                    raise KeyboardInterrupt
            if not _all_finite([loss_sum + elbo_sum, *params, *module.buffers()]):
                raise _fault(epoch, snapshot, module, optimizer)
            epoch_elbo = elbo_sum
            if ddp is not None:  # sum the ranks' shares; align batch-norm running statistics
                epoch_elbo = ddp.all_reduce_sum(elbo_sum)
                ddp.sync_buffers(module)
            row = {"epoch": epoch, "kl_weight": kl_weight, "elbo_train": -(epoch_elbo / n_train).item()}
            row["train_time"] = time.perf_counter() - start
            if len(val_idx) and (epoch + 1) % check_val_every_n_epoch == 0:
                if ddp is None:
                    row["elbo_validation"] = -evaluate_elbo(module, data, val_idx).mean().item()
                else:
                    row["elbo_validation"] = -distributed.validation_elbo(module, data, val_idx, ddp)
            rows.append(row)
            bar.set_postfix(
                elbo_train=f"{row['elbo_train']:.1f}", elbo_val=f"{row.get('elbo_validation', float('nan')):.1f}"
            )
            if early_stopping and "elbo_validation" in row:
                if row["elbo_validation"] < best - early_stopping_min_delta:
                    best, epochs_since_best = row["elbo_validation"], 0
                else:
                    epochs_since_best += 1
                    if epochs_since_best >= early_stopping_patience:
                        logger.info(
                            "Early stopping in epoch %d: validation ELBO has not improved for %d epochs.",
                            epoch,
                            epochs_since_best,
                        )
                        stop_reason = "early_stopping"
            snapshot = ckpt.capture(
                module, optimizer, generator, epoch + 1, rows, best, epochs_since_best, train_idx, val_idx
            )
            last = epoch + 1 == max_epochs or stop_reason != "completed"
            if checkpoint_dir is not None and ((epoch + 1) % checkpoint_every == 0 or last):
                ckpt.save(snapshot, checkpoint_dir)
                saved_epoch = epoch + 1
            if stop_reason != "completed":
                break
    except (ValueError, RuntimeError):
        # NaN parameters make the next step fail inside (e.g. a Normal rejects a NaN loc): the same
        # fault. Anything else is a genuine error and propagates unchanged.
        if _all_finite([*params, *module.buffers()]):
            raise
        raise _fault(epoch, snapshot, module, optimizer) from None
    except KeyboardInterrupt:
        ckpt.restore_parameters(snapshot, module, optimizer)
        rows, stop_reason = snapshot["rows"], "interrupted"
        logger.warning(
            "Training interrupted in epoch %d; the model keeps the last completed epoch (%d), usable and savable.",
            epoch,
            snapshot["epoch"] - 1,
        )
        if checkpoint_dir is not None and snapshot["epoch"] > saved_epoch:
            ckpt.save(snapshot, checkpoint_dir)
    finally:
        guard.__exit__(None, None, None)
        bar.close()
    return _history(rows, stop_reason)

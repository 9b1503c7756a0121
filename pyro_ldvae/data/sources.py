"""Minibatch sources: each epoch's shuffled training minibatches, in the form a training step consumes.

A source is a function of the epoch's ``torch.Generator``. Every source draws the epoch's
permutation from that generator, so all of them visit cells in the same order; they differ only
in where the counts live and in the form of what they yield (``MinibatchForm``), which is fixed
when the source is built:

- ``"csr"``: a ``Minibatch`` whose ``x`` is a torch sparse CSR tensor (host data) or whatever
  the resident counts give (dense, or CSR);
- ``"sparse_counts"``: a ``Minibatch`` whose ``x`` is ``SparseCounts`` (the form the replayed CPU
  step takes; cutting it directly saves a conversion per step);
- ``"positions"``: the minibatch's positions in the training set, an int64 tensor on the device,
  for a step that gathers the minibatch itself (``ResidentMinibatches.minibatch``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Literal, Protocol

import numpy as np
import torch

from .cells import CellData, DeviceCells
from .minibatch import Minibatch

MinibatchForm = Literal["csr", "sparse_counts", "positions"]
Source = Callable[[torch.Generator], Iterator[Minibatch | torch.Tensor]]


class Shard(Protocol):
    """The share of an epoch this process trains on under data-parallel training (``infer.distributed``)."""

    def shard(self, order: np.ndarray) -> np.ndarray:
        """The positions of ``order`` this process trains on."""


def smallest_minibatch(batch_size: int, drop_last: bool = False) -> int:
    """The fewest cells a minibatch may hold.

    All ``batch_size`` with ``drop_last``, else 2 (batch norm cannot train on one cell).
    """
    return batch_size if drop_last else 2


def minibatch_indices(
    train_idx: np.ndarray,
    batch_size: int,
    generator: torch.Generator,
    ddp: Shard | None = None,
    drop_last: bool = False,
) -> Iterator[np.ndarray]:
    """Shuffled minibatches of positions into ``train_idx``.

    A last minibatch of one cell is dropped (batch norm cannot train on one), and any last partial one with
    ``drop_last``. Under DDP, this rank's strided share of the shared permutation.
    """
    smallest = smallest_minibatch(batch_size, drop_last)
    order = torch.randperm(len(train_idx), generator=generator).numpy()
    if ddp is not None:
        order = ddp.shard(order)
    for start in range(0, len(order), batch_size):
        positions = order[start : start + batch_size]
        if len(positions) >= smallest:
            yield positions


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

    The epoch's permutation is copied to the device once. In the ``"positions"`` form every
    minibatch comes as its positions (an int64 device tensor), and ``minibatch`` cuts it with
    fixed shapes (a dense ``x``, also from CSR, see ``DeviceCells.fixed_shape_rows``), as a
    captured step must; otherwise each comes as a ``Minibatch``.
    """

    def __init__(
        self,
        resident: DeviceCells,
        train_idx: np.ndarray,
        batch_size: int,
        ddp: Shard | None = None,
        form: MinibatchForm = "csr",
        drop_last: bool = False,
    ):
        if form == "sparse_counts":
            raise ValueError("counts resident on the device are cut as dense or CSR minibatches, not SparseCounts.")
        self.resident, self.batch_size, self.ddp, self.form = resident, batch_size, ddp, form
        self.smallest = smallest_minibatch(batch_size, drop_last)
        self.n_train = len(train_idx)
        self.train_cells = torch.from_numpy(np.asarray(train_idx, dtype=np.int64)).to(resident.device)

    def minibatch(self, positions: torch.Tensor) -> Minibatch:
        """The minibatch at ``positions`` of the training set; fixed shapes in the ``"positions"`` form."""
        cells = self.train_cells[positions]
        return self.resident.minibatch(cells, plate_idx=positions, fixed_shapes=self.form == "positions")

    def __call__(self, generator: torch.Generator) -> Iterator[Minibatch | torch.Tensor]:
        """One epoch of minibatches (or positions, for a captured step) in a fresh order drawn from ``generator``."""
        order = torch.randperm(self.n_train, generator=generator)
        if self.ddp is not None:
            order = torch.from_numpy(self.ddp.shard(order.numpy()))
        order = order.to(self.resident.device)  # one copy per epoch
        for start in range(0, len(order), self.batch_size):
            positions = order[start : start + self.batch_size]
            if len(positions) >= self.smallest:
                yield positions if self.form == "positions" else self.minibatch(positions)


class CutMinibatches:
    """An epoch's shuffled training minibatches cut from in-memory counts on the host, per step.

    ``x`` is torch sparse CSR (form ``"csr"``) or ``SparseCounts`` (form ``"sparse_counts"``).
    """

    def __init__(
        self,
        data: CellData,
        train_idx: np.ndarray,
        batch_size: int,
        device: torch.device,
        ddp: Shard | None = None,
        form: MinibatchForm = "csr",
        drop_last: bool = False,
    ):
        if form == "positions":
            raise ValueError("minibatches come as positions only from counts resident on the device.")
        self.data, self.train_idx, self.batch_size, self.device, self.ddp = data, train_idx, batch_size, device, ddp
        self.form, self.drop_last = form, drop_last

    def __call__(self, generator: torch.Generator) -> Iterator[Minibatch]:
        """One epoch of minibatches in a fresh order drawn from ``generator``."""
        for positions in minibatch_indices(self.train_idx, self.batch_size, generator, self.ddp, self.drop_last):
            yield self.data.minibatch(
                self.train_idx[positions],
                self.device,
                plate_idx=positions,
                sparse=True,
                sparse_counts=self.form == "sparse_counts",
            )


def minibatch_source(
    data: CellData,
    train_idx: np.ndarray,
    batch_size: int,
    device: torch.device | str = "cpu",
    data_on_device: bool | None = None,
    ddp: Shard | None = None,
    form: MinibatchForm = "csr",
    resident: DeviceCells | None = None,
    drop_last: bool = False,
) -> Source:
    """A function of the epoch's generator that yields that epoch's shuffled training minibatches.

    In-memory data are cut per step from CSR on the host, or from counts resident on the device
    (``resident``, else ``resident_cells(data, device, data_on_device)``); data with their own
    epoch iterator (on-disk data) use it and yield ``Minibatch`` es whatever ``form`` asks.
    ``drop_last`` drops each epoch's last minibatch when it holds fewer than ``batch_size`` cells.

    Examples
    --------
    >>> source = minibatch_source(cells, np.arange(1000), 128)
    >>> for mb in source(torch.Generator().manual_seed(0)): ...
    """
    device = torch.device(device)
    if hasattr(data, "iter_epoch"):
        smallest = smallest_minibatch(batch_size, drop_last)
        return lambda generator: (
            mb for mb in data.iter_epoch(train_idx, batch_size, generator, device, ddp) if mb.n_cells >= smallest
        )
    if resident is None:
        resident = resident_cells(data, device, data_on_device)
    if resident is not None:
        form = "csr" if form == "sparse_counts" else form
        return ResidentMinibatches(resident, train_idx, batch_size, ddp, form, drop_last)
    return CutMinibatches(data, train_idx, batch_size, device, ddp, form, drop_last)

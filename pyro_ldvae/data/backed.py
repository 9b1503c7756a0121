"""Out-of-core cells: counts stay on disk (``.h5ad`` opened ``backed='r'``, or a ``.zarr`` store).

Training reads the count matrix in contiguous blocks of cells (fast sequential reads), visits the
blocks in a random order each epoch, and shuffles cells within a buffer of several blocks, so
memory holds one buffer at a time, never the whole matrix. Everything that walks all cells
(library-size prior, latent representation, ELBO) streams the blocks in order.

Examples
--------
>>> import anndata, pyro_ldvae
>>> adata = anndata.read_h5ad("big.h5ad", backed="r")        # or read_backed("big.zarr")
>>> pyro_ldvae.LinearSCVI.setup_anndata(adata)
>>> model = pyro_ldvae.LinearSCVI(adata).train(max_epochs=1)
>>> z = model.get_latent_representation()                      # chunk by chunk
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import scipy.sparse as sp
import torch
from anndata import AnnData
from anndata.abc import CSCDataset, CSRDataset

from ..kernels.sparse import scipy_to_torch_csr
from .cells import CellData
from .minibatch import Minibatch
from .minified import MinifiedCellData, minify_type
from .registry import Registry, get_counts, index_dtype

logger = logging.getLogger(__name__)

BLOCK_SIZE = 2048  # cells per contiguous read
BUFFER_BLOCKS = 16  # blocks shuffled together


def is_on_disk(matrix: object) -> bool:
    """Whether ``matrix`` is an on-disk matrix (anndata sparse dataset or h5py/zarr array)."""
    if isinstance(matrix, (CSRDataset, CSCDataset, h5py.Dataset)):
        return True
    return type(matrix).__module__.startswith("zarr")


def read_backed(path: str | Path) -> AnnData:
    """Open ``path`` (``.h5ad`` or ``.zarr``) with ``obs``/``var`` in memory and X left on disk."""
    path = Path(path)
    if path.suffix == ".h5ad":
        import anndata

        return anndata.read_h5ad(path, backed="r")
    import zarr
    from anndata.io import read_elem, sparse_dataset

    group = zarr.open(str(path), mode="r")
    x = group["X"]
    matrix = sparse_dataset(x) if isinstance(x, zarr.Group) else x
    uns = read_elem(group["uns"]) if "uns" in group else {}
    return AnnData(X=matrix, obs=read_elem(group["obs"]), var=read_elem(group["var"]), uns=uns)


class BackedCellData(CellData):
    """A ``CellData`` whose counts are read from disk block by block.

    ``obs`` codes live in memory (a few bytes per cell); the count matrix does not. Training
    minibatches come from :meth:`iter_epoch`, inference minibatches from
    :meth:`iter_minibatches` (streamed in blocks when the indices are sorted).
    """

    def __init__(
        self, adata: AnnData, registry: Registry, block_size: int = BLOCK_SIZE, buffer_blocks: int = BUFFER_BLOCKS
    ):
        self.block_size, self.buffer_blocks = int(block_size), int(buffer_blocks)
        super().__init__(adata, registry)

    def _read_counts(self, adata: AnnData, registry: Registry):
        counts = get_counts(adata, registry.layer)
        if isinstance(counts, CSCDataset):
            raise ValueError(
                "The on-disk counts are CSC (cells stored by gene): reading blocks of cells from them "
                "reads the whole file. Rewrite the file as CSR (adata.X = adata.X.tocsr()) or load it into memory."
            )
        if counts.shape[0] and counts.shape != (adata.n_obs, adata.n_vars):
            raise ValueError(f"counts have shape {counts.shape}, expected {(adata.n_obs, adata.n_vars)}.")
        return counts

    # -- reading ---------------------------------------------------------------------------
    @property
    def _sparse(self) -> bool:
        return isinstance(self.X, CSRDataset)

    def read_rows(self, start: int, stop: int) -> sp.csr_matrix | np.ndarray:
        """Cells ``start:stop`` in one contiguous read: float32 CSR ``(cells, genes)`` (dense if stored dense)."""
        rows = self.X[start:stop]
        if sp.issparse(rows):
            rows = sp.csr_matrix(rows, dtype=np.float32)
            if not rows.has_canonical_format:
                rows.sum_duplicates()
            return rows
        return np.ascontiguousarray(rows, dtype=np.float32)

    def _read_sorted(self, idx: np.ndarray) -> sp.csr_matrix | np.ndarray:
        """Arbitrary cells: read the covering range or the sorted cells, then put them in ``idx`` order."""
        idx = np.asarray(idx, dtype=np.int64)
        if len(idx) == 0:
            return self.read_rows(0, 0)
        lo, hi = int(idx.min()), int(idx.max()) + 1
        if hi - lo <= 4 * len(idx):  # dense enough: one contiguous read
            return self.read_rows(lo, hi)[idx - lo]
        order = np.argsort(idx, kind="stable")
        rows = self.X[idx[order]]
        rows = sp.csr_matrix(rows, dtype=np.float32) if sp.issparse(rows) else np.asarray(rows, dtype=np.float32)
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        return rows[inverse]

    def blocks(self, block_size: int | None = None) -> Iterator[tuple[int, int]]:
        """``(start, stop)`` of consecutive blocks covering all cells."""
        block_size = block_size or self.block_size
        for start in range(0, self.n_obs, block_size):
            yield start, min(start + block_size, self.n_obs)

    # -- CellData interface, out of core -----------------------------------------------------
    def library_sizes(self) -> np.ndarray:
        """Total counts per cell ``(cells,)``, summed block by block."""
        sizes = np.zeros(self.n_obs, dtype=np.float64)
        for start, stop in self.blocks():
            sizes[start:stop] = np.asarray(self.read_rows(start, stop).sum(axis=1)).ravel()
        return sizes

    def dense_rows(self, idx: np.ndarray) -> np.ndarray:
        """Counts of cells ``idx`` as a dense ``(cells, genes)`` array, read from disk in sorted order."""
        rows = self._read_sorted(idx)
        return rows.toarray() if sp.issparse(rows) else rows

    def rows_tensor(self, idx: np.ndarray, device: torch.device | str = "cpu", sparse: bool = False) -> torch.Tensor:
        """Counts of cells ``idx`` on ``device``, dense or (``sparse``) CSR; see :meth:`CellData.rows_tensor`."""
        rows = self._read_sorted(idx)
        if sparse and sp.issparse(rows):
            return scipy_to_torch_csr(rows, device)
        return torch.from_numpy(rows.toarray() if sp.issparse(rows) else rows).to(device)

    def _minibatch_from_rows(self, rows, cells: np.ndarray, plate_idx: np.ndarray, device, sparse: bool) -> Minibatch:
        """A minibatch from rows already read (``rows[i]`` is cell ``cells[i]``)."""
        take = lambda a, dtype=None: (  # noqa: E731
            None if a is None else torch.from_numpy(np.ascontiguousarray(a[cells], dtype=dtype)).to(device)
        )
        if sp.issparse(rows):
            x = scipy_to_torch_csr(rows, device) if sparse else torch.from_numpy(rows.toarray()).to(device)
        else:
            x = torch.from_numpy(np.ascontiguousarray(rows)).to(device)
        return Minibatch(  # codes are stored compact (data.code_dtype); the model takes int64
            x=x,
            batch=take(self.batch, np.int64),
            labels=take(self.labels, np.int64),
            cat_covs=take(self.cat_covs, np.int64),
            cont_covs=take(self.cont_covs),
            idx=torch.from_numpy(np.asarray(plate_idx, dtype=np.int64)).to(device),
        )

    def iter_minibatches(
        self, indices: np.ndarray, batch_size: int, device: torch.device | str = "cpu", sparse: bool = False
    ) -> Iterator[Minibatch]:
        """Minibatches over ``indices`` in order; sorted indices are streamed block by block."""
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) > 1 and np.any(indices[1:] <= indices[:-1]):  # compared in place: no (cells,) diff
            yield from super().iter_minibatches(indices, batch_size, device, sparse)
            return
        # Read each block once; a minibatch may span two blocks.
        pending_rows, pending_cells = [], []
        n_pending = 0
        for start, stop in self.blocks(max(self.block_size, batch_size)):
            lo, hi = np.searchsorted(indices, [start, stop])
            if lo == hi:
                continue
            cells = indices[lo:hi]
            # only the rows from the block's first to its last wanted cell: a DDP rank's share of
            # the validation cells then reads no row of the neighbouring share
            first = int(cells[0])
            block = self.read_rows(first, int(cells[-1]) + 1)
            pending_rows.append(block[cells - first])
            pending_cells.append(cells)
            n_pending += len(cells)
            while n_pending >= batch_size or (hi == len(indices) and n_pending):
                rows, cells = _stack(pending_rows), np.concatenate(pending_cells)
                take = min(batch_size, n_pending)
                yield self._minibatch_from_rows(rows[:take], cells[:take], np.arange(take), device, sparse)
                pending_rows, pending_cells = [rows[take:]], [cells[take:]]
                n_pending -= take
            if hi == len(indices):
                return

    def iter_epoch(
        self,
        train_idx: np.ndarray,
        batch_size: int,
        generator: torch.Generator,
        device: torch.device | str = "cpu",
        ddp=None,
    ) -> Iterator[Minibatch]:
        """One training epoch: blocks in random order, cells shuffled within a buffer of blocks.

        Each cell of ``train_idx`` is visited once; the plate index of a cell is its position in
        ``train_idx``. A final minibatch of one cell is dropped (batch norm needs two). Under
        DDP (``ddp`` a ``DistributedContext``) each rank reads only its share of the epoch's
        blocks (see ``_rank_share``) and all ranks get the same number of cells, hence of steps.
        """
        train_idx = np.asarray(train_idx)
        # (cells,) position in train_idx or -1; int32 where it fits, as it lives for the whole epoch
        position = np.full(self.n_obs, -1, dtype=index_dtype(len(train_idx)))
        position[train_idx] = np.arange(len(train_idx), dtype=position.dtype)
        blocks = list(self.blocks())
        order = torch.randperm(len(blocks), generator=generator).numpy()
        # Cells are shuffled by a generator of their own: under DDP the ranks' buffers differ in
        # number and size, and the shared one must advance alike on every rank, or the next
        # epoch's block orders differ and ranks read (and train on) the same blocks.
        shuffler = torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
        if ddp is None:
            plan = [(blocks[b], 0, None) for b in order]
        else:
            plan = _rank_share([blocks[b] for b in order], position, ddp.rank, ddp.world_size)
        carry_rows, carry_cells = None, np.zeros(0, dtype=np.int64)
        for first in range(0, len(plan), self.buffer_blocks):
            chosen = plan[first : first + self.buffer_blocks]
            rows, cells = self._fill_buffer(chosen, position, carry_rows, carry_cells)
            carry_rows = None  # its cells are in rows now
            if len(cells) == 0:
                continue
            # The buffer stays in read order and each minibatch gathers its rows through the
            # permutation: a shuffled copy of the whole buffer would double its memory.
            shuffle = torch.randperm(len(cells), generator=shuffler).numpy()
            cells = cells[shuffle]
            last_buffer = first + self.buffer_blocks >= len(plan)
            n_full = len(cells) if last_buffer else (len(cells) // batch_size) * batch_size
            for start in range(0, n_full, batch_size):
                stop = min(start + batch_size, n_full)
                if stop - start > 1:
                    yield self._minibatch_from_rows(
                        rows[shuffle[start:stop]], cells[start:stop], position[cells[start:stop]], device, True
                    )
            carry_rows, carry_cells = rows[shuffle[n_full:]], cells[n_full:]
            del rows  # freed before the next buffer is read, not after

    def _fill_buffer(
        self,
        chosen: list[tuple[tuple[int, int], int, int | None]],
        position: np.ndarray,
        carry_rows: sp.csr_matrix | np.ndarray | None,
        carry_cells: np.ndarray,
    ) -> tuple[sp.csr_matrix | np.ndarray, np.ndarray]:
        """The training cells of the blocks ``chosen``, after the carried ones.

        ``chosen`` holds ``((start, stop), first, last)``: of a block's training cells (in read
        order) the slice ``first:last`` is taken. Returns the rows (carried cells first, then the
        blocks' cells in read order) and their cell indices ``(cells,)``. The per-block reads are
        freed on return, so only the joined buffer outlives this call.
        """
        parts, cells = [], []
        for (start, stop), first, last in chosen:
            local = np.flatnonzero(position[start:stop] >= 0)[first:last]
            if len(local):
                parts.append(self.read_rows(start, stop)[local])
                cells.append(start + local)
        if not parts:
            return _stack([carry_rows]), carry_cells
        return _stack([carry_rows, *parts]), np.concatenate([carry_cells, *cells])


def _rank_share(
    blocks: list[tuple[int, int]], position: np.ndarray, rank: int, world_size: int
) -> list[tuple[tuple[int, int], int, int]]:
    """One DDP rank's share of an epoch's blocks (``blocks`` in the epoch's shuffled order).

    The epoch's training cells, taken block after block, are cut into ``world_size`` equal
    contiguous runs and rank ``r`` trains on run ``r``; the remainder (fewer than ``world_size``
    cells) is left out, as in ``DistributedContext.shard``. So every rank trains on the same
    number of cells and takes the same number of steps, while reading only its own blocks: about
    ``1 / world_size`` of the file, plus at most two blocks shared with its neighbours.
    Returns ``((start, stop), first, last)`` per block: its training cells ``first:last``.
    """
    counts = np.array([np.count_nonzero(position[start:stop] >= 0) for start, stop in blocks], dtype=np.int64)
    ends = np.cumsum(counts)
    begins = ends - counts
    quota = int(ends[-1]) // world_size if len(ends) else 0
    lo, hi = rank * quota, (rank + 1) * quota
    return [
        (block, int(max(lo - begin, 0)), int(min(hi, end) - begin))
        for block, begin, end in zip(blocks, begins, ends)
        if begin < hi and end > lo
    ]


def _stack(parts: list) -> sp.csr_matrix | np.ndarray:
    parts = [p for p in parts if p is not None and p.shape[0]]
    if not parts:
        return sp.csr_matrix((0, 0), dtype=np.float32)
    if len(parts) == 1:
        return parts[0]
    return sp.vstack(parts, format="csr") if sp.issparse(parts[0]) else np.concatenate(parts)


def cell_data(adata: AnnData, registry: Registry) -> CellData:
    """The cells of ``adata``.

    In memory, or streamed from disk when the counts are on disk (``anndata.read_h5ad(path, backed='r')`` or a ``.zarr``
    store, see ``data_backed``).
    """
    if minify_type(adata) is not None:  # the latent posterior stored, the counts dropped
        return MinifiedCellData(adata, registry)
    if is_on_disk(get_counts(adata, registry.layer)):
        return BackedCellData(adata, registry)
    return CellData(adata, registry)

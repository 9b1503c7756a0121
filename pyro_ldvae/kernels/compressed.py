"""Arrays built cell block by cell block in the GCXS layout (compressed rows), never dense in full.

``sparse.GCXS.from_numpy`` of a ``(cells, genes[, samples])`` array compresses its shortest axis:
the array, with that axis first and the others flattened in order, is stored as CSR
``(data, indices, indptr)``. :class:`CompressedBlocks` builds the same three arrays from blocks of
consecutive cells, so a posterior predictive sample is never held dense (scvi-tools builds it
dense, then converts it with ``np.nonzero`` over every entry).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch


class CompressedBlocks:
    """GCXS arrays of an array of shape ``shape`` (cells first), fed blocks of consecutive cells.

    ``add`` takes blocks in cell order; ``arrays`` returns ``(data, indices, indptr)`` and the
    compressed axis, equal to those of ``sparse.GCXS.from_numpy`` of the whole array.
    """

    def __init__(self, shape: tuple[int, ...]):
        self.shape = tuple(int(s) for s in shape)
        self.axis = int(np.argmin(self.shape))  # sparse's default: the best compression ratio
        self.rest = int(np.prod([s for i, s in enumerate(self.shape) if i not in (0, self.axis)]))
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # per block: crow, col, values
        self.cells_seen = 0

    def add(self, block: torch.Tensor) -> None:
        """Append the next ``block`` of cells, ``(block_cells, *shape[1:])``."""
        if tuple(block.shape[1:]) != self.shape[1:]:
            raise ValueError(f"block shape {tuple(block.shape)} does not match the array's {self.shape}.")
        n = block.shape[0]
        if self.axis != 0:  # the compressed axis first; the cells lead the flattened columns
            block = block.movedim(self.axis, 0)
        rows = block.reshape(block.shape[0], -1).contiguous()
        with warnings.catch_warnings():  # torch's "sparse CSR support is in beta" notice
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            csr = rows.to_sparse_csr()
        cols = csr.col_indices().numpy()
        if self.axis != 0:  # block-local column (cell, rest) -> the whole array's column
            cols += self.cells_seen * self.rest  # in place: the view owns its copy of the indices
        self.parts.append((csr.crow_indices().numpy(), cols, csr.values().numpy()))
        self.cells_seen += n

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """``(data, indices, indptr, compressed_axis)`` of the whole array."""
        if self.cells_seen != self.shape[0]:
            raise ValueError(f"{self.cells_seen} cells were added to an array of {self.shape[0]}.")
        parts, self.parts = self.parts, []  # the arrays below replace the blocks
        if not parts:
            return np.zeros(0, np.float32), np.zeros(0, np.int64), np.zeros(self.shape[self.axis] + 1, np.int64), 0
        if self.axis == 0:  # rows are cells: the blocks follow one another
            data = np.concatenate([values for _, _, values in parts])
            offsets = np.cumsum([0] + [len(values) for _, _, values in parts[:-1]])
            indptr = np.concatenate([[0]] + [crow[1:] + offset for (crow, _, _), offset in zip(parts, offsets)])
            return data, np.concatenate([cols for _, cols, _ in parts]), indptr, 0
        counts = np.stack([np.diff(crow) for crow, _, _ in parts])  # (blocks, rows)
        indptr = np.zeros(counts.shape[1] + 1, np.int64)
        np.cumsum(counts.sum(0), out=indptr[1:])
        starts = indptr[:-1] + np.cumsum(counts, axis=0) - counts  # where each block's row begins
        indices = np.empty(indptr[-1], np.int64)
        data = np.empty(indptr[-1], parts[0][2].dtype)
        for (crow, cols, values), start in zip(parts, starts):  # one slice per block and row
            for lo, hi, at in zip(crow[:-1].tolist(), crow[1:].tolist(), start.tolist()):
                indices[at : at + hi - lo], data[at : at + hi - lo] = cols[lo:hi], values[lo:hi]
        return data, indices, indptr, self.axis

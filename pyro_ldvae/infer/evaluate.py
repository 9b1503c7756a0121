"""The per-cell ELBO of held-out cells, in eval mode."""

from __future__ import annotations

import numpy as np
import pyro
import torch

from ..data.cells import CellData
from ..models.ldvae import LDVAE


@torch.no_grad()
def evaluate_elbo(module: LDVAE, data: CellData, indices: np.ndarray, batch_size: int = 1024) -> torch.Tensor:
    """Per-cell ELBO ``(cells,)`` in eval mode (running batch-norm statistics, no dropout)."""
    was_training = module.training
    module.eval()
    indices = np.asarray(indices)
    order = np.argsort(indices, kind="stable")  # cells in file order: sequential reads for on-disk data
    try:
        minibatches = data.iter_minibatches(indices[order], batch_size, module.device, sparse=True)
        with pyro.validation_enabled(False):  # the values are finite unless training diverged
            parts = [module.elbo(mb)[1] for mb in minibatches]
    finally:
        module.train(was_training)
    if not parts:
        return torch.zeros(0)
    per_cell = torch.empty(len(indices), device=parts[0].device)
    per_cell[torch.from_numpy(order).to(per_cell.device)] = torch.cat(parts)
    return per_cell

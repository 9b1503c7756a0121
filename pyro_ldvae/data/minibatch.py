"""The minibatch: the tensors of a set of cells that the model and guide take."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass
class Minibatch:
    """The tensors of one minibatch of cells; what ``model`` and ``guide`` take.

    x: counts ``(cells, genes)`` (None when simulating); batch, labels: ``(cells,)`` int64 codes;
    cat_covs: ``(cells, n_cat_covs)`` int64 codes; cont_covs: ``(cells, n_cont)`` float;
    idx: ``(cells,)`` positions of these cells in the dataset the ``cells`` plate ranges over.
    """

    x: torch.Tensor | None
    batch: torch.Tensor
    labels: torch.Tensor
    cat_covs: torch.Tensor | None = None
    cont_covs: torch.Tensor | None = None
    idx: torch.Tensor | None = None

    @property
    def n_cells(self) -> int:
        """Number of cells in the minibatch."""
        return self.batch.shape[0]

    def with_batch(self, batch_code: int) -> Minibatch:
        """The same cells, decoded as if they came from batch ``batch_code`` (batch correction)."""
        return replace(self, batch=torch.full_like(self.batch, batch_code))

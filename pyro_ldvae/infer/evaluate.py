"""The per-cell ELBO of held-out cells and its parts (reconstruction, local KL), in eval mode."""

from __future__ import annotations

import numpy as np
import pyro
import torch

from ..data.cells import CellData
from ..models.ldvae import LDVAE
from ..models.trace import replayed_traces, site_terms

# The validation figures the loop records, under scvi-tools' history keys (lower is better for all).
VALIDATION_FIGURES = ("elbo_validation", "reconstruction_loss_validation", "kl_local_validation")


def _in_eval_mode(module: LDVAE, data: CellData, indices: np.ndarray, batch_size: int, fn) -> tuple:
    """``fn(minibatch)`` over minibatches of ``indices`` in eval mode: ``(order, parts)``.

    Cells go in file order (sequential reads for on-disk data); eval mode uses the running
    batch-norm statistics and no dropout.
    """
    was_training = module.training
    module.eval()
    order = np.argsort(indices, kind="stable")
    try:
        minibatches = data.iter_minibatches(indices[order], batch_size, module.device, sparse=True)
        with pyro.validation_enabled(False):  # the values are finite unless training diverged
            parts = [fn(mb) for mb in minibatches]
    finally:
        module.train(was_training)
    return order, parts


def _unsort(order: np.ndarray, parts: list[torch.Tensor], n: int) -> torch.Tensor:
    if not parts:
        return torch.zeros(0)
    out = torch.empty((n, *parts[0].shape[1:]), device=parts[0].device)
    out[torch.from_numpy(order).to(out.device)] = torch.cat(parts)
    return out


@torch.no_grad()
def evaluate_elbo(module: LDVAE, data: CellData, indices: np.ndarray, batch_size: int = 1024) -> torch.Tensor:
    """Per-cell ELBO ``(cells,)`` in eval mode (running batch-norm statistics, no dropout)."""
    indices = np.asarray(indices)
    order, parts = _in_eval_mode(module, data, indices, batch_size, lambda mb: module.elbo(mb)[1])
    return _unsort(order, parts, len(indices))


def _local_terms(module: LDVAE, mb) -> torch.Tensor:
    """The ELBO's local parts per cell, ``(cells, 3)``: ``-log p(x | z, l)``, the KL of z, the KL of the rest (l).

    The KL of z is the part the KL warm-up weighs, as in scvi-tools' loss.
    """
    guide_trace, model_trace = replayed_traces(module.model, module.guide, (mb, None, 1.0))
    parts = [0.0, 0.0, 0.0]
    for site, term in site_terms(model_trace, guide_trace, analytic_kl=True):
        if not any(frame.name == "cells" for frame in site["cond_indep_stack"]):
            continue  # a global site (a prior on the loadings) has no per-cell part
        slot = 0 if site["is_observed"] else 1 if site["name"] == "z" else 2
        parts[slot] = parts[slot] - term
    like = next(p for p in parts if torch.is_tensor(p))
    return torch.stack([like.new_zeros(mb.n_cells) + p for p in parts], dim=-1)


@torch.no_grad()
def evaluate_terms(module: LDVAE, data: CellData, indices: np.ndarray, batch_size: int = 1024) -> torch.Tensor:
    """Per-cell reconstruction loss, KL of z and KL of l, ``(cells, 3)``, in eval mode; the ELBO is minus their sum."""
    indices = np.asarray(indices)
    order, parts = _in_eval_mode(module, data, indices, batch_size, lambda mb: _local_terms(module, mb))
    return _unsort(order, parts, len(indices)).reshape(len(indices), 3)


def validation_sums(module: LDVAE, data: CellData, indices: np.ndarray) -> torch.Tensor:
    """Sums over ``indices`` of the columns of :func:`evaluate_terms`, and the count: ``(4,)``, on the module's device.

    Sums rather than means so that data-parallel ranks can add their shares.
    """
    terms = evaluate_terms(module, data, indices).to(module.device)
    count = torch.tensor([float(len(terms))], device=terms.device, dtype=terms.dtype)
    return torch.cat([terms.sum(0), count])


def validation_figures(sums: torch.Tensor, kl_weight: float = 1.0) -> dict[str, float]:
    """Mean per-cell validation figures from :func:`validation_sums` (summed over ranks), by history key.

    ``VALIDATION_FIGURES`` (unweighted), and ``validation_loss``: scvi-tools' loss, the
    reconstruction plus ``kl_weight`` times the KL of z plus the KL of l.
    """
    reconstruction, kl_z, kl_rest, count = (sums.double().cpu() / max(float(sums[-1]), 1.0)).tolist()
    figures = dict(zip(VALIDATION_FIGURES, (reconstruction + kl_z + kl_rest, reconstruction, kl_z + kl_rest)))
    figures["validation_loss"] = reconstruction + kl_weight * kl_z + kl_rest
    return figures

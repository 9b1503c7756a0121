"""The posterior of the factors per cell, from the guide's encoder."""

from __future__ import annotations

import numpy as np
import torch

from ..data.cells import CellData
from ..models.ldvae import LDVAE


@torch.no_grad()
def latent_representation(
    module: LDVAE,
    cells: CellData,
    indices: np.ndarray,
    give_mean: bool = True,
    mc_samples: int = 5000,
    batch_size: int = 128,
    return_dist: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Posterior of the factors of the cells ``indices``, ``(cells, n_latent)``.

    Parameters
    ----------
    module
        The model; put in eval mode.
    cells, indices
        The registered cells and the positions of those to encode.
    give_mean
        The posterior mean (for 'ln', the Monte Carlo mean of softmax(z) over ``mc_samples``
        draws); otherwise one draw.
    batch_size
        Cells per forward pass.
    return_dist
        Return the Normal's ``(loc, variance)`` instead, each ``(cells, n_latent)``.
    """
    module = module.eval()
    # Each minibatch is written into the (cells, n_latent) result as it comes: lists of
    # minibatches joined at the end would hold every cell's result twice.
    shape = (len(indices), module.n_latent)
    dtype = torch.empty(0, dtype=next(module.parameters()).dtype).numpy().dtype
    locs, variances = (np.empty(shape, dtype), np.empty(shape, dtype)) if return_dist else (None, None)
    outs = None if return_dist else np.empty(shape, dtype)
    start = 0
    for mb in cells.iter_minibatches(indices, batch_size, module.device, sparse=True):
        q = module.encode(mb)
        stop = start + len(q["z_loc"])
        if return_dist:
            locs[start:stop], variances[start:stop] = q["z_loc"].cpu().numpy(), q["z_var"].cpu().numpy()
            start = stop
            continue
        normal = torch.distributions.Normal(q["z_loc"], q["z_var"].sqrt())
        if give_mean and module.latent_distribution == "ln":
            z = module.z_transform(normal.sample((mc_samples,))).mean(0)
        elif give_mean:
            z = q["z_loc"]
        else:
            z = module.z_transform(normal.sample())
        outs[start:stop] = z.cpu().numpy()
        start = stop
    if return_dist:
        return locs, variances
    return outs

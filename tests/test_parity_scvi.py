"""Parity with scvi-tools: identical weights give the same per-cell ELBO and loadings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pyro_ldvae.api.scvi_import import module_from_scvi
from pyro_ldvae.data.minibatch import Minibatch
from pyro_ldvae.models.ldvae import LDVAE

scvi = pytest.importorskip("scvi")


def _counts(n_cells: int, n_genes: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rate = torch.distributions.Gamma(0.5, 0.5).sample((n_cells, n_genes)) * 2
    x = torch.poisson(rate, generator=g)
    x[:, 0] += 1
    return x


@pytest.mark.parametrize("gene_likelihood", ["nb", "zinb"])
@pytest.mark.parametrize("n_batch", [1, 3])
@pytest.mark.parametrize("use_observed_lib_size", [False, True])
@pytest.mark.parametrize("dispersion", ["gene", "gene-batch"])
def test_elbo_and_loadings_match_scvi(gene_likelihood, n_batch, use_observed_lib_size, dispersion):
    from scvi import REGISTRY_KEYS
    from scvi.module import LDVAE as ScviLDVAE

    n_cells, n_genes = 64, 40
    x = _counts(n_cells, n_genes)
    batch = torch.arange(n_cells) % n_batch
    log_lib = x.sum(1).log()
    means = np.array([[log_lib[batch == b].mean().item() for b in range(n_batch)]])
    variances = np.array([[log_lib[batch == b].var(unbiased=False).item() for b in range(n_batch)]])
    kwargs = dict(
        n_batch=n_batch,
        n_latent=5,
        dispersion=dispersion,
        gene_likelihood=gene_likelihood,
        use_observed_lib_size=use_observed_lib_size,
        library_log_means=None if use_observed_lib_size else means,
        library_log_vars=None if use_observed_lib_size else variances,
    )
    torch.manual_seed(0)
    reference = ScviLDVAE(n_genes, **kwargs)
    # Put the batch norms away from their initial state so that running statistics matter.
    with torch.no_grad():
        for bn in [m for m in reference.modules() if isinstance(m, torch.nn.BatchNorm1d)]:
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
        reference.px_r.normal_()
    ours = module_from_scvi(reference)  # the migration path copies every weight, buffer and theta
    reference.eval()
    ours.eval()

    tensors = {
        REGISTRY_KEYS.X_KEY: x,
        REGISTRY_KEYS.BATCH_KEY: batch[:, None],
        REGISTRY_KEYS.LABELS_KEY: torch.zeros(n_cells, 1, dtype=torch.long),
    }
    # Same seed, same draw order (eps for z, then for l): both sample identical z and l.
    torch.manual_seed(123)
    _, _, losses = reference(tensors)
    scvi_neg_elbo = sum(losses.reconstruction_loss.values()) + sum(losses.kl_local.values())
    torch.manual_seed(123)
    mb = Minibatch(x=x, batch=batch, labels=torch.zeros(n_cells, dtype=torch.long))
    _, per_cell = ours.elbo(mb)
    torch.testing.assert_close(-per_cell, scvi_neg_elbo.detach(), rtol=1e-4, atol=0)
    np.testing.assert_allclose(ours.get_loadings(), reference.get_loadings(), rtol=1e-6, atol=1e-7)
    assert ours.get_loadings().shape == (n_genes, 5)


def test_scvi_gene_cell_dispersion_fails_where_ours_trains():
    """scvi-tools' LDVAE raises TypeError for 'gene-cell'; ours computes a finite ELBO."""
    from scvi import REGISTRY_KEYS
    from scvi.module import LDVAE as ScviLDVAE

    x = _counts(16, 20)
    reference = ScviLDVAE(20, dispersion="gene-cell", use_observed_lib_size=True)
    tensors = {
        REGISTRY_KEYS.X_KEY: x,
        REGISTRY_KEYS.BATCH_KEY: torch.zeros(16, 1, dtype=torch.long),
        REGISTRY_KEYS.LABELS_KEY: torch.zeros(16, 1, dtype=torch.long),
    }
    with pytest.raises(TypeError):
        reference(tensors)
    ours = LDVAE(20, dispersion="gene-cell", use_observed_lib_size=True)
    _, per_cell = ours.elbo(
        Minibatch(x=x, batch=torch.zeros(16, dtype=torch.long), labels=torch.zeros(16, dtype=torch.long))
    )
    assert torch.isfinite(per_cell).all()

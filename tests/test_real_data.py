"""Real data from ../shared/data: training improves the held-out ELBO and matches scvi-tools'."""

from __future__ import annotations

import anndata
import numpy as np
import pytest

from pyro_ldvae import LinearSCVI

from .conftest import shared_dataset

pytestmark = pytest.mark.shared_data


@pytest.mark.parametrize("batch_key", [None, "sample_id"])
def test_held_out_elbo_improves_and_matches_scvi_tools(batch_key):
    scvi = pytest.importorskip("scvi")
    adata = anndata.read_h5ad(shared_dataset("pbmc_kang_stim_1556.h5ad"))
    epochs, seed = 40, 0

    LinearSCVI.setup_anndata(adata, batch_key=batch_key)
    ours = LinearSCVI(adata, n_latent=10, seed=seed)
    ours.train(max_epochs=1, progress_bar=False)
    after_one = ours.get_elbo(indices=ours.validation_indices)
    ours.train(max_epochs=epochs - 1, progress_bar=False)
    held_out = ours.validation_indices
    ours_elbo = ours.get_elbo(indices=held_out)
    assert ours_elbo > after_one + 50, (after_one, ours_elbo)
    assert ours.history["elbo_validation"].iloc[-1].item() < ours.history["elbo_validation"].iloc[0].item()

    scvi.settings.seed = seed
    reference_adata = adata.copy()
    scvi.model.LinearSCVI.setup_anndata(reference_adata, batch_key=batch_key)
    reference = scvi.model.LinearSCVI(reference_adata, n_latent=10)
    reference.train(max_epochs=epochs, batch_size=128, enable_progress_bar=False, accelerator="cpu")
    # scvi-tools drew the same split from the same seed
    np.testing.assert_array_equal(np.sort(reference.validation_indices), np.sort(held_out))
    reference_elbo = reference.get_elbo(indices=held_out)
    relative = abs(ours_elbo - reference_elbo) / abs(reference_elbo)
    assert relative < 0.01, (ours_elbo, reference_elbo, relative)

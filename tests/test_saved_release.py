"""A model saved by release 0.1.0 (``tests/data/saved_v0_*``) loads and gives the outputs it gave then.

The directories and ``expected_outputs.json`` were written by ``LinearSCVI.save`` of that release
(120 simulated cells x 40 genes, 2 batches, 3 factors, 3 epochs); the outputs were computed
by that release right after training.
"""

import json
from pathlib import Path

import anndata
import numpy as np
import pytest
import torch

from pyro_ldvae import LinearSCVI

DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize("name", ["default", "horseshoe"])
def test_a_model_saved_by_release_0_1_loads_with_identical_outputs(name):
    adata = anndata.read_h5ad(DATA / "saved_v0_adata.h5ad")
    expected = json.loads((DATA / f"saved_v0_{name}" / "expected_outputs.json").read_text())
    model = LinearSCVI.load(DATA / f"saved_v0_{name}", adata=adata)
    np.testing.assert_allclose(model.get_latent_representation(), expected["latent"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(model.get_loadings().values, expected["loadings"], rtol=1e-6, atol=1e-6)
    torch.manual_seed(0)  # the ELBO draws z and l from the guide
    assert model.get_elbo() == pytest.approx(expected["elbo"], rel=1e-6)

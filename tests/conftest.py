"""Shared fixtures: small simulated data, and the real datasets in ../shared/data when present."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# Two CPU cores on CI: avoid oversubscription when torch and BLAS both spawn threads.
torch.set_num_threads(min(2, torch.get_num_threads()))


def shared_dataset(name: str) -> Path:
    """Path of a dataset in ../shared/data; skips the test when it is not there."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} not available (../shared/data is absent)")
    return path


@pytest.fixture(scope="session")
def small_adata():
    import pyro_ldvae

    return pyro_ldvae.simulate(n_cells=300, n_genes=60, n_latent=3, n_batch=2, seed=3)

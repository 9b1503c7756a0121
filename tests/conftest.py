"""Shared fixtures: small simulated data, and the real datasets in ../shared/data when present."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# Two CPU cores on CI: avoid oversubscription when torch and BLAS both spawn threads.
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session", autouse=True)
def cpu_unless_asked():
    """accelerator='auto' means the CPU in tests, also on a machine with a GPU.

    The tests' expectations (bit-identical resumption, faults injected at a given step, exact
    equality after save/load) are CPU facts; the GPU tests (tests/test_cuda_graph.py) ask for
    the GPU by name. Session-scoped, so that module-scoped fixtures train on the CPU too.
    """
    from pyro_ldvae.api import linear_scvi as model

    resolve_device = model.resolve_device
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            model,
            "resolve_device",
            lambda accelerator="auto", device="auto": resolve_device(
                "cpu" if accelerator == "auto" else accelerator, device
            ),
        )
        yield


@pytest.fixture(scope="session", autouse=True)
def write_string_arrays():
    """Let fixtures' ``write_h5ad`` write pandas string arrays (pandas 3's names; see ``io.write_h5ad``)."""
    from pyro_ldvae.api.io import string_arrays_writable

    with string_arrays_writable():
        yield


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

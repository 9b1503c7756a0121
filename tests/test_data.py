"""Minibatch sources: in-memory CSR, device-resident, on-disk (.h5ad backed, .zarr) agree."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch

from pyro_ldvae import LinearSCVI, simulate
from pyro_ldvae.data import CellData, DeviceCells, cell_data, get_registry
from pyro_ldvae.data_backed import BackedCellData, read_backed
from pyro_ldvae.module import Minibatch
from pyro_ldvae.train import minibatch_source


@pytest.fixture(scope="module")
def adata():
    adata = simulate(n_cells=700, n_genes=80, n_batch=2, seed=3)
    LinearSCVI.setup_anndata(adata, batch_key="batch")
    return adata


@pytest.fixture(scope="module")
def files(adata, tmp_path_factory):
    folder = tmp_path_factory.mktemp("backed")
    adata.write_h5ad(folder / "cells.h5ad")
    adata.write_zarr(folder / "cells.zarr")
    return {"h5ad": folder / "cells.h5ad", "zarr": folder / "cells.zarr"}


def assert_same(a: Minibatch, b: Minibatch) -> None:
    dense = lambda x: x.to_dense() if x.layout == torch.sparse_csr else x  # noqa: E731
    assert torch.equal(dense(a.x), dense(b.x))
    assert torch.equal(a.batch, b.batch) and torch.equal(a.labels, b.labels)
    assert torch.equal(a.idx, b.idx)


def test_sparse_dense_and_device_resident_minibatches_agree(adata):
    cells = CellData(adata, get_registry(adata))
    resident = DeviceCells(cells, "cpu")
    idx = np.array([5, 3, 699, 0, 42, 42, 17])
    dense, sparse = cells.minibatch(idx), cells.minibatch(idx, sparse=True)
    on_device = resident.minibatch(torch.as_tensor(idx), plate_idx=torch.arange(len(idx)))
    assert sparse.x.layout == torch.sparse_csr and on_device.x.layout == torch.sparse_csr
    assert dense.x.layout == torch.strided
    assert_same(dense, sparse)
    assert_same(dense, on_device)
    assert torch.equal(sparse.x.crow_indices(), on_device.x.crow_indices())


@pytest.mark.parametrize("kind", ["h5ad", "zarr"])
def test_backed_cells_match_in_memory(adata, files, kind):
    backed = read_backed(files[kind])
    cells, on_disk = CellData(adata, get_registry(adata)), cell_data(backed, get_registry(backed))
    assert isinstance(on_disk, BackedCellData)
    for a, b in zip(cells.library_prior(), on_disk.library_prior()):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    on_disk.block_size = 64
    idx = np.arange(3, 690, 2)  # sorted: streamed block by block, minibatches span blocks
    streamed = list(on_disk.iter_minibatches(idx, 100, sparse=True))
    in_memory = list(cells.iter_minibatches(idx, 100))
    assert [mb.n_cells for mb in streamed] == [mb.n_cells for mb in in_memory]
    for a, b in zip(in_memory, streamed):
        assert_same(a, b)
    scattered = np.random.default_rng(0).permutation(700)[:150]  # unsorted: read sorted, reordered
    assert_same(cells.minibatch(scattered), on_disk.minibatch(scattered))


def test_backed_epoch_visits_every_training_cell_once_in_shuffled_blocks(adata, files):
    on_disk = cell_data(read_backed(files["h5ad"]), get_registry(adata))
    cells = CellData(adata, get_registry(adata))
    on_disk.block_size, on_disk.buffer_blocks = 50, 3
    train_idx = np.sort(np.random.default_rng(1).permutation(700)[:600])
    seen = []
    for mb in on_disk.iter_epoch(train_idx, 64, torch.Generator().manual_seed(0)):
        positions = mb.idx.numpy()
        assert_same(cells.minibatch(train_idx[positions], plate_idx=positions), mb)
        seen.append(positions)
    seen = np.concatenate(seen)
    assert np.array_equal(np.sort(seen), np.arange(600))
    assert not np.array_equal(seen, np.arange(600))  # shuffled
    second = np.concatenate(
        [mb.idx.numpy() for mb in on_disk.iter_epoch(train_idx, 64, torch.Generator().manual_seed(1))]
    )
    assert not np.array_equal(seen, second)


def test_device_resident_training_equals_cut_per_step(adata):
    """Same permutation, same minibatches: the two CPU paths train to identical weights."""
    cells = CellData(adata, get_registry(adata))
    train_idx = np.arange(600)
    per_step = list(
        minibatch_source(cells, train_idx, 128, "cpu", data_on_device=False)(torch.Generator().manual_seed(0))
    )
    resident = list(
        minibatch_source(cells, train_idx, 128, "cpu", data_on_device=True)(torch.Generator().manual_seed(0))
    )
    assert len(per_step) == len(resident) == 5
    for a, b in zip(per_step, resident):
        assert_same(a, b)
    states = []
    for flag in (False, True):
        model = LinearSCVI(adata, seed=0)
        from pyro_ldvae.train import train_svi

        train_svi(
            model.module, cells, train_idx, np.arange(600, 700), max_epochs=2, progress_bar=False, data_on_device=flag
        )
        states.append(model.module.state_dict())
    for name in states[0]:
        assert torch.equal(states[0][name], states[1][name]), name


def test_linear_scvi_trains_on_backed_h5ad(adata, files):
    backed = read_backed(files["h5ad"])
    assert backed.isbacked
    LinearSCVI.setup_anndata(backed, batch_key="batch")
    model = LinearSCVI(backed, seed=0)
    model.train(max_epochs=2, progress_bar=False)
    assert np.isfinite(model.history["elbo_validation"].to_numpy()).all()
    z_disk = model.get_latent_representation()
    z_memory = model.get_latent_representation(adata)
    np.testing.assert_allclose(z_disk, z_memory, rtol=1e-5, atol=1e-6)
    in_memory = LinearSCVI(adata, seed=0)
    np.testing.assert_allclose(
        in_memory.module.library_log_means.numpy(), model.module.library_log_means.numpy(), rtol=1e-6
    )


def test_minibatch_is_freed_after_a_training_step(adata):
    """A step must not keep its minibatch alive: a sparse tensor that cached its own ``values()``
    formed a reference cycle the garbage collector cannot see, and every minibatch of every epoch
    stayed in memory (memory grew with the number of cells trained on)."""
    model = LinearSCVI(adata, seed=0)
    cells = CellData(adata, get_registry(adata))
    mb = cells.minibatch(np.arange(64), sparse=True)
    counts = weakref.ref(mb.x)
    elbo, per_cell = model.module.elbo(mb, n_obs=adata.n_obs)
    (-elbo).backward()
    del mb, elbo, per_cell
    gc.collect()
    assert counts() is None

"""Minibatch sources: in-memory CSR, device-resident, on-disk (.h5ad backed, .zarr) agree."""

from __future__ import annotations

import gc
import tracemalloc
import weakref

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import pyro_ldvae.api.io
import pyro_ldvae.data.validate
from pyro_ldvae import LinearSCVI, simulate
from pyro_ldvae.data.backed import BackedCellData, cell_data, read_backed
from pyro_ldvae.data.cells import CellData, DeviceCells
from pyro_ldvae.data.minibatch import Minibatch
from pyro_ldvae.data.registry import get_registry
from pyro_ldvae.data.sources import minibatch_source


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


@pytest.mark.parametrize("world_size", [2, 3])
def test_backed_ddp_ranks_read_their_own_blocks_and_take_equal_steps(adata, files, monkeypatch, world_size):
    """Under DDP each rank streams only its share of an epoch's blocks; together the ranks visit
    every training cell once (but for fewer than world_size left over), with equal step counts,
    in every epoch: each rank's generator goes on from where its previous epoch left it."""
    from pyro_ldvae.infer.distributed import DistributedContext

    cells = CellData(adata, get_registry(adata))
    train_idx = np.sort(np.random.default_rng(2).permutation(700)[:610])
    epochs = 2
    seen, steps, blocks_read = [[] for _ in range(epochs)], [[] for _ in range(epochs)], []
    for rank in range(world_size):
        on_disk = cell_data(read_backed(files["h5ad"]), get_registry(adata))
        on_disk.block_size, on_disk.buffer_blocks = 50, 3  # 14 blocks
        generator, ddp = torch.Generator().manual_seed(0), DistributedContext(rank, world_size, rank)
        for epoch in range(epochs):
            reads = []

            def counted(start, stop, reads=reads, read=on_disk.read_rows):
                reads.append(start)
                return read(start, stop)

            monkeypatch.setattr(on_disk, "read_rows", counted)
            minibatches = list(on_disk.iter_epoch(train_idx, 32, generator, ddp=ddp))
            for mb in minibatches:
                positions = mb.idx.numpy()
                assert_same(cells.minibatch(train_idx[positions], plate_idx=positions), mb)
            seen[epoch].append(np.concatenate([mb.idx.numpy() for mb in minibatches]))
            steps[epoch].append(len(minibatches))
            blocks_read.append(len(reads))
    for epoch in range(epochs):
        assert len(set(steps[epoch])) == 1  # DDP needs the same number of steps on every rank
        assert len({len(s) for s in seen[epoch]}) == 1 and len(seen[epoch][0]) == 610 // world_size
        union = np.concatenate(seen[epoch])
        assert len(np.unique(union)) == len(union)  # no cell on two ranks
        assert len(union) > 610 - world_size
    assert not np.array_equal(np.concatenate(seen[0]), np.concatenate(seen[1]))  # a new order each epoch
    assert max(blocks_read) <= 14 // world_size + 2  # its own blocks, two shared at most


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
        from pyro_ldvae.infer.train import train_svi

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


def _write_cells(path, n_cells: int, n_genes: int = 8) -> None:
    """Counts of many cells and few genes, so that what is kept per cell dominates the memory."""
    rng = np.random.default_rng(0)
    counts = rng.poisson(1.0, (n_cells, n_genes)).astype(np.float32)
    counts[:, 0] += 1  # no empty cells
    obs = pd.DataFrame({"batch": rng.choice(["a", "b"], n_cells)}, index=[f"c{i}" for i in range(n_cells)])
    anndata.AnnData(sp.csr_matrix(counts), obs=obs).write_h5ad(path)


def _peak_above_start(fn):
    """``fn()`` and the peak traced memory (bytes) above the memory traced when it started."""
    tracemalloc.reset_peak()
    start = tracemalloc.get_traced_memory()[0]
    result = fn()
    return result, tracemalloc.get_traced_memory()[1] - start


def _phase_peaks(path, out) -> dict[str, int]:
    """Peak traced memory of each phase of an on-disk workflow (numpy and Python allocations)."""
    adata = read_backed(path)
    LinearSCVI.setup_anndata(adata, batch_key="batch")
    peaks = {}
    tracemalloc.start()
    try:
        model, peaks["construct"] = _peak_above_start(lambda: LinearSCVI(adata, n_hidden=8, n_latent=2, seed=0))
        cells = model.get_cells()
        assert cells.batch.dtype == np.int8 and cells.labels.dtype == np.int8  # kept per cell: compact
        cells.block_size, cells.buffer_blocks = 500, 2  # buffers of 1,000 cells whatever the file size
        _, peaks["train"] = _peak_above_start(lambda: model.train(max_epochs=1, batch_size=500, progress_bar=False))
        _, peaks["latent"] = _peak_above_start(model.get_latent_representation)
        _, peaks["variance"] = _peak_above_start(model.get_factor_variance_explained)
        _, peaks["to_adata"] = _peak_above_start(model.to_adata)  # latent and variances, streamed again
        _, peaks["save"] = _peak_above_start(lambda: model.save(out, overwrite=True))
    finally:
        tracemalloc.stop()
    return peaks


def test_backed_memory_per_cell_stays_small(tmp_path, monkeypatch):
    """Peak memory of each phase on on-disk data grows by a few bytes per cell, not more.

    Measured as the slope of tracemalloc's peak between files of 5,000 and 25,000 cells (so the
    per-file constants cancel), with chunked reads made small so that only what is kept per cell
    grows. Measured after the fix: construct 18, train (with validation) 24, latent 18 (8 of
    them the result), variance 9, to_adata 19 (8 of them the result), save 0 bytes per cell.
    Before: construct 32 (int64 codes, a copied log), train 94 (every minibatch stayed in
    memory), save 85 (a million Python ints).
    """
    monkeypatch.setattr(pyro_ldvae.data.validate, "CHUNK_VALUES", 4096)
    monkeypatch.setattr(pyro_ldvae.api.io, "INDEX_CHUNK", 1000)
    _write_cells(tmp_path / "warm.h5ad", 1000)
    _phase_peaks(tmp_path / "warm.h5ad", tmp_path / "model")  # first-call costs (imports, caches) out of the way
    sizes, peaks = (5000, 25000), []
    for n_cells in sizes:
        _write_cells(tmp_path / f"{n_cells}.h5ad", n_cells)
        peaks.append(_phase_peaks(tmp_path / f"{n_cells}.h5ad", tmp_path / "model"))
    per_cell = {phase: (peaks[1][phase] - peaks[0][phase]) / (sizes[1] - sizes[0]) for phase in peaks[0]}
    bounds = {"construct": 24, "train": 30, "latent": 4 * 2 + 14, "variance": 14, "to_adata": 4 * 2 + 14, "save": 8}
    # bytes per cell; latent and to_adata hold the result, (cells, 2) float32
    assert all(per_cell[phase] < bound for phase, bound in bounds.items()), per_cell


def test_setup_anndata_takes_scvi_tools_argument_order():
    """Positional arguments mean what they mean in scvi-tools: batch_key, labels_key, layer."""
    adata = simulate(n_cells=60, n_genes=10, n_batch=2, seed=0)
    adata.obs["cell_type"] = np.where(np.arange(adata.n_obs) % 2 == 0, "a", "b")
    adata.layers["counts"] = adata.X.copy()
    LinearSCVI.setup_anndata(adata, "batch", "cell_type", "counts")
    registry = get_registry(adata)
    assert (registry.batch_key, registry.labels_key, registry.layer) == ("batch", "cell_type", "counts")
    assert registry.batch_categories == ["batch_0", "batch_1"] and registry.label_categories == ["a", "b"]


def test_batch_codes_by_name_or_position():
    adata = simulate(n_cells=60, n_genes=10, n_batch=3, seed=0)
    LinearSCVI.setup_anndata(adata, batch_key="batch")
    registry = get_registry(adata)
    assert registry.batch_codes(None) == [None]
    assert registry.batch_codes("batch_2") == [2] and registry.batch_codes([0, "batch_1"]) == [0, 1]
    with pytest.raises(ValueError, match="not a batch category"):
        registry.batch_codes("unknown")

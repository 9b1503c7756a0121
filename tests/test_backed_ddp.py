"""Two torchrun processes on one ``backed='r'`` file: each rank reads only its share of the rows."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from pyro_ldvae import simulate

ROOT = Path(__file__).resolve().parents[1]
N_CELLS, BLOCK, EPOCHS = 3000, 100, 2

# Every row read through anndata's CSR dataset during `train` is counted, whatever code path asks
# for it: the count is of what was read, not of what the plan says should be.
WORKER = textwrap.dedent(
    """
    import sys
    import anndata, numpy as np, torch
    from pyro_ldvae import LinearSCVI
    from pyro_ldvae.infer.distributed import init_from_env
    torch.set_num_threads(1)
    ctx = init_from_env("cpu")
    assert ctx is not None and ctx.world_size == 2
    block, epochs = int(sys.argv[3]), int(sys.argv[4])
    adata = anndata.read_h5ad(sys.argv[1], backed="r")
    LinearSCVI.setup_anndata(adata)
    model = LinearSCVI(adata, n_hidden=16, n_latent=2, seed=0)
    cells = model.get_cells()
    cells.block_size, cells.buffer_blocks = block, 3
    reads = np.zeros(adata.n_obs, dtype=np.int64)
    dataset_class = type(cells.X)
    read = dataset_class.__getitem__

    def counted(self, key):
        rows = key[0] if isinstance(key, tuple) else key
        np.add.at(reads, np.arange(adata.n_obs)[rows], 1)
        return read(self, key)

    dataset_class.__getitem__ = counted
    model.train(max_epochs=epochs, batch_size=64, train_size=0.8, accelerator="cpu", progress_bar=False)
    dataset_class.__getitem__ = read
    np.save(f"{sys.argv[2]}/reads{ctx.rank}.npy", reads)
    """
)


@pytest.mark.slow
def test_each_torchrun_rank_reads_only_its_share_of_the_file(tmp_path):
    """Training epochs and the validation ELBO: per rank about half the rows one process reads.

    One process reads every row once per epoch for training and at most once per validation ELBO
    (``2 * EPOCHS`` reads per row). Two ranks together read no more, but for the blocks at the
    seams of their training shares (two per epoch), and each about half of it.
    """
    adata = simulate(n_cells=N_CELLS, n_genes=40, seed=2)
    path = tmp_path / "cells.h5ad"
    adata.write_h5ad(path)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    path_entries = [str(ROOT), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in path_entries if p), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=0"]
    cmd += ["--rdzv-backend=c10d", "--rdzv-endpoint=localhost:0", str(script), str(path), str(tmp_path)]
    cmd += [str(BLOCK), str(EPOCHS)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    reads = [np.load(tmp_path / f"reads{rank}.npy") for rank in range(2)]

    one_process = 2 * EPOCHS * N_CELLS  # rows one process reads: train + validation, each epoch
    total = reads[0] + reads[1]
    # together no more than one process (but for two training blocks per epoch at the seams) ...
    assert total.sum() <= one_process + EPOCHS * 2 * BLOCK, [r.sum() for r in reads]
    # ... and each about half of it: the validation cells are split evenly, their rows not quite
    for mine in reads:
        assert 0.4 * one_process <= mine.sum() <= 0.6 * one_process, [r.sum() for r in reads]
    # every row is read for training each epoch, by one rank or (in a block at a seam) both
    assert (total >= EPOCHS).all()

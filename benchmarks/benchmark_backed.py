"""Out-of-core training: peak memory and throughput on .h5ad files opened with backed='r'.

Writes simulated files of N cells x 2,000 genes chunk by chunk (never holding the matrix), then,
each in a fresh process, opens the file backed, runs ``setup_anndata`` + ``LinearSCVI`` (library
prior computed block-wise), trains one epoch and computes the latent representation chunk by
chunk, and reports peak RSS, on-disk training throughput and latent throughput. It then computes
the validation ELBO and ``to_adata`` and reports the peak again. RSS is also recorded after the
imports and after opening the file, which is anndata's share (``obs`` and the cell names are
read into memory). For comparison the same is done in memory on the largest file that fits
comfortably.

The large files are made by repeating one simulated 100,000-cell block (simulating 1M cells with
the Pyro model takes ~1 hour on 2 cores); memory and I/O behaviour do not depend on whether
cells repeat.

Examples
--------
python benchmarks/benchmark_backed.py --cells 100000 1000000 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def write_tiled(path: Path, n_cells: int, source: Path, chunk: int = 50_000) -> None:
    """An .h5ad of ``n_cells`` cells written chunk by chunk from repeats of ``source``'s cells."""
    import anndata
    import h5py
    import pandas as pd
    from anndata.io import sparse_dataset, write_elem

    from pyro_ldvae.api.io import write_h5ad

    block = anndata.read_h5ad(source)
    X = block.X.tocsr()
    obs = pd.DataFrame(index=[f"cell{i}" for i in range(n_cells)])
    tmp = path.with_suffix(".tmp.h5ad")
    write_h5ad(anndata.AnnData(obs=obs, var=block.var[[]]), tmp)
    with h5py.File(tmp, "a") as f:
        if "X" in f:
            del f["X"]
        written = 0
        while written < n_cells:
            start = written % X.shape[0]
            rows = X[start : start + min(chunk, n_cells - written, X.shape[0] - start)]
            if written == 0:
                write_elem(f, "X", rows)
            else:
                sparse_dataset(f["X"]).append(rows)
            written += rows.shape[0]
    os.replace(tmp, path)


def current_rss_mb() -> float:
    """Resident memory of this process now (Linux; NaN elsewhere)."""
    try:
        with open("/proc/self/status") as status:
            fields = dict(line.split(":", 1) for line in status)
        return int(fields["VmRSS"].split()[0]) / 1024
    except OSError:
        return float("nan")


def worker(args) -> None:
    import anndata
    import torch

    from pyro_ldvae import LinearSCVI

    torch.set_num_threads(args.threads)
    rss_imports = current_rss_mb()
    t0 = time.perf_counter()
    adata = anndata.read_h5ad(args.path, backed=None if args.in_memory else "r")
    rss_open = current_rss_mb()  # anndata's share: obs (cell names) in memory, X on disk
    LinearSCVI.setup_anndata(adata)
    model = LinearSCVI(adata, seed=0)
    setup_s = time.perf_counter() - t0
    model.train(max_epochs=1, batch_size=128, accelerator="cpu", progress_bar=False, check_val_every_n_epoch=10**9)
    train_s = float(model.history["train_time"]["train_time"].sum())
    t0 = time.perf_counter()
    z = model.get_latent_representation(batch_size=4096)
    latent_s = time.perf_counter() - t0
    latent_cells_per_s = len(z) / latent_s
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # The rest of a session: the validation ELBO (each epoch when validating) and to_adata
    # (latent representation again, factor variances over all cells).
    del z
    model.get_elbo(indices=model.validation_indices)
    model.to_adata()
    result = dict(
        n_cells=adata.n_obs,
        in_memory=args.in_memory,
        setup_s=setup_s,
        train_cells_per_s=len(model.train_indices) / train_s,
        train_s=train_s,
        latent_cells_per_s=latent_cells_per_s,
        rss_imports_mb=rss_imports,
        rss_open_mb=rss_open,
        peak_rss_mb=peak_rss,
        peak_rss_all_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/pyro_ldvae_bench"))
    parser.add_argument("--in-memory-max", type=int, default=100_000, help="also train in memory up to this size")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--in-memory", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--path", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    sys.path.insert(0, str(HERE))
    from benchmark_train import simulated_path

    args.dir.mkdir(parents=True, exist_ok=True)
    source = simulated_path()
    rows = []
    for n in args.cells:
        path = args.dir / f"sim_{n}.h5ad"
        if not path.exists():
            t0 = time.perf_counter()
            write_tiled(path, n, source)
            print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t0:.0f} s", flush=True)
        modes = [False] + ([True] if n <= args.in_memory_max else [])
        for in_memory in modes:
            cmd = [sys.executable, __file__, "--worker", f"--path={path}", f"--threads={args.threads}"]
            cmd += ["--in-memory"] if in_memory else []
            env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(args.threads))
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
            if not lines:
                raise RuntimeError(out.stderr[-3000:])
            rows.append(json.loads(lines[-1][7:]))
            print(rows[-1], flush=True)
    print()
    print(
        "| cells | data | RSS after imports MB | RSS after opening MB | peak RSS MB (train + latent) "
        "| peak RSS MB (+ validation ELBO, to_adata) | train cells/s (1 epoch) | latent cells/s | setup s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        where = "in memory" if r["in_memory"] else "on disk (backed='r')"
        print(
            f"| {r['n_cells']:,} | {where} | {r['rss_imports_mb']:,.0f} | {r['rss_open_mb']:,.0f} "
            f"| {r['peak_rss_mb']:,.0f} | {r['peak_rss_all_mb']:,.0f} | {r['train_cells_per_s']:,.0f} "
            f"| {r['latent_cells_per_s']:,.0f} | {r['setup_s']:.1f} |"
        )


if __name__ == "__main__":
    main()

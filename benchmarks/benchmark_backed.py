"""Out-of-core training: peak memory and throughput on .h5ad files opened with backed='r'.

Writes simulated files of N cells x 2,000 genes chunk by chunk (never holding the matrix), then,
each in a fresh process, opens the file backed, runs ``setup_anndata`` + ``LinearSCVI`` (library
prior computed block-wise), trains one epoch, computes the latent representation and runs
``to_adata`` (latent representation and factor variances, both streamed chunk by chunk). For
each phase it reports the time and the peak RSS during the phase (the peak is reset between
phases through /proc/self/clear_refs, Linux only), and RSS after opening the file, which is
anndata's share (``obs`` and the cell names are read into memory). The same is done with the
counts loaded into memory (CSR) for files up to ``--in-memory-max`` cells, as long as the machine
has three times the file's size available; on-disk and in-memory runs of one size take turns
(``--repeats``), so load from other processes hits both alike. Each result is appended to
``--results`` (JSON lines) as soon as it is measured; ``--table`` prints the table from that file.

The large files are made by repeating one simulated 100,000-cell block (simulating 1M cells with
the Pyro model takes ~1 hour on 2 cores); memory and I/O behaviour do not depend on whether
cells repeat.

Examples
--------
python benchmarks/benchmark_backed.py --cells 50000 200000 1000000 2000000 --threads 1
python benchmarks/benchmark_backed.py --table
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_DIR = Path("/tmp/pyro_ldvae_bench")


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


def peak_rss_mb() -> float:
    """Peak resident memory of this process since the last ``reset_peak`` (Linux; NaN elsewhere)."""
    try:
        with open("/proc/self/status") as status:
            fields = dict(line.split(":", 1) for line in status)
        return int(fields["VmHWM"].split()[0]) / 1024
    except OSError:
        return float("nan")


def reset_peak() -> None:
    """Start a new peak: VmHWM drops to the current RSS (Linux; nothing elsewhere)."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        pass


def available_mb() -> float:
    """Memory the kernel can give without swapping (MemAvailable; inf where unknown)."""
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return int(fields["MemAvailable"].split()[0]) / 1024
    except OSError:
        return float("inf")


def worker(args) -> None:
    import anndata
    import torch

    from pyro_ldvae import LinearSCVI

    torch.set_num_threads(args.threads)
    result = dict(n_cells=None, in_memory=args.in_memory, batch_size=args.batch_size, threads=args.threads)
    result["rss_imports_mb"] = current_rss_mb()
    t0 = time.perf_counter()
    adata = anndata.read_h5ad(args.path, backed=None if args.in_memory else "r")
    result["rss_open_mb"] = current_rss_mb()  # anndata's share: obs (cell names) in memory, X on disk
    LinearSCVI.setup_anndata(adata)
    model = LinearSCVI(adata, seed=0)
    result["setup_s"] = time.perf_counter() - t0
    result["n_cells"] = adata.n_obs
    result["peak_setup_mb"] = peak_rss_mb()
    reset_peak()
    model.train(
        max_epochs=1, batch_size=args.batch_size, accelerator="cpu", progress_bar=False,
        check_val_every_n_epoch=10**9,
    )  # fmt: skip
    result["train_s"] = float(model.history["train_time"]["train_time"].sum())
    result["train_cells_per_s"] = len(model.train_indices) / result["train_s"]
    result["peak_train_mb"] = peak_rss_mb()
    print("PARTIAL " + json.dumps(result), flush=True)  # training's figures, should a later phase not end
    reset_peak()
    t0 = time.perf_counter()
    z = model.get_latent_representation(batch_size=4096)
    result["latent_s"] = time.perf_counter() - t0
    result["latent_cells_per_s"] = len(z) / result["latent_s"]
    result["peak_latent_mb"] = peak_rss_mb()
    del z
    reset_peak()
    t0 = time.perf_counter()
    model.to_adata()  # latent representation again, factor variances over all cells
    result["to_adata_s"] = time.perf_counter() - t0
    result["peak_to_adata_mb"] = peak_rss_mb()
    # not getrusage's ru_maxrss: Linux carries it over exec from the parent (which wrote the file)
    result["peak_rss_mb"] = max(result[key] for key in result if key.startswith("peak_"))
    print("RESULT " + json.dumps(result), flush=True)


def run_worker(path: Path, in_memory: bool, args) -> dict:
    """One configuration in a fresh process; its result."""
    cmd = [sys.executable, __file__, "--worker", f"--path={path}", f"--threads={args.threads}"]
    cmd += [f"--batch-size={args.batch_size}"] + (["--in-memory"] if in_memory else [])
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(args.threads))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(lines[-1][7:])


def print_table(rows: list[dict]) -> None:
    """Medians over repeats, one line per (cells, data), and the on-disk/in-memory throughput ratio."""
    import numpy as np

    groups: dict[tuple[int, bool], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["n_cells"], row["in_memory"]), []).append(row)
    columns = [
        ("RSS after opening MB", "rss_open_mb", ",.0f"),
        ("peak RSS MB: setup", "peak_setup_mb", ",.0f"),
        ("train", "peak_train_mb", ",.0f"),
        ("latent", "peak_latent_mb", ",.0f"),
        ("to_adata", "peak_to_adata_mb", ",.0f"),
        ("train cells/s (1 epoch)", "train_cells_per_s", ",.0f"),
        ("latent cells/s", "latent_cells_per_s", ",.0f"),
        ("to_adata s", "to_adata_s", ".1f"),
        ("setup s", "setup_s", ".1f"),
    ]
    print("| cells | data | runs | " + " | ".join(name for name, _, _ in columns) + " | on disk / in memory |")
    print("|---" * (len(columns) + 4) + "|")
    for (n_cells, in_memory), group in sorted(groups.items()):
        median = {key: float(np.median([r[key] for r in group])) for _, key, _ in columns}
        ratio = ""
        if not in_memory and (n_cells, True) in groups:
            memory = float(np.median([r["train_cells_per_s"] for r in groups[(n_cells, True)]]))
            ratio = f"{median['train_cells_per_s'] / memory:.0%}"
        where = "in memory (CSR)" if in_memory else "on disk (backed='r')"
        cells = " | ".join(format(median[key], fmt) for _, key, fmt in columns)
        print(f"| {n_cells:,} | {where} | {len(group)} | {cells} | {ratio} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, nargs="+", default=[50_000, 200_000, 1_000_000, 2_000_000])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=1, help="runs per configuration, on disk and in memory in turn")
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="where the simulated files are written")
    parser.add_argument("--results", type=Path, default=None, help="JSON lines, appended (default: DIR/results.jsonl)")
    parser.add_argument("--in-memory-max", type=int, default=2_000_000, help="also train in memory up to this size")
    parser.add_argument("--table", action="store_true", help="print the table of --results and stop")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--in-memory", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--path", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    results = args.results or args.dir / "results.jsonl"
    if args.table:
        print_table([json.loads(line) for line in results.read_text().splitlines() if line.strip()])
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
        in_memory = n <= args.in_memory_max
        if in_memory and available_mb() < 3 * path.stat().st_size / 2**20:
            print(f"{n:,} cells: not run in memory, {available_mb():,.0f} MB available", flush=True)
            in_memory = False
        for _ in range(args.repeats):
            for mode in [False] + ([True] if in_memory else []):
                rows.append(run_worker(path, mode, args))
                with open(results, "a") as out:
                    out.write(json.dumps(rows[-1]) + "\n")
                print(rows[-1], flush=True)
    print()
    print_table(rows)


if __name__ == "__main__":
    main()

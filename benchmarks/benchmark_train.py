"""Train pyro_ldvae and scvi-tools' LinearSCVI side by side and print one comparison table.

Both libraries get the same data, the same train/validation split (``split_cells`` draws
scvi-tools' split when ``scvi.settings.seed`` equals our seed), the same torch thread count,
batch size and number of epochs. Every (library, repeat) runs in a fresh subprocess, so peak
resident memory is per library, and the two libraries alternate (ours, scvi, ours, scvi, ...)
so that load from other processes on a shared machine hits both alike.

Measured per run: training throughput (training cells / median time of an epoch's training
steps), median wall time per epoch (training steps only), held-out negative ELBO after the epochs,
time to reach a target held-out negative ELBO (the worse of the two libraries' medians after
the last epoch, i.e. the first epoch at which each library is at least that good), peak RSS,
and ``get_latent_representation`` throughput on all cells. Process CPU time per training step
is reported too: on a machine shared with other jobs it is steadier than wall time.

Examples
--------
python benchmarks/benchmark_train.py --dataset cbmc --epochs 20 --repeats 2 --threads 2
python benchmarks/benchmark_train.py --dataset sim100k --epochs 3 --repeats 1 --threads 2
python benchmarks/benchmark_train.py --dataset sim100k --epochs 3 --repeats 2 --accelerator gpu

With ``--accelerator gpu`` both train on the GPU: ours keeps the whole count matrix on the device
when it fits (``DeviceCells``) and cuts minibatches there; scvi-tools runs at its default settings
(its data loader on the host, as shipped).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHARED = ROOT.parent / "shared" / "data"
RESULTS = HERE / "results"
DATASETS = {
    "cbmc": SHARED / "cbmc_citeseq_8617.h5ad",
    "brain": SHARED / "brain_10x_10k.h5ad",
    "kang": SHARED / "pbmc_kang_stim_1556.h5ad",
    "sim100k": RESULTS / "sim_100k_2000.h5ad",
}


def simulated_path(n_cells: int = 100_000, n_genes: int = 2000) -> Path:
    """Simulate once (10x-like depth: ~13% non-zeros) and cache under benchmarks/results/."""
    path = RESULTS / f"sim_{n_cells // 1000}k_{n_genes}.h5ad"
    if not path.exists():
        from pyro_ldvae import simulate
        from pyro_ldvae.api.io import write_h5ad

        RESULTS.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial.h5ad")  # renamed when complete: never a half-written cache
        write_h5ad(simulate(n_cells=n_cells, n_genes=n_genes, library_log_mean=6.0, seed=0), partial)
        partial.replace(path)
    return path


def load(dataset: str, data: str | None = None):
    """The AnnData of ``dataset``, or of the file ``data`` when given."""
    import anndata

    path = data if data else simulated_path() if dataset == "sim100k" else DATASETS[dataset]
    adata = anndata.read_h5ad(path)
    adata.obs_names_make_unique()
    return adata


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_ours(adata, args) -> dict:
    import torch

    from pyro_ldvae import LinearSCVI

    LinearSCVI.setup_anndata(adata)
    model = LinearSCVI(adata, n_latent=args.n_latent, seed=args.seed)
    cpu0 = time.process_time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)  # e.g. a CUDA graph that could not be captured
        model.train(
            max_epochs=args.epochs,
            batch_size=args.batch_size,
            accelerator=args.accelerator,
            seed=args.seed,
            progress_bar=False,
            cuda_graphs=False if args.cuda_graphs == "off" else None,
            traced_step={"auto": None, "on": True, "off": False}[args.traced_step],
        )
    cpu = time.process_time() - cpu0
    history = model.history
    epoch_times = history["train_time"]["train_time"].to_numpy()
    val_curve = history["elbo_validation"]["elbo_validation"].to_numpy()
    held_out = -float(model.get_elbo(indices=model.validation_indices))
    start = time.perf_counter()
    model.get_latent_representation()
    latent_s = time.perf_counter() - start
    torch.set_num_threads(args.threads)
    return dict(
        n_train=len(model.train_indices),
        epoch_times=epoch_times.tolist(),
        val_curve=val_curve.tolist(),
        held_out=float(held_out),
        latent_s=latent_s,
        cpu_s=cpu,
        warnings=[str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
    )


def run_scvi(adata, args) -> dict:
    import scvi
    from lightning.pytorch.callbacks import Callback

    scvi.settings.seed = args.seed
    scvi.settings.dl_num_workers = 0

    class EpochTimer(Callback):
        """Time from the start of each training epoch to its last training step (no validation)."""

        def __init__(self):
            self.times, self._start, self._last = [], None, None

        def on_train_epoch_start(self, trainer, module):
            self._start = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self._last = time.perf_counter()

        def on_validation_epoch_start(self, trainer, module):
            if self._start is not None:
                self.times.append(self._last - self._start)
                self._start = None

    scvi.model.LinearSCVI.setup_anndata(adata)
    model = scvi.model.LinearSCVI(adata, n_latent=args.n_latent)
    timer = EpochTimer()
    cpu0 = time.process_time()
    model.train(
        max_epochs=args.epochs,
        batch_size=args.batch_size,
        accelerator=args.accelerator,
        check_val_every_n_epoch=1,
        callbacks=[timer],
        enable_progress_bar=False,
    )
    cpu = time.process_time() - cpu0
    val_idx = model.validation_indices
    held_out = -float(model.get_elbo(indices=val_idx))  # get_elbo is the ELBO (higher is better)
    start = time.perf_counter()
    model.get_latent_representation()
    latent_s = time.perf_counter() - start
    return dict(
        n_train=len(model.train_indices),
        epoch_times=timer.times,
        val_curve=model.history["elbo_validation"]["elbo_validation"].to_numpy().tolist(),
        held_out=held_out,
        latent_s=latent_s,
        cpu_s=cpu,
    )


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    adata = load(args.dataset, args.data)
    result = (run_ours if args.worker == "ours" else run_scvi)(adata, args)
    result.update(library=args.worker, n_cells=adata.n_obs, n_genes=adata.n_vars, peak_rss_mb=peak_rss_mb())
    if args.accelerator == "gpu":
        result.update(device=torch.cuda.get_device_name(), peak_gpu_mb=torch.cuda.max_memory_allocated() / 2**20)
    print("RESULT " + json.dumps(result), flush=True)


def spawn(library: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", library] + [
        f"--{k.replace('_', '-')}={v}"
        for k, v in vars(args).items()
        if k not in ("worker", "repeats", "libraries", "from_log")
    ]
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS=str(args.threads))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"{library} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def time_to_target(run: dict, target: float) -> float:
    """Training time until the first epoch whose validation negative ELBO is <= target (nan if never)."""
    cumulative = np.cumsum(run["epoch_times"])
    hits = np.flatnonzero(np.asarray(run["val_curve"][: len(cumulative)]) <= target)
    return float(cumulative[hits[0]]) if len(hits) else float("nan")


def summarise(runs: list[dict], args) -> str:
    by_lib = {lib: [r for r in runs if r["library"] == lib] for lib in ("ours", "scvi")}
    by_lib = {k: v for k, v in by_lib.items() if v}
    med = lambda xs: float(np.median(xs))  # noqa: E731
    target = max(med([r["val_curve"][-1] for r in rs]) for rs in by_lib.values())
    rows = {}
    for lib, rs in by_lib.items():
        n_train, n_cells = rs[0]["n_train"], rs[0]["n_cells"]
        rows[lib] = {
            # median epoch: one epoch stalled by another job on a shared machine does not count
            "train cells/s": med([n_train / med(r["epoch_times"]) for r in rs]),
            "s/epoch": med([med(r["epoch_times"]) for r in rs]),
            "CPU ms/step": med(
                [1e3 * r["cpu_s"] / (len(r["epoch_times"]) * np.ceil(n_train / args.batch_size)) for r in rs]
            ),
            "held-out -ELBO": med([r["held_out"] for r in rs]),
            # the validation ELBO moves by about 1% from one epoch to the next (the last minibatches'
            # noise); the mean of the last 3 epochs compares the trajectories, not one epoch's draw
            "held-out -ELBO, last 3 epochs": med([float(np.mean(r["val_curve"][-3:])) for r in rs]),
            f"s to -ELBO<={target:.1f}": med([time_to_target(r, target) for r in rs]),
            "peak RSS MB": med([r["peak_rss_mb"] for r in rs]),
            "latent cells/s": med([n_cells / r["latent_s"] for r in rs]),
        }
    names = ["pyro_ldvae" if k == "ours" else "scvi-tools" for k in rows]
    lines = [
        f"{args.data or args.dataset}: {runs[0]['n_cells']} cells x {runs[0]['n_genes']} genes, {args.epochs} epochs, "
        f"batch {args.batch_size}, {args.threads} threads, {args.accelerator}"
        f"{', ours: traced_step ' + args.traced_step if args.accelerator == 'cpu' else ''}"
        f"{'' if args.accelerator == 'cpu' else ' (' + runs[0].get('device', '?') + ', ours: cuda_graphs ' + args.cuda_graphs + ')'}, "
        f"{len(runs) // len(rows)} repeat(s), "
        "medians"
    ]
    metrics = list(next(iter(rows.values())).keys())
    lines.append(f"| metric | {' | '.join(names)} |" + (" ours / scvi |" if len(rows) == 2 else ""))
    lines.append("|---" * (len(rows) + 1 + (len(rows) == 2)) + "|")
    for m in metrics:
        vals = [rows[k][m] for k in rows]
        ratio = f" {vals[0] / vals[1]:.2f} |" if len(rows) == 2 else ""
        lines.append(f"| {m} | " + " | ".join(f"{v:,.2f}" for v in vals) + " |" + ratio)
    if len(rows) == 2:
        for key in ("held-out -ELBO", "held-out -ELBO, last 3 epochs"):
            gap = (rows["ours"][key] - rows["scvi"][key]) / abs(rows["scvi"][key])
            lines.append(f"{key} relative difference (ours - scvi) / |scvi|: {100 * gap:+.3f}%")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="cbmc")
    parser.add_argument("--data", default="", help="an .h5ad file of raw counts to use instead of --dataset")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--accelerator", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument(
        "--cuda-graphs",
        choices=["auto", "off"],
        default="auto",
        help="ours on a GPU: replay the training step as a CUDA graph (auto) or launch it eagerly (off)",
    )
    parser.add_argument(
        "--traced-step",
        choices=["auto", "on", "off"],
        default="auto",
        help="ours on CPU: replay the training step from a recorded graph (on), take eager steps (off), "
        "or let train() decide (auto: runs of 1,000+ full minibatches)",
    )
    parser.add_argument("--n-latent", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--libraries", default="ours,scvi", help="comma-separated subset of ours,scvi")
    parser.add_argument("--from-log", default=None, help="re-summarise the 'repeat' lines of a saved run")
    parser.add_argument("--worker", choices=["ours", "scvi"], default=None, help=argparse.SUPPRESS)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    if args.from_log:
        with open(args.from_log) as f:
            runs = [json.loads(line.split(": ", 1)[1]) for line in f if line.startswith("repeat ")]
        print(summarise(runs, args))
        return
    if args.worker:
        worker(args)
        return
    if args.dataset == "sim100k":
        simulated_path()
    runs = []
    for repeat in range(args.repeats):
        for library in args.libraries.split(","):
            run = spawn(library, args)
            runs.append(run)
            print(
                f"repeat {repeat} {library}: {json.dumps(run)}",
                flush=True,
            )
    print()
    print(summarise(runs, args))


if __name__ == "__main__":
    main()

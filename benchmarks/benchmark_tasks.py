"""Post-training tasks, pyro_ldvae against scvi-tools on the same trained weights.

A scvi-tools ``LinearSCVI`` is trained for a few epochs (or loaded from ``benchmarks/results/``),
``pyro_ldvae.LinearSCVI.from_scvi`` copies its weights, and each task runs in both libraries.
Every (task, library, repeat) runs in a fresh subprocess, the two libraries taking turns, so the
peak RSS of a task is that process's ``ru_maxrss`` after it, with its growth over what the loaded
model and data held, and a slow task is stopped after ``--timeout`` seconds of the task itself
(an alarm in the worker; reported as ``> N``). Prints one table of medians.

    python benchmarks/benchmark_tasks.py --threads 2 --datasets pancreas cbmc --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DATA = ROOT / ".." / "shared" / "data"

TASKS = {
    "latent": "get_latent_representation()",
    "normalized_25": "get_normalized_expression(n_samples=25)",
    "predictive_10": "posterior_predictive_sample(n_samples=10)",
    "marginal_ll_100": "get_marginal_ll(n_mc_samples=100)",
    "de_vanilla": "differential_expression vanilla, group vs rest",
    "de_change": "differential_expression change, group vs rest",
    "de_importance": "differential_expression vanilla, weights='importance', group vs rest",
}


def load_dataset(name: str, n_cells: int):
    """The AnnData of a benchmark dataset, its batch key and the obs column and group DE compares."""
    import anndata
    import numpy as np

    if name == "pancreas":
        import scanpy as sc

        adata = anndata.read_h5ad(DATA / "pancreas_baron_human_2142.h5ad")
        adata = adata[adata.obs["donor"].isin(["human1", "human3"])].copy()  # two donors
        sc.pp.filter_genes(adata, min_cells=3)  # many genes: every gene seen in 3 cells
        adata.obs["donor"] = adata.obs["donor"].astype(str).astype("category")
        adata.obs["group"] = adata.obs["cell_type1"].astype(str)
        return adata, "donor", "beta"
    if name == "cbmc":
        adata = anndata.read_h5ad(DATA / "cbmc_citeseq_8617.h5ad")
        adata.obs["group"] = adata.obs["label"].astype(str)
        return adata, None, adata.obs["group"].value_counts().index[0]
    if name == "sim":
        import pyro_ldvae

        path = RESULTS / f"tasks_sim{n_cells}.h5ad"
        if not path.exists():
            RESULTS.mkdir(parents=True, exist_ok=True)
            pyro_ldvae.simulate(n_cells=n_cells, n_genes=2000, library_log_mean=6.0, seed=0).write_h5ad(path)
        adata = anndata.read_h5ad(path)
        label = next((c for c in ("label", "labels", "cell_type", "group") if c in adata.obs), None)
        adata.obs["group"] = (
            adata.obs[label].astype(str) if label else np.where(np.arange(adata.n_obs) % 5 == 0, "a", "b")
        )
        return adata, None, adata.obs["group"].value_counts().index[0]
    raise ValueError(f"Unknown dataset {name!r}; choose pancreas, cbmc or sim.")


def trained_scvi(name: str, n_cells: int, epochs: int):
    """The scvi-tools model of a dataset, trained once and cached in ``benchmarks/results``."""
    import scvi

    adata, batch_key, group = load_dataset(name, n_cells)
    path = RESULTS / f"tasks_scvi_{name}{n_cells if name == 'sim' else ''}_{epochs}"
    scvi.model.LinearSCVI.setup_anndata(adata, batch_key=batch_key)
    if path.exists():
        return scvi.model.LinearSCVI.load(str(path), adata=adata), adata, group
    model = scvi.model.LinearSCVI(adata, n_latent=10)
    model.train(max_epochs=epochs, batch_size=128, enable_progress_bar=False)
    model.save(str(path), overwrite=True)
    return model, adata, group


def run_task(model, library: str, task: str, group: str):
    """One call of ``task`` on ``model`` (both libraries take the same arguments)."""
    common = dict(groupby="group", group1=group)
    if library == "scvi":
        common["batch_size"] = 128
    if task == "latent":
        return model.get_latent_representation()
    if task == "normalized_25":
        return model.get_normalized_expression(n_samples=25)
    if task == "predictive_10":
        return model.posterior_predictive_sample(n_samples=10)
    if task == "marginal_ll_100":
        return model.get_marginal_ll(n_mc_samples=100)
    if task == "de_vanilla":
        return model.differential_expression(mode="vanilla", **common)
    if task == "de_change":
        return model.differential_expression(mode="change", **common)
    if task == "de_importance":
        return model.differential_expression(mode="vanilla", weights="importance", **common)
    raise ValueError(task)


def worker(args) -> None:
    """Load the model in this process, run one task once and print its time and peak RSS as JSON."""
    import torch

    torch.set_num_threads(args.threads)
    import scvi

    scvi.settings.seed = args.seed
    scvi_model, adata, group = trained_scvi(args.dataset, args.n_cells, args.epochs)
    model = scvi_model
    if args.library == "ours":
        import pyro_ldvae

        model = pyro_ldvae.LinearSCVI.from_scvi(scvi_model, adata)
        del scvi_model
        import pyro

        pyro.set_rng_seed(args.seed)
    import gc

    gc.collect()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB; the peak so far

    def stop(signum, frame):
        raise TimeoutError

    signal.signal(signal.SIGALRM, stop)
    signal.alarm(int(args.timeout))  # the task alone is timed out, not the imports and loading
    start = time.perf_counter()
    try:
        run_task(model, args.library, args.task, group)
        seconds = time.perf_counter() - start
    except TimeoutError:
        seconds = float("inf")
    signal.alarm(0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "peak_mb": peak / 1024, "added_mb": (peak - before) / 1024}))


def measure(args, dataset: str, task: str, library: str) -> dict:
    command = [
        sys.executable, __file__, "--worker", "--dataset", dataset, "--task", task, "--library", library,
        "--threads", str(args.threads), "--epochs", str(args.epochs), "--n-cells", str(args.n_cells),
        "--timeout", str(args.timeout),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout + 1800, env=env)
    except subprocess.TimeoutExpired:
        return {"seconds": float("inf"), "peak_mb": float("nan"), "added_mb": float("nan")}
    if done.returncode != 0:
        raise RuntimeError(f"{library} {task} on {dataset} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--datasets", nargs="+", default=["pancreas", "cbmc", "sim"])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=5, help="scvi-tools training epochs (cached)")
    parser.add_argument("--n-cells", type=int, default=100_000, help="cells of the simulated dataset")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds before a task is stopped")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dataset", help=argparse.SUPPRESS)
    parser.add_argument("--task", help=argparse.SUPPRESS)
    parser.add_argument("--library", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    for dataset in args.datasets:  # train (or load) each model once, outside the timings
        subprocess.run(
            [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
             f"from benchmarks.benchmark_tasks import trained_scvi; trained_scvi({dataset!r}, {args.n_cells}, {args.epochs})"],
            check=True, capture_output=True,
        )  # fmt: skip
    rows = []
    for dataset in args.datasets:
        for task in args.tasks:
            runs: dict[str, list[dict]] = {"scvi": [], "ours": []}
            for _ in range(args.repeats):
                for library in ("ours", "scvi"):
                    runs[library].append(measure(args, dataset, task, library))
            med = {lib: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for lib, rs in runs.items()}
            rows.append((dataset, task, med["scvi"], med["ours"]))
            print(json.dumps({"dataset": dataset, "task": task, **{lib: runs[lib] for lib in runs}}), flush=True)
    timed = lambda s: f"> {args.timeout:.0f}" if s == float("inf") else f"{s:.2f}"  # noqa: E731
    print(
        "\n| dataset | task | scvi-tools s | ours s | speed-up | scvi-tools peak RSS MB (+task) | ours peak RSS MB (+task) |"
    )
    print("|---|---|---|---|---|---|---|")
    for dataset, task, scvi, ours in rows:
        speedup = scvi["seconds"] / ours["seconds"]
        if ours["seconds"] == float("inf"):
            speed = "n/a"
        else:
            speed = f"> {args.timeout / ours['seconds']:.0f}x" if scvi["seconds"] == float("inf") else f"{speedup:.2f}x"
        print(
            f"| {dataset} | {task} | {timed(scvi['seconds'])} | {timed(ours['seconds'])} | {speed} | "
            f"{scvi['peak_mb']:.0f} (+{scvi['added_mb']:.0f}) | {ours['peak_mb']:.0f} (+{ours['added_mb']:.0f}) |"
        )


if __name__ == "__main__":
    main()

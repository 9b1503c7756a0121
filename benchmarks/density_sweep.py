"""Training throughput of pyro_ldvae against scvi-tools' LinearSCVI across count densities.

Simulated datasets of 20,000 cells x 2,000 genes (18,000 training cells with the default 90%
split) at about 4, 8, 13, 18 and 25% non-zeros, set by the simulated library size
(``simulate(library_log_mean=...)``). Each (density, library, repeat) trains in a fresh process
through ``benchmark_train.py``'s workers, at the same thread count, batch size and number of
epochs; the order is repeat by repeat, density by density, ours then scvi-tools, so that load
from other processes hits both alike. The table gives medians over repeats: training
throughput (training cells / median epoch's time in training steps), the ratio, and the held-out
negative ELBO of each library after the last epoch.

With ``--steps``, a cheaper measurement for a busy machine: one process per density builds both
libraries' models on the first 2,560 cells and times their training steps alone (process CPU
time; the models take turns, a block of steps each): ours is ``train``'s replayed step and Adam
on minibatches cut as ``train`` cuts them; scvi-tools' is its module's forward and loss (KL
weight 0.5), ``backward`` and its training plan's Adam, on minibatches from its own data loader.
The Lightning loop's per-step work (logging, metrics) is left out of scvi-tools' time, so the
step ratio understates what whole epochs give.

Examples
--------
python benchmarks/density_sweep.py --epochs 20 --repeats 2 --threads 2
python benchmarks/density_sweep.py --epochs 3 --repeats 1 --threads 1 --traced-step on
python benchmarks/density_sweep.py --steps --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import benchmark_train  # noqa: E402 - the workers and their options live there

# The simulated log library size that gives each density (per cent non-zero) with 2,000 genes:
# measured on 2,000-cell draws of simulate(seed=0); the table prints the density obtained.
LIBRARY_LOG_MEAN = {4: 4.55, 8: 5.35, 13: 6.0, 18: 6.5, 25: 7.0}


def dataset_path(percent: int, n_cells: int, n_genes: int) -> Path:
    """Simulate once at about ``percent``% non-zeros and cache under benchmarks/results/."""
    path = benchmark_train.RESULTS / f"sim_density{percent}_{n_cells // 1000}k_{n_genes}.h5ad"
    if not path.exists():
        from pyro_ldvae import simulate
        from pyro_ldvae.api.io import write_h5ad

        path.parent.mkdir(parents=True, exist_ok=True)
        adata = simulate(n_cells=n_cells, n_genes=n_genes, library_log_mean=LIBRARY_LOG_MEAN[percent], seed=0)
        partial = path.with_suffix(".partial.h5ad")  # renamed when complete: never a half-written cache
        write_h5ad(adata, partial)
        partial.replace(path)
    return path


def density(path: Path) -> float:
    """The fraction of non-zero counts in the file's ``X``."""
    import anndata

    x = anndata.read_h5ad(path).X
    return float(x.nnz / (x.shape[0] * x.shape[1])) if hasattr(x, "nnz") else float(np.mean(x != 0))


def table(runs: list[dict], densities: dict[int, float], args) -> str:
    """One row per density: medians over repeats of each library's throughput and held-out -ELBO."""
    med = lambda xs: float(np.median(xs))  # noqa: E731
    lines = [
        f"{args.n_cells} cells x {args.n_genes} genes (simulated), {args.epochs} epochs, batch {args.batch_size}, "
        f"{args.threads} threads, ours: traced_step {args.traced_step}, {args.repeats} repeat(s), medians",
        "| non-zero | pyro_ldvae cells/s | scvi-tools cells/s | ours / scvi | held-out -ELBO ours | "
        "held-out -ELBO scvi | (ours - scvi) / scvi | CPU ms/step ours, scvi | CPU-time ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for percent, fraction in densities.items():
        figures = {}
        for lib in ("ours", "scvi"):
            rs = [r for r in runs if r["percent"] == percent and r["library"] == lib]
            figures[lib] = (
                med([r["n_train"] / med(r["epoch_times"]) for r in rs]),
                med([r["held_out"] for r in rs]),
                # process CPU time of the whole train call (validation included) per training step:
                # steadier than wall time on a machine shared with other jobs
                med([1e3 * r["cpu_s"] / (len(r["epoch_times"]) * np.ceil(r["n_train"] / args.batch_size)) for r in rs]),
            )
        (ours, ours_elbo, ours_cpu), (scvi, scvi_elbo, scvi_cpu) = figures["ours"], figures["scvi"]
        lines.append(
            f"| {100 * fraction:.1f}% | {ours:,.0f} | {scvi:,.0f} | **{ours / scvi:.2f}** | {ours_elbo:,.2f} | "
            f"{scvi_elbo:,.2f} | {100 * (ours_elbo - scvi_elbo) / abs(scvi_elbo):+.2f}% | {ours_cpu:.1f}, {scvi_cpu:.1f} | "
            f"**{scvi_cpu / ours_cpu:.2f}** |"
        )
    return "\n".join(lines)


def scvi_step(adata, batch_size: int, n_steps: int):
    """scvi-tools' training step on its own minibatches: forward and loss, backward, Adam."""
    import scvi
    from scvi.train import TrainingPlan

    scvi.settings.seed = 0
    scvi.settings.dl_num_workers = 0
    scvi.model.LinearSCVI.setup_anndata(adata)
    model = scvi.model.LinearSCVI(adata, n_latent=10)
    model.module.train()
    optimizer = TrainingPlan(model.module).configure_optimizers()["optimizer"]
    loader = model._make_data_loader(adata=adata, batch_size=batch_size, shuffle=True, drop_last=True)
    minibatches = []
    while len(minibatches) < n_steps:
        minibatches += list(loader)

    def step(tensors) -> None:
        optimizer.zero_grad()
        _, _, loss = model.module(tensors, loss_kwargs={"kl_weight": 0.5})
        loss.loss.backward()
        optimizer.step()

    return step, minibatches[:n_steps]


def step_times(percent: int, args) -> dict:
    """CPU ms per training step of both libraries at one density, in this process."""
    import time

    import anndata
    import torch

    from pyro_ldvae import LinearSCVI

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(HERE))
    import prior_step  # noqa: PLC0415 - our replayed step, built as prior_step.py builds it

    adata = anndata.read_h5ad(dataset_path(percent, args.n_cells, args.n_genes))[:2560].copy()
    LinearSCVI.setup_anndata(adata)
    ours = prior_step.build(adata, "none", 10, args.batch_size, 20)
    theirs = scvi_step(adata.copy(), args.batch_size, 20)
    for mb in theirs[1][:3]:  # warm-up
        theirs[0](mb)
    times = {"ours": [], "scvi": []}
    for _ in range(7):
        for lib, (step, minibatches) in (("ours", ours), ("scvi", theirs)):
            start = time.process_time()
            for mb in minibatches:
                step(mb)
            times[lib].append(1e3 * (time.process_time() - start) / len(minibatches))
    return {lib: float(np.median(t)) for lib, t in times.items()} | {"all": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--densities", default="4,8,13,18,25", help=f"per cent, of {sorted(LIBRARY_LOG_MEAN)}")
    parser.add_argument("--n-cells", type=int, default=20_000)
    parser.add_argument("--n-genes", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", action="store_true", help="time the training steps alone, in one process")
    parser.add_argument(
        "--traced-step",
        choices=["auto", "on", "off"],
        default="auto",
        help="ours: as benchmark_train.py's option (auto replays runs of 1,000+ full minibatches)",
    )
    args = parser.parse_args()
    percents = [int(p) for p in args.densities.split(",")]
    unknown = sorted(set(percents) - set(LIBRARY_LOG_MEAN))
    if unknown:
        parser.error(f"--densities {unknown} not calibrated; choose from {sorted(LIBRARY_LOG_MEAN)}")
    paths = {p: dataset_path(p, args.n_cells, args.n_genes) for p in percents}
    densities = {p: density(path) for p, path in paths.items()}
    if args.steps:
        rows = []
        for percent in percents:
            times = step_times(percent, args)
            print(f"{percent}%: {json.dumps(times)}", flush=True)
            rows.append(
                f"| {100 * densities[percent]:.1f}% | {times['ours']:.2f} | {times['scvi']:.2f} | "
                f"**{times['scvi'] / times['ours']:.2f}** |"
            )
        print(
            f"\ntraining steps alone, batch {args.batch_size}, {args.threads} thread(s), 7 blocks of 20 steps, medians"
        )
        print("| non-zero | pyro_ldvae CPU ms/step | scvi-tools CPU ms/step | scvi / ours |\n|---|---|---|---|")
        print("\n".join(rows))
        return
    runs = []
    for repeat in range(args.repeats):
        for percent, path in paths.items():
            for library in ("ours", "scvi"):
                worker_args = benchmark_train.build_parser().parse_args(
                    [
                        f"--data={path}",
                        f"--epochs={args.epochs}",
                        f"--threads={args.threads}",
                        f"--batch-size={args.batch_size}",
                        f"--seed={args.seed}",
                        f"--traced-step={args.traced_step}",
                    ]
                )
                run = benchmark_train.spawn(library, worker_args)
                run["percent"] = percent
                runs.append(run)
                cells_s = run["n_train"] / np.median(run["epoch_times"])
                print(f"repeat {repeat} {percent}% {library}: {cells_s:,.0f} cells/s, {json.dumps(run)}", flush=True)
    print()
    print(table(runs, densities, args))


if __name__ == "__main__":
    main()

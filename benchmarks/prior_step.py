"""Step time of models with a loadings prior against the default model, on the replayed CPU step.

One process builds each model (``LinearSCVI(adata, loadings_prior=...)``) on the same simulated
counts and takes its training steps as ``train`` does (``TracedStep``: the recorded graph's
gradients, then Adam), on the same minibatches. After a warm-up (the recording), the models
take turns, a block of steps each, so that load from other processes hits all alike. Reported:
median process CPU time and wall time per step over the blocks, and each model's ratio to the
default model.

Examples
--------
python benchmarks/prior_step.py --priors none,horseshoe,ard,laplace --threads 1
python benchmarks/prior_step.py --library-log-mean 6.5 --repeats 9
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np


def build(adata, prior: str, n_latent: int, batch_size: int, n_steps: int):
    """A model's replayed step and ``n_steps`` training minibatches in the step's form."""
    import torch

    from pyro_ldvae import LinearSCVI
    from pyro_ldvae.data.sources import minibatch_source
    from pyro_ldvae.infer.options import TrainOptions
    from pyro_ldvae.infer.plan import make_optimizer
    from pyro_ldvae.infer.steps import TracedStep

    model = LinearSCVI(adata, n_latent=n_latent, seed=0, loadings_prior=None if prior == "none" else prior)
    module, cells = model.module, model._cells_cache.cells
    module.train()
    optimizer = make_optimizer(module, TrainOptions().plan(module))
    idx = np.arange(adata.n_obs)
    step = TracedStep(module, optimizer, module.elbo, len(idx), torch.device("cpu"))
    source = minibatch_source(cells, idx, batch_size, form=step.form, drop_last=True)
    minibatches, generator = [], torch.Generator().manual_seed(0)
    while len(minibatches) < n_steps:
        minibatches += list(source(generator))
    step.begin_epoch(0.5)  # a positive KL weight, as after the first epoch
    for mb in minibatches[:3]:  # records the graph
        step(mb)
    if step.traced.failure is not None or not step.traced.replays:
        raise RuntimeError(f"{prior}: the step was not replayed ({step.traced.failure})")
    return step, minibatches[:n_steps]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--priors", default="none,horseshoe,ard,laplace", help="'none' is the default model")
    parser.add_argument("--n-cells", type=int, default=2560)
    parser.add_argument("--n-genes", type=int, default=2000)
    parser.add_argument("--n-latent", type=int, default=10)
    parser.add_argument("--library-log-mean", type=float, default=6.0, help="6.0: about 13%% non-zero")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="steps per block")
    parser.add_argument("--repeats", type=int, default=7, help="blocks per model")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    from pyro_ldvae import LinearSCVI, simulate

    torch.set_num_threads(args.threads)
    adata = simulate(n_cells=args.n_cells, n_genes=args.n_genes, library_log_mean=args.library_log_mean, seed=0)
    LinearSCVI.setup_anndata(adata)
    priors = args.priors.split(",")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        steps = {p: build(adata, p, args.n_latent, args.batch_size, args.steps) for p in priors}
    cpu = {p: [] for p in priors}
    wall = {p: [] for p in priors}
    for _ in range(args.repeats):
        for prior, (step, minibatches) in steps.items():
            cpu0, wall0 = time.process_time(), time.perf_counter()
            for mb in minibatches:
                step(mb)
            cpu[prior].append(1e3 * (time.process_time() - cpu0) / len(minibatches))
            wall[prior].append(1e3 * (time.perf_counter() - wall0) / len(minibatches))
    density = adata.X.nnz / (adata.n_obs * adata.n_vars)
    print(
        f"{args.n_cells} cells x {args.n_genes} genes ({100 * density:.1f}% non-zero), batch {args.batch_size}, "
        f"{args.threads} thread(s), replayed CPU step + Adam, {args.repeats} blocks of {args.steps} steps, medians"
    )
    print("| model | CPU ms/step | wall ms/step | CPU ratio to default | wall ratio to default |")
    print("|---|---|---|---|---|")
    base_cpu, base_wall = np.median(cpu[priors[0]]), np.median(wall[priors[0]])
    for prior in priors:
        c, w = np.median(cpu[prior]), np.median(wall[prior])
        name = "default (no prior)" if prior == "none" else f"loadings_prior='{prior}'"
        print(f"| {name} | {c:.2f} | {w:.2f} | **{c / base_cpu:.2f}** | {w / base_wall:.2f} |")


if __name__ == "__main__":
    main()

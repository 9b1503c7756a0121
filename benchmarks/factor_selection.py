"""Factor selection by the loadings priors on simulated truths, with default training settings.

For every number of true factors (``--truths``), seed (``--seeds``) and prior (``--priors``),
simulate ``--cells`` x ``--genes`` counts with that many factors of equal strength, fit
``LinearSCVI(n_latent=--n-latent, loadings_prior=prior)`` with ``train(max_epochs=--epochs)``
and otherwise default settings, and count the active factors
(``LinearSCVI.get_active_factors``: principal axes of the fitted factor logits). Each fit also
records the count a per-column rule gives (columns whose own logit spread is at least the
threshold times the strongest), for comparison. Prints one row per fit (and appends it to
``--out`` as it goes) and a summary table: per prior and truth, in how many datasets the active
count equals the truth within one, and the counts seen.

    PYTHONPATH=. python benchmarks/factor_selection.py --truths 3 5 8 --seeds 10
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch

from pyro_ldvae import LinearSCVI, simulate
from pyro_ldvae.api.factor_selection import count_active, principal_logit_spread


def fit_one(n_true: int, seed: int, prior: str, args) -> tuple[int, int, list[float], float]:
    """Fit one simulated truth; the active count, the per-column count, principal spreads and seconds."""
    adata = simulate(n_cells=args.cells, n_genes=args.genes, n_latent=n_true, seed=seed)
    LinearSCVI.setup_anndata(adata)
    model = LinearSCVI(adata, n_latent=args.n_latent, loadings_prior=prior, seed=seed)
    start = time.perf_counter()
    model.train(max_epochs=args.epochs, batch_size=args.batch_size, progress_bar=False, **args.train_kwargs)
    seconds = time.perf_counter() - start
    frame = model.get_factor_variance_explained(sort=True)
    per_column = count_active(frame["variance"].to_numpy() ** 0.5, args.threshold)
    spread = principal_logit_spread(model.get_latent_representation(), model.get_loadings().to_numpy())
    active = len(model.get_active_factors(args.threshold))
    return active, per_column, [round(float(s), 3) for s in spread / spread.max()], seconds


def main(argv=None):
    """Fit every truth, seed and prior, print one row per fit and the summary table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--truths", type=int, nargs="+", default=[3, 5, 8])
    parser.add_argument("--seeds", type=int, default=10, help="datasets per truth: seeds 0 .. N-1")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--priors", nargs="+", default=["horseshoe", "ard"])
    parser.add_argument("--cells", type=int, default=1000)
    parser.add_argument("--genes", type=int, default=200)
    parser.add_argument("--n-latent", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threshold", type=float, default=0.3, help="get_active_factors' threshold")
    parser.add_argument("--out", default=None, help="append one tab-separated row per fit to this file")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--kl-warmup", type=int, default=None, help="n_epochs_kl_warmup (default: train's)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: train's)")
    args = parser.parse_args(argv)
    plan = {} if args.kl_warmup is None else {"n_epochs_kl_warmup": args.kl_warmup}
    plan.update({} if args.lr is None else {"lr": args.lr})
    args.train_kwargs = {"plan_kwargs": plan} if plan else {}
    torch.set_num_threads(args.threads)
    hits, counts = defaultdict(int), defaultdict(list)
    print("prior      truth seed active per-column  seconds  principal spreads / max")
    for n_true in args.truths:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            for prior in args.priors:
                active, per_column, spread, seconds = fit_one(n_true, seed, prior, args)
                hits[prior, n_true] += abs(active - n_true) <= 1
                counts[prior, n_true].append(active)
                print(
                    f"{prior:10s} {n_true:5d} {seed:4d} {active:6d} {per_column:10d} {seconds:8.1f}  "
                    f"{spread[: n_true + 3]}",
                    flush=True,
                )
                if args.out:
                    with open(args.out, "a") as out:
                        out.write(
                            f"{prior}\t{n_true}\t{seed}\t{active}\t{per_column}\t{seconds:.1f}\t{spread[: n_true + 4]}\n"
                        )
    print("\nprior      truth  within one  active counts")
    for (prior, n_true), found in sorted(counts.items()):
        print(f"{prior:10s} {n_true:5d}  {hits[prior, n_true]:3d} / {len(found):<3d}  {found}")


if __name__ == "__main__":
    main()

"""The ``pyro-ldvae`` command: fit LDVAE to an AnnData file and write the results."""

from __future__ import annotations

import argparse
import sys
import time


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyro-ldvae", description="Fit LDVAE (linearly decoded VAE) to single-cell counts.")
    sub = parser.add_subparsers(dest="command", required=True)
    fit = sub.add_parser("fit", help="fit LDVAE to an .h5ad file (default: scanpy's bundled PBMC counts)")
    fit.add_argument("input", nargs="?", help="input .h5ad with raw counts; omitted: the embedded PBMC dataset")
    fit.add_argument("-o", "--output", required=True, help="output .h5ad with obsm['X_ldvae'] and varm['ldvae_loadings']")
    fit.add_argument("--layer", default=None, help="layer holding raw counts (default: X)")
    fit.add_argument("--batch-key", default=None, help="obs column of batches")
    fit.add_argument("--labels-key", default=None, help="obs column of labels")
    fit.add_argument("--n-latent", type=int, default=10, help="number of factors (default 10)")
    fit.add_argument("--gene-likelihood", choices=["nb", "zinb", "poisson"], default="nb")
    fit.add_argument("--dispersion", choices=["gene", "gene-batch", "gene-label", "gene-cell"], default="gene")
    fit.add_argument("--max-epochs", type=int, default=None, help="default: scvi-tools' heuristic")
    fit.add_argument("--batch-size", type=int, default=128)
    fit.add_argument("--accelerator", choices=["auto", "cpu", "cuda"], default="auto")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    return parser


def run_fit(args: argparse.Namespace) -> None:
    import os

    import anndata

    from . import datasets
    from .distributed import init_from_env, is_main_process
    from .model import LinearSCVI

    init_from_env(args.accelerator)  # under torchrun: join the process group (DDP training)

    if os.path.exists(args.output) and not args.overwrite:
        raise ValueError(f"{args.output} exists; pass --overwrite to replace it.")
    adata = anndata.read_h5ad(args.input) if args.input else datasets.pbmc68k_counts()
    LinearSCVI.setup_anndata(adata, layer=args.layer, batch_key=args.batch_key, labels_key=args.labels_key)
    model = LinearSCVI(
        adata, n_latent=args.n_latent, gene_likelihood=args.gene_likelihood, dispersion=args.dispersion, seed=args.seed
    )
    start = time.perf_counter()
    model.train(max_epochs=args.max_epochs, batch_size=args.batch_size, accelerator=args.accelerator, progress_bar=sys.stderr.isatty())
    elapsed = time.perf_counter() - start
    if not is_main_process():
        return  # only rank 0 writes results
    adata.obsm["X_ldvae"] = model.get_latent_representation()
    loadings = model.get_loadings()
    adata.varm["ldvae_loadings"] = loadings.to_numpy()
    adata.write_h5ad(args.output)
    print(f"pyro-ldvae: {adata.n_obs} cells x {adata.n_vars} genes, {len(model.history['elbo_train'])} epochs in {elapsed:.1f} s")
    print(f"ELBO per cell: {model.get_elbo():.2f} (all cells)")
    for column in loadings.columns:
        top = loadings[column].sort_values()
        print(f"  {column}: + {', '.join(top.index[::-1][:5])} | - {', '.join(top.index[:5])}")
    print(f"wrote {args.output}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "fit":
            run_fit(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"pyro-ldvae: error: {err}", file=sys.stderr)
        return 2
    return 0

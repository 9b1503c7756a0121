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
    fit.add_argument(
        "--no-check-counts", action="store_true", help="accept non-integer values (default: refuse them)"
    )
    return parser


def run_fit(args: argparse.Namespace) -> int:
    import os

    from . import datasets
    from .model import LinearSCVI

    if os.path.exists(args.output) and not args.overwrite:
        raise ValueError(f"{args.output} exists; pass --overwrite to replace it.")
    adata = _read(args.input) if args.input else datasets.pbmc68k_counts()
    LinearSCVI.setup_anndata(
        adata,
        layer=args.layer,
        batch_key=args.batch_key,
        labels_key=args.labels_key,
        check_counts=not getattr(args, "no_check_counts", False),
    )
    model = LinearSCVI(
        adata, n_latent=args.n_latent, gene_likelihood=args.gene_likelihood, dispersion=args.dispersion, seed=args.seed
    )
    start = time.perf_counter()
    model.train(max_epochs=args.max_epochs, batch_size=args.batch_size, accelerator=args.accelerator, progress_bar=sys.stderr.isatty())
    elapsed = time.perf_counter() - start
    if getattr(model, "stop_reason_", "completed") == "interrupted":
        n_done = len(model.history.get("elbo_train", ()))
        if n_done == 0:
            raise KeyboardInterrupt
        print(f"pyro-ldvae: interrupted; writing the results of the {n_done} completed epoch(s)", file=sys.stderr)
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
    return 130 if getattr(model, "stop_reason_", "completed") == "interrupted" else 0


def _read(path: str):
    """Read an .h5ad; any failure becomes a one-line ValueError naming the file."""
    import os

    import anndata

    if not os.path.exists(path):
        raise FileNotFoundError(f"input file {path} does not exist.")
    try:
        return anndata.read_h5ad(path)
    except Exception as err:  # h5py/anndata raise many types for a bad file
        raise ValueError(f"cannot read {path} as .h5ad: {type(err).__name__}: {err}") from None


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"pyro-ldvae: warning: {' '.join(str(message).split())}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run the command; errors become one line on stderr and a non-zero exit status, no traceback."""
    import warnings

    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warning
        try:
            if args.command == "fit":
                return run_fit(args)
        except (ValueError, OSError, FloatingPointError) as err:
            message = " ".join(str(err).split())  # one line, whatever the message
            print(f"pyro-ldvae: error: {message}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("pyro-ldvae: interrupted; nothing written", file=sys.stderr)
            return 130
    return 0

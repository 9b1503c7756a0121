"""``pyro-ldvae map``: map a query .h5ad onto a saved reference model (reference mapping)."""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from types import ModuleType


def add_subcommand(sub, cli: ModuleType) -> None:
    """Add ``map REFERENCE_DIR QUERY.h5ad -o OUT.h5ad`` to the subcommands ``sub`` of ``cli``.

    ``cli`` is :mod:`pyro_ldvae.api.cli`, passed in rather than imported: it imports this module.
    """
    parser = sub.add_parser(
        "map",
        help="map a query .h5ad onto a saved reference model",
        description="Fit the query's new batches with everything the reference learned fixed (reference mapping), "
        "and write the query with its factors and the reference's loadings.",
    )
    parser.add_argument("reference_dir", metavar="REFERENCE_DIR", help="directory of a saved reference model")
    parser.add_argument("input", metavar="QUERY", help="query .h5ad with raw counts")
    parser.add_argument("-o", "--output", required=True, help="output .h5ad (query plus obsm/varm/uns results)")
    parser.add_argument("--batch-key", default=None, help="obs column of the query's batches, if not the reference's")
    parser.add_argument("--max-missing-fraction", type=float, default=0.2,
                        help="largest fraction of the reference's genes the query may lack (default 0.2)")  # fmt: skip
    parser.add_argument("--n-new-factors", type=int, default=0, metavar="K",
                        help="add K factors for programs the reference lacks (under a shrinkage prior); "
                        "writes obs['novelty'] (default 0)")  # fmt: skip
    parser.add_argument("--save-model", metavar="DIR", default=None, help="also save the query model to DIR")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file or model directory")
    training = parser.add_argument_group("training")
    cli._add_training_options(training)
    training.add_argument("--seed", type=int, default=None,
                          help="seed of the new factors' initial weights and of training (default: the reference's)")  # fmt: skip
    parser.set_defaults(run=functools.partial(run_map, cli=cli))


def run_map(args: argparse.Namespace, cli: ModuleType) -> int:
    """Prepare the query, load it onto the reference, train, write the results."""
    from ..data.registry import Registry
    from ..infer.options import TrainOptions
    from . import io
    from .linear_scvi import LinearSCVI

    cli._check_output(args.output, args.overwrite)
    if not os.path.isdir(args.reference_dir):
        raise cli.UserError(f"reference directory {args.reference_dir} does not exist")
    adata = cli._read_h5ad(args.input)
    if adata.n_obs == 0:
        raise cli.UserError(f"{args.input} has no cells")
    reference_key = Registry(**io.read_metadata(args.reference_dir)["registry"]).batch_key
    if args.batch_key and reference_key and args.batch_key != reference_key:
        if args.batch_key not in adata.obs.columns:
            raise cli.UserError(f"--batch-key {args.batch_key!r} is not a column of the query's obs")
        adata.obs[reference_key] = adata.obs[args.batch_key]
    LinearSCVI.prepare_query_anndata(adata, args.reference_dir, max_missing_fraction=args.max_missing_fraction)
    if args.n_new_factors < 0:
        raise cli.UserError(f"--n-new-factors must be >= 0, got {args.n_new_factors}")
    model = LinearSCVI.load_query_data(adata, args.reference_dir, n_new_factors=args.n_new_factors, seed=args.seed)
    start = time.perf_counter()
    names = [name for name in TrainOptions.names() if hasattr(args, name)]
    model.train(
        **{name: getattr(args, name) for name in names},
        plan_kwargs={"lr": args.lr},
        progress_bar=sys.stderr.isatty(),
    )
    model.to_adata(adata)
    if args.n_new_factors:
        adata.obs["novelty"] = model.get_novelty(adata)
    if args.save_model:
        model.save(args.save_model, overwrite=args.overwrite)
    cli._write_h5ad_atomic(adata, args.output)
    print(f"pyro-ldvae: mapped {adata.n_obs} cells x {adata.n_vars} genes in {time.perf_counter() - start:.1f} s")
    print(f"wrote {args.output}")
    return 0

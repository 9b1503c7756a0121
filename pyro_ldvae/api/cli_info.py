"""``pyro-ldvae info RESULT.h5ad``: what a result file written by ``fit``, ``transform`` or ``to_adata`` holds.

It prints the settings and setup stored in ``uns['ldvae']``, the training history's last values,
and the factors by variance explained with their top genes. It reads the file only; nothing is
computed anew.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np


def add_parser(sub) -> argparse.ArgumentParser:
    """Register the ``info`` subcommand on the ``pyro-ldvae`` subparsers ``sub``."""
    info = sub.add_parser(
        "info",
        help="show what a result .h5ad holds: settings, factors by variance explained, top genes",
        description="Print the settings (uns['ldvae']), the factors by variance explained and their top genes "
        "from an .h5ad written by pyro-ldvae fit / transform or LinearSCVI.to_adata.",
    )
    info.add_argument("input", metavar="RESULT", help="result .h5ad")
    info.add_argument("--key", default="ldvae", help="key the results were stored under (default ldvae)")
    info.add_argument("--n-top-genes", type=int, default=5, help="genes per factor and direction (default 5)")
    return info


def _stored(adata, key: str) -> dict:
    if key not in adata.uns or not isinstance(adata.uns[key], dict) or "params" not in adata.uns[key]:
        raise ValueError(
            f"uns[{key!r}] holds no pyro_ldvae results; write them with pyro-ldvae fit or model.to_adata(adata)"
        )
    return adata.uns[key]


def _line(mapping: dict) -> str:
    return ", ".join(f"{name}={value}" for name, value in mapping.items())


def run_info(args: argparse.Namespace) -> None:
    """Print the summary of ``args.input``; a file without results raises ``ValueError`` (one line, status 2)."""
    import anndata

    if not os.path.exists(args.input):
        raise ValueError(f"input {args.input} does not exist")
    try:
        adata = anndata.read_h5ad(args.input, backed="r")  # uns, obsm and varm only; X stays on disk
    except Exception as err:  # h5py/anndata raise many types for unreadable files
        raise ValueError(f"cannot read {args.input} as .h5ad ({type(err).__name__}: {err})") from err
    key, n_top = args.key, max(0, args.n_top_genes)
    stored = _stored(adata, key)
    print(f"{args.input}: {adata.n_obs} cells x {adata.n_vars} genes; pyro_ldvae {stored.get('version', '?')}")
    print(f"settings: {_line(stored['params'])}")
    registry = stored.get("registry")
    if registry is not None:
        setup = json.loads(registry) if isinstance(registry, str) else dict(registry)
        keys = ("layer", "batch_key", "labels_key", "categorical_covariate_keys", "continuous_covariate_keys")
        print(f"setup: {_line({k: setup.get(k) for k in keys})}, n_batch={len(setup.get('batch_categories', []))}")
    history = stored.get("history", {})
    if "elbo_train" in history and len(history["elbo_train"]):
        line = f"training: {len(history['elbo_train'])} epochs, final negative ELBO per cell: train "
        line += f"{history['elbo_train'][-1]:.2f}"
        validation = np.asarray(history.get("elbo_validation", []), dtype=float)
        if np.isfinite(validation).any():
            line += f", validation {validation[np.isfinite(validation)][-1]:.2f}"
        print(line)
    rep, name = f"X_{key}", f"{key}_loadings"
    held = [f"obsm[{rep!r}] {adata.obsm[rep].shape}"] if rep in adata.obsm else []
    held += [f"varm[{name!r}] {adata.varm[name].shape}"] if name in adata.varm else []
    print(f"results: {', '.join(held) or 'none besides uns'}")
    names = [str(n) for n in stored.get("factor_names", [])]
    fractions = dict(zip(names, np.asarray(stored.get("variance_explained_fraction", []), dtype=float)))
    order = [str(n) for n in stored.get("factor_order", names)]
    loadings = np.asarray(adata.varm[name]) if name in adata.varm else None
    genes = np.asarray(adata.var_names)
    print(f"factors by variance explained in the decoder logits (top {n_top} genes, + and -):")
    for factor in order:
        share = f"{100 * fractions[factor]:.1f}%" if factor in fractions else "?"
        if loadings is None or factor not in names:
            print(f"  {factor} ({share})")
            continue
        ranked = genes[np.argsort(loadings[:, names.index(factor)], kind="stable")]
        plus, minus = ", ".join(ranked[::-1][:n_top]), ", ".join(ranked[:n_top])
        print(f"  {factor} ({share}): + {plus} | - {minus}")

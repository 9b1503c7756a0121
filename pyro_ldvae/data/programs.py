"""Gene programs: a user's gene-set specification as a genes x programs membership mask.

:func:`program_mask` accepts every form a gene-set collection usually comes in and returns one
boolean DataFrame, ``(genes, programs)``, aligned to ``adata.var_names``:

- a dict ``{program: [gene, ...]}``;
- a long DataFrame with decoupler's ``source`` (program) and ``target`` (gene) columns;
- a genes x programs boolean DataFrame (genes as the index);
- a path to a ``.gmt`` file (:func:`read_gmt`);
- the name of an ``adata.varm`` key holding expiMap's mask ``(genes, terms)``, with the term
  names in ``adata.uns['terms']``.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from anndata import AnnData

logger = logging.getLogger(__name__)

GenePrograms = Mapping[str, Iterable[str]] | pd.DataFrame | str | os.PathLike


def read_gmt(path: str | os.PathLike) -> dict[str, list[str]]:
    """Read a ``.gmt`` gene-set file into a dict of set name to gene names.

    Each line is ``name<TAB>description<TAB>gene<TAB>gene...`` (MSigDB's format); empty gene
    fields are skipped and genes keep their order.

    Parameters
    ----------
    path
        The ``.gmt`` file.

    Returns
    -------
    dict
        ``{set name: [gene, ...]}`` in the file's order.

    Examples
    --------
    >>> sets = pyro_ldvae.read_gmt("h.all.v2023.1.Hs.symbols.gmt")  # doctest: +SKIP
    >>> sets["HALLMARK_INTERFERON_ALPHA_RESPONSE"][:3]  # doctest: +SKIP
    """
    sets: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            fields = line.rstrip("\r\n").split("\t")
            if not fields[0].strip():
                continue  # a blank line
            if len(fields) < 3:
                raise ValueError(
                    f"{path}, line {number}: a .gmt line needs a name, a description and genes separated by tabs."
                )
            name = fields[0].strip()
            if name in sets:
                raise ValueError(f"{path}, line {number}: the gene set {name!r} appears twice; rename one of them.")
            sets[name] = [gene.strip() for gene in fields[2:] if gene.strip()]
    if not sets:
        raise ValueError(f"{path} holds no gene sets.")
    return sets


def _from_mapping(spec: Mapping) -> dict[str, list[str]]:
    sets = {}
    for name, genes in spec.items():
        if isinstance(genes, str) or not isinstance(genes, Iterable):
            raise TypeError(
                f"gene_programs[{name!r}] must be a list of gene names, got {type(genes).__name__}; "
                "wrap a single gene in a list."
            )
        sets[str(name)] = [str(gene) for gene in genes]
    return sets


def _from_long(frame: pd.DataFrame) -> dict[str, list[str]]:
    if "weight" in frame.columns:
        logger.info(
            "gene_programs: the 'weight' column is not used; a program's genes are its members, and the "
            "sign and size of each gene's loading are learned from the data."
        )
    return {str(name): [str(g) for g in group] for name, group in frame.groupby("source", sort=False)["target"]}


def _from_wide(frame: pd.DataFrame) -> pd.DataFrame:
    if not all(pd.api.types.is_bool_dtype(dtype) for dtype in frame.dtypes):
        values = frame.to_numpy()
        if not np.isin(values, (0, 1)).all():
            raise TypeError(
                "A genes x programs DataFrame must hold booleans (or 0/1); for a long table of gene-program "
                "pairs use decoupler's 'source' and 'target' columns."
            )
    if frame.columns.duplicated().any():
        raise ValueError(
            f"gene_programs has duplicated program names: {sorted(set(frame.columns[frame.columns.duplicated()]))}."
        )
    return frame.astype(bool).set_axis(frame.index.astype(str), axis=0).set_axis(frame.columns.astype(str), axis=1)


def _from_varm(adata: AnnData, key: str) -> pd.DataFrame:
    mask = np.asarray(adata.varm[key])
    terms = adata.uns.get("terms")
    if terms is None:
        raise ValueError(
            f"adata.varm[{key!r}] is used as an expiMap mask, whose program names must be in adata.uns['terms']; "
            "set adata.uns['terms'] to a list of one name per column."
        )
    terms = [str(t) for t in np.asarray(terms).ravel()]
    if mask.ndim != 2 or mask.shape[1] != len(terms):
        raise ValueError(
            f"adata.varm[{key!r}] has shape {mask.shape}, but adata.uns['terms'] names {len(terms)} programs."
        )
    return _from_wide(pd.DataFrame(mask, index=adata.var_names, columns=terms))


def _to_wide(sets: dict[str, list[str]], var_names: pd.Index) -> pd.DataFrame:
    listed = {gene for genes in sets.values() for gene in genes}
    missing = listed.difference(var_names)
    if missing:
        logger.info(
            "gene_programs: %d of %d listed genes are not in adata.var_names and were dropped (e.g. %s).",
            len(missing), len(listed), ", ".join(sorted(missing)[:5]),
        )  # fmt: skip
    position = pd.Series(np.arange(len(var_names)), index=var_names)
    mask = np.zeros((len(var_names), len(sets)), dtype=bool)
    for k, genes in enumerate(sets.values()):
        present = [gene for gene in genes if gene in position.index]
        mask[position[present].to_numpy(), k] = True
    return pd.DataFrame(mask, index=var_names, columns=list(sets))


def program_mask(gene_programs: GenePrograms, adata: AnnData, min_genes: int = 5) -> pd.DataFrame:
    """The genes x programs membership mask of ``gene_programs``, aligned to ``adata.var_names``.

    Genes absent from ``adata`` are dropped (their number is logged at INFO); programs left with
    fewer than ``min_genes`` genes are dropped with a warning that names them.

    Parameters
    ----------
    gene_programs
        A dict ``{program: [gene, ...]}``; a long DataFrame with columns ``source`` (program) and
        ``target`` (gene), as decoupler's resources (a ``weight`` column is not used); a boolean
        DataFrame with genes as the index and one column per program; a path to a ``.gmt`` file;
        or the name of an ``adata.varm`` key holding expiMap's mask, program names in
        ``adata.uns['terms']``.
    adata
        The data the programs are aligned to.
    min_genes
        Programs with fewer genes in ``adata`` are dropped.

    Returns
    -------
    pandas.DataFrame
        Boolean, ``(genes, programs)``, indexed by ``adata.var_names``, one column per kept program.

    Raises
    ------
    TypeError
        For a specification of none of the forms above.
    ValueError
        When no program keeps ``min_genes`` genes, or for malformed input.
    """
    if not (isinstance(min_genes, (int, np.integer)) and min_genes >= 1):
        raise ValueError(f"min_genes must be a positive integer, got {min_genes!r}.")
    var_names = pd.Index(adata.var_names.astype(str))
    if var_names.duplicated().any():
        raise ValueError("adata.var_names has duplicates; make them unique (adata.var_names_make_unique()).")
    if isinstance(gene_programs, pd.DataFrame):
        if {"source", "target"}.issubset(gene_programs.columns):
            mask = _to_wide(_from_long(gene_programs), var_names)
        else:
            wide = _from_wide(gene_programs)
            missing = wide.index.difference(var_names)
            if len(missing):
                logger.info(
                    "gene_programs: %d of %d genes of the mask are not in adata.var_names and were dropped.",
                    len(missing), len(wide.index),
                )  # fmt: skip
            mask = wide.reindex(var_names, fill_value=False).astype(bool)
    elif isinstance(gene_programs, Mapping):
        mask = _to_wide(_from_mapping(gene_programs), var_names)
    elif isinstance(gene_programs, str) and gene_programs in adata.varm:
        mask = _from_varm(adata, gene_programs).set_axis(var_names, axis=0)
    elif isinstance(gene_programs, (str, os.PathLike)):
        path = Path(gene_programs)
        if not path.is_file():
            raise ValueError(
                f"gene_programs={str(gene_programs)!r} is neither a key of adata.varm ({sorted(adata.varm)}) "
                "nor an existing .gmt file."
            )
        mask = _to_wide(read_gmt(path), var_names)
    else:
        raise TypeError(
            "gene_programs must be a dict of program name to gene names, a DataFrame (long with 'source' and "
            "'target' columns, or genes x programs booleans), a path to a .gmt file or an adata.varm key; "
            f"got {type(gene_programs).__name__}."
        )
    sizes = mask.sum(0)
    small = list(sizes.index[sizes < min_genes])
    if small:
        warnings.warn(
            f"gene_programs: {len(small)} program(s) have fewer than min_genes={min_genes} genes in the data "
            f"and were dropped: {', '.join(small)}.",
            UserWarning,
            stacklevel=2,
        )
    mask = mask.loc[:, sizes >= min_genes]
    if mask.shape[1] == 0:
        raise ValueError(
            f"No gene program has at least min_genes={min_genes} genes in adata.var_names; check that the "
            "programs use the same gene identifiers as the data (symbols vs Ensembl IDs) or lower min_genes."
        )
    return mask

"""Plots, scanpy style: training curve, loadings, variance explained, factors and programs on an embedding.

The training curve, factor loadings with their top genes, the variance each factor explains, a factor or a gene
program's activity on an embedding, a program's refined members. Each function returns the matplotlib Axes (a list
for several panels), takes ``ax=`` to draw into an existing figure, ``show=True`` to call ``plt.show()`` (and return
None) and ``save='file.png'`` (or ``True`` for ``figures/<name>.png``) to write the figure.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from anndata import AnnData

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from .linear_scvi import LinearSCVI


def _finish(fig, axes, name: str, show: bool | None, save: str | bool | None):
    import matplotlib.pyplot as plt

    if save:
        path = os.path.join("figures", f"{name}.png") if save is True else str(save)
        if os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        fig.savefig(path, bbox_inches="tight", dpi=120)
    if show:
        plt.show()
        return None
    return axes


def _history(source, key: str) -> dict[str, pd.Series]:
    """Per-epoch series from a model, an AnnData with ``uns[key]['history']``, or a history dict."""
    if isinstance(source, AnnData):
        if key not in source.uns or "history" not in source.uns[key]:
            raise ValueError(f"adata.uns[{key!r}]['history'] is missing; store results with model.to_adata(adata).")
        stored = source.uns[key]
        epochs = np.asarray(stored.get("history_epochs", []))
        out = {}
        for name, values in stored["history"].items():
            values = np.asarray(values, dtype=float)
            index = epochs if len(epochs) == len(values) else np.arange(len(values))
            out[name] = pd.Series(values, index=index)
        return out
    history = source.history if hasattr(source, "history") else source
    return {
        name: frame.iloc[:, 0] if isinstance(frame, pd.DataFrame) else pd.Series(frame)
        for name, frame in history.items()
    }


def training_curve(
    source: LinearSCVI | AnnData | dict,
    keys: Sequence[str] = ("elbo_train", "elbo_validation"),
    key: str = "ldvae",
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | bool | None = None,
) -> Axes | None:
    """Train and validation negative ELBO per epoch (lower is better).

    ``source``: a trained model, an AnnData with stored results, or a history dict.
    """
    import matplotlib.pyplot as plt

    history = _history(source, key)
    present = [k for k in keys if k in history and history[k].notna().any()]
    if not present:
        raise ValueError(f"None of {list(keys)} is in the training history (keys: {sorted(history)}); train first.")
    if ax is None:
        fig, ax = plt.subplots(figsize=(5, 3.5))
    fig = ax.figure
    for name in present:
        series = history[name].dropna()
        ax.plot(series.index, series.to_numpy(), marker="." if len(series) < 30 else None, label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("negative ELBO per cell")
    ax.set_title("LDVAE training")
    ax.legend(frameon=False)
    return _finish(fig, ax, "ldvae_training_curve", show, save)


def _loadings_frame(source, key: str) -> pd.DataFrame:
    if isinstance(source, AnnData):
        name = f"{key}_loadings"
        if name not in source.varm:
            raise ValueError(f"adata.varm[{name!r}] is missing; store results with model.to_adata(adata).")
        values = np.asarray(source.varm[name])
        names = source.uns.get(key, {}).get("factor_names", [f"Z_{k}" for k in range(values.shape[1])])
        return pd.DataFrame(values, index=source.var_names, columns=list(names))
    return source.get_loadings()


def loadings(
    source: LinearSCVI | AnnData,
    factors: Sequence[str | int] | None = None,
    n_top: int = 5,
    key: str = "ldvae",
    ncols: int = 3,
    ax: Axes | Sequence[Axes] | None = None,
    show: bool | None = None,
    save: str | bool | None = None,
) -> Axes | list[Axes] | None:
    """Each chosen factor's loadings sorted across genes, the top genes labelled.

    The ``n_top`` most positive and most negative genes are labelled (the figure of the LDVAE paper).

    ``factors``: names ('Z_3') or positions; default: all factors, ordered by explained variance
    when that is stored (``uns[key]['factor_order']``) or computable from a model. ``ax``: one
    Axes per factor (then ``ncols`` is unused); a single Axes draws one factor (default: the
    one explaining most variance) and is returned as it is; otherwise a list of Axes is returned.
    """
    import matplotlib.pyplot as plt

    frame = _loadings_frame(source, key)
    factors_given = factors is not None
    if factors is None:
        if isinstance(source, AnnData) and "factor_order" in source.uns.get(key, {}):
            factors = list(source.uns[key]["factor_order"])
        elif not isinstance(source, AnnData):
            factors = list(source.get_factor_variance_explained(sort=True).index)
        else:
            factors = list(frame.columns)
    names = [frame.columns[f] if isinstance(f, (int, np.integer)) else str(f) for f in factors]
    unknown = [n for n in names if n not in frame.columns]
    if unknown:
        raise ValueError(f"Unknown factors {unknown}; factors are {list(frame.columns)}.")
    single = ax is not None and not isinstance(ax, (list, tuple, np.ndarray))
    if single and len(names) > 1 and factors_given:
        raise ValueError(f"One Axes was given for {len(names)} factors; pass one Axes per factor.")
    names = names[:1] if single else names
    if ax is None:
        ncols = max(1, min(ncols, len(names)))
        nrows = int(np.ceil(len(names) / ncols))
        fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows), squeeze=False)
        flat = list(axes.ravel())
    else:
        flat = [ax] if single else list(np.ravel(np.asarray(ax, dtype=object)))
        if len(flat) < len(names):
            raise ValueError(f"{len(flat)} Axes were given for {len(names)} factors; pass one Axes per factor.")
        fig = flat[0].figure
    for panel, name in zip(flat, names):
        ordered = frame[name].sort_values()
        ranks = np.arange(len(ordered))
        panel.scatter(ranks, ordered.to_numpy(), s=4, color="0.6", linewidths=0)
        panel.axhline(0.0, color="0.8", lw=0.8)
        top = list(range(max(0, len(ordered) - n_top), len(ordered)))
        bottom = list(range(min(n_top, len(ordered))))
        for positions, color, va in ((top, "tab:red", "bottom"), (bottom, "tab:blue", "top")):
            panel.scatter(ranks[positions], ordered.to_numpy()[positions], s=10, color=color)
            for i in positions:
                panel.annotate(ordered.index[i], (ranks[i], ordered.iloc[i]), fontsize=7, ha="center", va=va,
                               rotation=60, xytext=(0, 3 if va == "bottom" else -3), textcoords="offset points")  # fmt: skip
        panel.set_title(name)
        panel.set_xlabel("gene rank")
        panel.set_ylabel("loading")
    if ax is None:
        for panel in flat[len(names) :]:
            panel.set_visible(False)
        fig.tight_layout()
    return _finish(fig, ax if single else flat[: len(names)], "ldvae_loadings", show, save)


def _variance_frame(source, key: str) -> pd.DataFrame:
    if isinstance(source, AnnData):
        stored = source.uns.get(key, {})
        if "variance_explained_fraction" not in stored:
            raise ValueError(
                f"adata.uns[{key!r}] holds no variance explained; store results with model.to_adata(adata)."
            )
        fraction = np.asarray(stored["variance_explained_fraction"], dtype=float)
        names = list(stored.get("factor_names", [f"Z_{k}" for k in range(len(fraction))]))
        return pd.DataFrame({"fraction": fraction}, index=[str(n) for n in names])
    return source.get_factor_variance_explained()


def variance_explained(
    source: LinearSCVI | AnnData,
    key: str = "ldvae",
    color: str = "tab:blue",
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | bool | None = None,
) -> Axes | None:
    """The fraction of the decoder logits' variance each factor explains, factors sorted by it.

    ``source``: a trained model (computed on its training data) or an AnnData with stored
    results (``uns[key]['variance_explained_fraction']``).
    """
    import matplotlib.pyplot as plt

    frame = _variance_frame(source, key).sort_values("fraction", ascending=False)
    if ax is None:
        fig, ax = plt.subplots(figsize=(max(3.0, 0.45 * len(frame) + 1.5), 3.2))
    fig = ax.figure
    ax.bar(range(len(frame)), 100 * frame["fraction"].to_numpy(), color=color)
    ax.set_xticks(range(len(frame)), list(frame.index), rotation=90 if len(frame) > 12 else 0)
    ax.set_xlabel("factor")
    ax.set_ylabel("variance explained (%)")
    ax.set_title("LDVAE factors")
    return _finish(fig, ax, "ldvae_variance_explained", show, save)


def factor_embedding(
    adata: AnnData,
    factor: str | int,
    basis: str = "umap",
    key: str = "ldvae",
    cmap: str = "RdBu_r",
    point_size: float | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | bool | None = None,
) -> Axes | None:
    """A factor's value per cell (``obsm['X_<key>']``) coloured on ``obsm['X_<basis>']``.

    The colour scale is centred on zero.
    """
    rep = f"X_{key}"
    if rep not in adata.obsm:
        raise ValueError(f"adata.obsm[{rep!r}] is missing; store results with model.to_adata(adata).")
    coords = _embedding(adata, basis)
    latent = np.asarray(adata.obsm[rep])
    names = list(adata.uns.get(key, {}).get("factor_names", [f"Z_{k}" for k in range(latent.shape[1])]))
    column = int(factor) if isinstance(factor, (int, np.integer)) else names.index(factor) if factor in names else -1
    if not 0 <= column < latent.shape[1]:
        raise ValueError(f"Unknown factor {factor!r}; factors are {names}.")
    ax = _centred_scatter(ax, coords, latent[:, column], basis, cmap, point_size, f"{names[column]} on {basis}")
    return _finish(ax.figure, ax, f"ldvae_{names[column]}_{basis}", show, save)


def program_activity(
    model: LinearSCVI,
    program: str,
    adata: AnnData | None = None,
    basis: str = "umap",
    cmap: str = "RdBu_r",
    point_size: float | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | bool | None = None,
) -> Axes | None:
    """A gene program's activity per cell (``model.get_program_activity``) on ``obsm['X_<basis>']``.

    Parameters
    ----------
    model
        A model with gene programs.
    program
        The program's name.
    adata
        Cells to score and plot (default: the model's data); must hold the embedding.
    basis
        Embedding in ``adata.obsm`` (``'umap'`` reads ``X_umap``).
    cmap, point_size
        Colour map (centred on zero) and marker size.
    ax, show, save
        As for the other plots in this module.

    Returns
    -------
    matplotlib.axes.Axes or None
        The Axes (None with ``show=True``).
    """
    adata = model.adata if adata is None else adata
    coords = _embedding(adata, basis)
    activity = model.get_program_activity(adata)
    if program not in activity.columns:
        raise ValueError(f"Unknown program {program!r}; the model's programs are {list(activity.columns)}.")
    values = activity[program].to_numpy()
    ax = _centred_scatter(ax, coords, values, basis, cmap, point_size, f"{program} activity", label="activity")
    return _finish(ax.figure, ax, f"ldvae_program_{program}_{basis}", show, save)


def program_members(
    model: LinearSCVI,
    program: str,
    n_top: int = 30,
    threshold: float = 0.1,
    ax: Axes | None = None,
    show: bool | None = None,
    save: str | bool | None = None,
) -> Axes | None:
    """A program's refined members: membership probability of annotated and added genes.

    Bars show ``model.get_program_membership(threshold)`` for the program's annotated genes and
    for unannotated genes with a probability of at least 0.5, coloured as *kept* (annotated,
    probability >= 0.5), *dropped* (annotated, < 0.5) or *added* (not annotated, >= 0.5); the
    ``n_top`` genes with the highest probability (then largest loading) are shown.

    Parameters
    ----------
    model
        A model with gene programs.
    program
        The program's name.
    n_top
        Genes shown.
    threshold
        Loading size that counts as acting in the program (see ``get_program_membership``).
    ax, show, save
        As for the other plots in this module.

    Returns
    -------
    matplotlib.axes.Axes or None
        The Axes (None with ``show=True``).
    """
    import matplotlib.pyplot as plt

    from .programs import membership_mask, program_names

    if program not in program_names(model.init_params_):
        raise ValueError(f"Unknown program {program!r}; the model's programs are {program_names(model.init_params_)}.")
    membership = model.get_program_membership(threshold=threshold)
    annotated = membership_mask(model.init_params_["gene_programs"], model.var_names)[program]
    frame = pd.DataFrame(
        {"probability": membership[program], "size": model.get_loadings()[program].abs(), "annotated": annotated}
    )
    frame = frame[frame["annotated"] | (frame["probability"] >= 0.5)]
    frame = frame.sort_values(["probability", "size"], ascending=False).head(n_top)
    status = np.where(frame["annotated"], np.where(frame["probability"] >= 0.5, "kept", "dropped"), "added")
    colors = {"kept": "tab:blue", "dropped": "tab:gray", "added": "tab:orange"}
    if ax is None:
        fig, ax = plt.subplots(figsize=(max(4.0, 0.25 * len(frame) + 1.5), 3.5))
    fig = ax.figure
    ax.bar(range(len(frame)), frame["probability"].to_numpy(), color=[colors[s] for s in status])
    ax.set_xticks(range(len(frame)), list(frame.index), rotation=90)
    ax.set_ylim(0, 1.05)
    ax.axhline(0.5, color="k", lw=0.5, ls=":")
    ax.set_ylabel(f"P(|loading| > {threshold})")
    ax.set_title(f"{program}: refined members")
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=c, label=s) for s, c in colors.items()], frameon=False, fontsize="small")
    return _finish(fig, ax, f"ldvae_program_{program}_members", show, save)


def _embedding(adata: AnnData, basis: str) -> np.ndarray:
    """The first two coordinates of ``adata.obsm[basis]`` (or ``'X_<basis>'``), ``(cells, 2)``."""
    key = basis if basis in adata.obsm else f"X_{basis}"
    if key not in adata.obsm:
        raise ValueError(f"adata.obsm has no {basis!r} embedding; compute it first (e.g. sc.tl.umap(adata)).")
    return np.asarray(adata.obsm[key])[:, :2]


def _centred_scatter(ax, coords, values, basis: str, cmap: str, point_size, title: str, label: str | None = None):
    """``values`` per cell coloured on ``coords``, on a colour scale centred on zero; returns the Axes."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(4.5, 4))
    limit = float(np.abs(values).max()) or 1.0
    order = np.argsort(np.abs(values))  # strongest values drawn on top
    size = point_size or max(1.0, 120000 / max(len(values), 1) ** 1.3)
    points = ax.scatter(coords[order, 0], coords[order, 1], c=values[order], cmap=cmap, vmin=-limit, vmax=limit,
                        s=size, linewidths=0)  # fmt: skip
    ax.figure.colorbar(points, ax=ax, shrink=0.8, label=label)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel(f"{basis}1")
    ax.set_ylabel(f"{basis}2")
    return ax

"""Render the images of docs/plotting.md: every ``pyro_ldvae.pl`` function on a small simulated run.

The data are drawn by ``pyro_ldvae.simulate`` (known loadings, two batches; and a second set from
three gene programs with noisy annotations), the models train for a few dozen epochs on CPU, and
each plot is saved as a small PNG in ``docs/_static/``.

Examples
--------
python tools/make_gallery.py            # rewrite docs/_static/pl_*.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MAX_BYTES = 60_000  # each PNG stays small: the docs ship in the repository


def _save(ax, path: Path, dpi: int) -> None:
    fig = (ax[0] if isinstance(ax, list) else ax).figure
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise SystemExit(f"{path} is {size} bytes (limit {MAX_BYTES}); lower --dpi")
    print(f"wrote {path} ({size // 1000} kB)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "_static", help="output folder")
    parser.add_argument("--dpi", type=int, default=72, help="resolution of the PNGs (default 72)")
    parser.add_argument("--epochs", type=int, default=60, help="training epochs (default 60)")
    args = parser.parse_args(argv)

    import scanpy as sc
    import torch

    import pyro_ldvae

    torch.set_num_threads(2)
    adata = pyro_ldvae.simulate(n_cells=800, n_genes=200, n_latent=5, n_batch=2, seed=0)
    pyro_ldvae.LinearSCVI.setup_anndata(adata, batch_key="batch")
    model = pyro_ldvae.LinearSCVI(adata, n_latent=5, n_hidden=64, seed=0)
    model.train(max_epochs=args.epochs, accelerator="cpu", progress_bar=False, plan_kwargs={"lr": 5e-3})
    model.to_adata(adata)
    sc.pp.neighbors(adata, use_rep="X_ldvae", random_state=0)
    sc.tl.umap(adata, random_state=0)
    top = model.get_factor_variance_explained(sort=True).index[0]

    args.out.mkdir(parents=True, exist_ok=True)
    _save(pyro_ldvae.pl.training_curve(model), args.out / "pl_training_curve.png", args.dpi)
    _save(pyro_ldvae.pl.loadings(model, factors=list(model.get_factor_variance_explained(sort=True).index[:3])),
          args.out / "pl_loadings.png", args.dpi)  # fmt: skip
    _save(pyro_ldvae.pl.variance_explained(model), args.out / "pl_variance_explained.png", args.dpi)
    _save(pyro_ldvae.pl.factor_embedding(adata, top, basis="umap"), args.out / "pl_factor_embedding.png", args.dpi)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    pyro_ldvae.pl.variance_explained(adata, ax=axes[0])
    pyro_ldvae.pl.factor_embedding(adata, top, basis="umap", ax=axes[1])
    fig.tight_layout()
    _save(list(axes), args.out / "pl_combined.png", args.dpi)

    # Gene programs: three annotated programs (20% of listed members false, 20% missing), one free factor.
    programs = pyro_ldvae.simulate(n_cells=800, n_genes=200, n_latent=4, programs=3, program_size=20, seed=1)
    pyro_ldvae.LinearSCVI.setup_anndata(programs)
    program_model = pyro_ldvae.LinearSCVI(programs, gene_programs="programs", n_unannotated=1, n_hidden=64, seed=0)
    program_model.train(max_epochs=args.epochs, accelerator="cpu", progress_bar=False)
    program_model.to_adata(programs)
    sc.pp.neighbors(programs, use_rep="X_ldvae", random_state=0)
    sc.tl.umap(programs, random_state=0)
    _save(pyro_ldvae.pl.program_activity(program_model, "program_0", programs, basis="umap"),
          args.out / "pl_program_activity.png", args.dpi)  # fmt: skip
    _save(pyro_ldvae.pl.program_members(program_model, "program_0"), args.out / "pl_program_members.png", args.dpi)


if __name__ == "__main__":
    main()

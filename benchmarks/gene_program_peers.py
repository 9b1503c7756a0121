"""Gene-program peers on one dataset: expiMap (scArches), MuVI and Spectra, in their own environments.

This script runs inside a peer's virtual environment (their pins clash with ours: MuVI needs
pyro-ppl 1.8, Spectra needs ``pkg_resources``), so it imports nothing from pyro_ldvae. It reads an
h5ad in the layout ``pyro_ldvae.simulate(programs=...)`` writes (counts in ``X``, the noisy
annotation in ``varm['programs']`` with names in ``uns['terms']``) and writes, per program, a
membership score for every gene and an activity for every cell::

    python gene_program_peers.py run expimap DATA.h5ad OUT.npz --seed 0
    python gene_program_peers.py muvi-truth OUT.npz --cells 2000 --genes 600 --programs 6 --seed 0

``muvi-truth`` draws a continuous truth from MuVI's own generator (``muvi.core.synthetic``:
factor scores, loadings and their support); ``benchmarks/gene_programs_compare.py`` turns it into
counts. Environments (see benchmarks/README.md): ``pip install scarches scspectra "setuptools<81"``
for expimap and spectra; ``pip install muvi "pyro-ppl==1.8.6"`` for muvi.

Membership scores: expiMap (``expimap``: soft mask, so genes may enter or leave a term;
``expimap_hard``: the hard mask of its tutorial, genes may only leave) and MuVI: the absolute loading
``|W_gk|``; Spectra: its gene-factor matrix. Activity: the latent mean (expiMap), the factor
scores (MuVI) and the cell scores (Spectra).
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def read(path: str):
    import anndata as ad

    adata = ad.read_h5ad(path)
    mask = np.asarray(adata.varm["programs"], dtype=bool)  # (genes, programs)
    return adata, mask, [str(t) for t in adata.uns["terms"]]


def log_normalised(adata):
    import scanpy as sc

    out = adata.copy()
    sc.pp.normalize_total(out, target_sum=1e4)
    sc.pp.log1p(out)
    return out


def run_expimap(adata, mask, terms, seed: int, epochs: int, soft_mask: bool = True):
    import scarches as sca
    import torch

    torch.manual_seed(seed)
    np.random.seed(seed)
    adata = adata.copy()
    adata.X = adata.X.toarray() if hasattr(adata.X, "toarray") else adata.X
    adata.varm["I"] = mask.astype(np.float32)
    if "batch" not in adata.obs:  # expiMap needs a condition column
        adata.obs["batch"] = "0"
    adata.obs["batch"] = adata.obs["batch"].astype(str)
    # The tutorial's settings; a soft mask lets the data correct the annotation, a hard one cannot add genes.
    model = sca.models.EXPIMAP(
        adata,
        condition_key="batch",
        hidden_layer_sizes=[256, 256, 256],
        recon_loss="nb",
        soft_mask=soft_mask,
        mask_key="I",
    )
    l1 = {"alpha_l1": 0.5} if soft_mask else {}
    model.train(n_epochs=epochs, alpha_epoch_anneal=min(130, epochs), alpha=0.7, alpha_kl=0.5, seed=seed, **l1)
    weights = model.model.decoder.L0.expr_L.weight.detach().cpu().numpy()  # (genes, programs)
    activity = model.get_latent(mean=True)  # (cells, programs)
    return np.abs(weights), np.asarray(activity)


def run_muvi(adata, mask, terms, seed: int, epochs: int):
    import muvi
    import torch

    torch.manual_seed(seed)
    data = log_normalised(adata)
    x = data.X.toarray() if hasattr(data.X, "toarray") else np.asarray(data.X)
    model = muvi.MuVI(
        observations=[x],
        prior_masks=[mask.T],  # (programs, genes)
        prior_confidence="low",
        likelihoods=["normal"],
        device="cpu",
    )
    model.fit(n_epochs=epochs, seed=seed)
    weights = model.get_factor_loadings(as_df=False)
    weights = weights[0] if isinstance(weights, (list, tuple)) else next(iter(weights.values()))
    scores = model.get_factor_scores(as_df=False)
    return np.abs(np.asarray(weights)).T[:, : mask.shape[1]], np.asarray(scores)[:, : mask.shape[1]]


def run_spectra(adata, mask, terms, seed: int, epochs: int):
    import torch
    from Spectra import Spectra as spc

    torch.manual_seed(seed)
    np.random.seed(seed)
    data = log_normalised(adata)
    genes = np.asarray(data.var_names)
    sets = {term: list(genes[mask[:, k]]) for k, term in enumerate(terms)}
    model = spc.est_spectra(
        adata=data,
        gene_set_dictionary=sets,
        use_highly_variable=False,
        use_cell_types=False,
        lam=0.1,
        num_epochs=epochs,
        label_factors=False,
        filter_sets=False,
        clean_gs=False,
    )
    factors = np.asarray(model.factors)  # (factors, genes)
    scores = np.asarray(model.cell_scores)  # (cells, factors)
    return factors.T[:, : mask.shape[1]], scores[:, : mask.shape[1]]


def run_expimap_hard(adata, mask, terms, seed: int, epochs: int):
    return run_expimap(adata, mask, terms, seed, epochs, soft_mask=False)


RUNNERS = {"expimap": run_expimap, "expimap_hard": run_expimap_hard, "muvi": run_muvi, "spectra": run_spectra}
EPOCHS = {"expimap": 400, "expimap_hard": 400, "muvi": 1000, "spectra": 10000}


def muvi_truth(out: str, cells: int, genes: int, programs: int, seed: int) -> None:
    from muvi.core.synthetic import DataGenerator

    generator = DataGenerator(
        n_samples=cells,
        n_features=[genes],
        likelihoods=["normal"],
        n_fully_shared_factors=programs,
        n_partially_shared_factors=0,
        n_private_factors=0,
        factor_size_params=(0.03, 0.08),
    )
    generator.generate(seed=seed)
    np.savez(out, z=np.asarray(generator.z), w=np.asarray(generator.ws[0]), w_mask=np.asarray(generator.w_masks[0]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="fit one peer and write its membership scores and activities")
    run.add_argument("tool", choices=sorted(RUNNERS))
    run.add_argument("data")
    run.add_argument("out")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--epochs", type=int, default=None)
    truth = sub.add_parser("muvi-truth", help="draw a truth from MuVI's generator")
    truth.add_argument("out")
    truth.add_argument("--cells", type=int, default=2000)
    truth.add_argument("--genes", type=int, default=600)
    truth.add_argument("--programs", type=int, default=6)
    truth.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.command == "muvi-truth":
        muvi_truth(args.out, args.cells, args.genes, args.programs, args.seed)
        return
    adata, mask, terms = read(args.data)
    start = time.perf_counter()
    membership, activity = RUNNERS[args.tool](adata, mask, terms, args.seed, args.epochs or EPOCHS[args.tool])
    seconds = time.perf_counter() - start
    np.savez(args.out, membership=membership, activity=activity, seconds=seconds)


if __name__ == "__main__":
    main()

"""Gene programs: recovery on simulations with noisy annotations, and the interferon program on Kang PBMC.

Simulation (``pyro_ldvae.simulate(programs=5)``, 20% of listed members false, 20% of true members
missing, one annotated program with no signal added): per seed, the AUPRC of the refined
membership against the true membership (beside the noisy annotation's own), the correlation of
each program's activity with its true factor, the coverage of the loadings' 90% credible
intervals, and whether the unsupported program switched off.

Kang PBMC (``../shared/data/pbmc_kang_stim_1556.h5ad``, IFN-beta stimulated and control cells):
a type-I interferon program among five immune programs (gene lists from the literature); the
AUROC of the interferon activity for stimulated vs control cells within each cell type, and the
rank of the interferon program in ``differential_program_activity('group_id', 'stim', 'ctrl')``.

    python benchmarks/gene_programs.py --seeds 0 1 2 --threads 1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

import pyro_ldvae

KANG = Path(__file__).resolve().parents[2] / "shared" / "data" / "pbmc_kang_stim_1556.h5ad"
IMMUNE_PROGRAMS = {
    "IFN_type_I": ["ISG15", "IFI6", "IFIT1", "IFIT2", "IFIT3", "MX1", "MX2", "OAS1", "OAS2", "OAS3", "OASL",
                   "ISG20", "IFI44L", "IFI44", "RSAD2", "IFITM3", "LY6E", "STAT1", "IRF7", "XAF1", "HERC5",
                   "IFI35", "EPSTI1", "CMPK2", "BST2", "USP18", "PLSCR1", "SAMD9L", "IFIH1", "DDX58"],
    "T_cell": ["CD3D", "CD3E", "CD3G", "CD2", "CD7", "IL7R", "LCK", "CD247", "CD28", "CD5", "CD6", "TRAT1"],
    "B_cell": ["CD79A", "CD79B", "MS4A1", "CD19", "CD22", "BANK1", "TCL1A", "VPREB3", "FCRLA", "CD72"],
    "myeloid": ["CD14", "LYZ", "S100A8", "S100A9", "FCN1", "CST3", "TYROBP", "FCER1G", "LST1", "AIF1", "CD68"],
    "NK_cytotoxic": ["GNLY", "NKG7", "GZMB", "GZMA", "PRF1", "KLRD1", "CST7", "CTSW", "GZMH", "KLRF1"],
    "MHC_II": ["HLA-DRA", "HLA-DRB1", "HLA-DPA1", "HLA-DPB1", "HLA-DQA1", "HLA-DQB1", "CD74", "HLA-DMA", "HLA-DMB"],
}  # fmt: skip


def simulation(seed: int, epochs: int) -> dict:
    """Fit one simulated dataset with a noisy annotation plus an unsupported program; return the metrics."""
    adata = pyro_ldvae.simulate(
        n_cells=2000, n_genes=300, n_latent=6, programs=5, program_size=30, loadings_density=0.2, seed=seed
    )
    rng = np.random.default_rng(seed + 100)
    annotation = pd.DataFrame(adata.varm["programs"], index=adata.var_names, columns=list(adata.uns["terms"]))
    annotation["unsupported"] = False
    annotation.iloc[rng.choice(adata.n_vars, 20, replace=False), -1] = True
    pyro_ldvae.LinearSCVI.setup_anndata(adata)
    model = pyro_ldvae.LinearSCVI(adata, gene_programs=annotation, n_unannotated=2, seed=seed)
    start = time.perf_counter()
    model.train(max_epochs=epochs, progress_bar=False)
    elapsed = time.perf_counter() - start
    truth = adata.varm["true_programs"]
    n = truth.shape[1]
    membership = model.get_program_membership().to_numpy()
    activity = model.get_program_activity().to_numpy()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        draws = model.module.sample_loadings(300)[..., :n].numpy()  # (draws, genes, programs)
    low, high = np.quantile(draws, [0.05, 0.95], axis=0)
    true_w = adata.varm["true_loadings"][:, :n]
    variance = model.get_factor_variance_explained()["fraction"]
    return {
        "seed": seed,
        "train_s": elapsed,
        "auprc_refined": float(np.mean([average_precision_score(truth[:, k], membership[:, k]) for k in range(n)])),
        "auprc_annotation": float(
            np.mean([average_precision_score(truth[:, k], annotation.iloc[:, k]) for k in range(n)])
        ),
        "activity_corr_median": float(
            np.median([np.corrcoef(activity[:, k], adata.obsm["true_z"][:, k])[0, 1] for k in range(n)])
        ),
        "coverage90": float(((true_w >= low) & (true_w <= high)).mean()),
        "coverage90_members": float(((true_w >= low) & (true_w <= high))[truth].mean()),
        "unsupported_fraction": float(variance["unsupported"]),
        "program_fraction_min": float(variance.iloc[:n].min()),
    }


def kang(epochs: int, seed: int, n_unannotated: int = 4) -> dict:
    """Fit Kang PBMC with the immune programs; interferon activity AUROC per cell type and its DE rank."""
    import anndata

    adata = anndata.read_h5ad(KANG)
    pyro_ldvae.LinearSCVI.setup_anndata(adata)
    model = pyro_ldvae.LinearSCVI(adata, gene_programs=IMMUNE_PROGRAMS, n_unannotated=n_unannotated, seed=seed)
    start = time.perf_counter()
    model.train(max_epochs=epochs, progress_bar=False)
    elapsed = time.perf_counter() - start
    activity = model.get_program_activity()["IFN_type_I"]
    stim = (adata.obs["group_id"].astype(str) == "stim").to_numpy()
    aurocs = {}
    for cell_type, cells in adata.obs.groupby("cluster_id", observed=True).groups.items():
        mask = adata.obs_names.isin(cells)
        if 0 < stim[mask].sum() < mask.sum():
            aurocs[str(cell_type)] = float(roc_auc_score(stim[mask], activity[mask]))
    de = model.differential_program_activity("group_id", "stim", "ctrl")
    return {
        "train_s": elapsed,
        "programs": list(model.get_program_membership(num_samples=100).columns),
        "auroc_by_cell_type": aurocs,
        "de_order": list(de.index),
        "ifn_effect_size": float(de.loc["IFN_type_I", "effect_size"]),
        "called": list(de.index[de["is_de_fdr_0.05"]]),
    }


def main() -> None:
    """Run the simulations (and Kang when its file is there) and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2], help="simulation seeds (none: skip)")
    parser.add_argument("--kang-unannotated", type=int, default=4, help="free factors beside the Kang programs")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-kang", action="store_true")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [simulation(seed, args.epochs) for seed in args.seeds]
    if rows:
        frame = pd.DataFrame(rows).set_index("seed")
        print(frame.round(3).to_string())
        print("mean:\n" + frame.mean().round(3).to_string() + "\nstd:\n" + frame.std().round(3).to_string())
    result = {"simulation": rows}
    if not args.skip_kang and KANG.exists():
        result["kang"] = kang(args.epochs, args.seeds[0] if args.seeds else 0, args.kang_unannotated)
        print(json.dumps(result["kang"], indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

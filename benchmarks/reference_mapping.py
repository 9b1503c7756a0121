"""Reference mapping: label transfer, speed and bit-identity on real data; discovery of new programs.

Parts (``--parts``, default all):

- ``real``: per dataset, a reference is trained on its reference cells, the query is mapped onto
  it (``load_query_data``, frozen reference) and, for comparison, a model is trained on reference
  plus query together. A kNN classifier (k=15) fitted on the reference cells' latent
  representation labels the query cells; accuracy is reported for the mapped query, for a
  mapped query whose encoders adapt too (``train_encoder=True``; the classifier is then fitted
  on that model's representation of the reference cells) and for the joint model, with their
  most frequent confusions. Also: the training times of mapping and joint model (same epochs),
  the epoch from which each one's validation ELBO (averaged over 5 epochs) stays within 1% of
  its final level (the mean of its last 10 epochs), the time the mapping had taken by then, and
  whether the reference's loadings and latent representation are bit-identical after mapping.
  ``pancreas``: Baron et al., four donors, 2,000 highly variable genes of the reference;
  reference on three donors, query the fourth (``--pancreas-donors``).
  ``kang``: Kang et al. PBMC, reference on the control samples, query the stimulated ones.
- ``discovery``: ``simulate_query`` over ``--seeds`` seeds, the reference trained to convergence
  (``--sim-ref-epochs`` with a ``--sim-ref-warmup``-epoch KL warm-up): a query with a program the reference
  lacks, mapped with ``n_new_factors=3`` (active new factors, AUPRC of the program's genes
  against the active factor's |loadings|, novelty AUROC of the cells that express it), and a
  query with nothing new (active new factors).
- ``kang-novelty``: Kang mapped with ``n_new_factors=3`` onto a reference trained on the control
  cells for ``--epochs`` epochs (KL warm-up: the default, or ``--kang-ref-warmup`` epochs):
  novelty AUROC of stimulated against control cells within each cell type, the top genes of the
  strongest new factor.

Results are appended to ``--out`` (JSON lines) as each one is measured.

    PYTHONPATH=. python benchmarks/reference_mapping.py --threads 1 --out reference_mapping.jsonl
"""

from __future__ import annotations

import argparse
import collections
import json
import time

import anndata
import numpy as np
import scanpy as sc
import torch
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.neighbors import KNeighborsClassifier

from pyro_ldvae import LinearSCVI
from pyro_ldvae.api.simulate_query import simulate_query

DATA = "../shared/data"


def record(args, **row) -> None:
    print(json.dumps(row), flush=True)
    with open(args.out, "a") as handle:
        handle.write(json.dumps(row) + "\n")


class EpochClock:
    """A training callback: the wall-clock time at the end of each epoch."""

    def __init__(self):
        self.start, self.ends = time.perf_counter(), []

    def on_epoch_end(self, module, epoch, history) -> None:
        self.ends.append(time.perf_counter() - self.start)


def timed_train(model, epochs: int, args, clock: EpochClock | None = None) -> float:
    start = time.perf_counter()
    if clock is not None:
        clock.start = start
    model.train(max_epochs=epochs, batch_size=128, progress_bar=False, plan_kwargs=args.plan_kwargs,
                callbacks=[clock] if clock is not None else None)  # fmt: skip
    return time.perf_counter() - start


def settled(model, clock: EpochClock, tolerance: float = 0.01, window: int = 5) -> tuple[int | None, float | None]:
    """The epoch (1-based) from which the validation ELBO, averaged over the last ``window`` epochs
    (a query's few validation cells make single epochs noisy), stays within ``tolerance`` of its
    final level (the mean of the last 10 epochs), and the seconds training had taken by the end of
    that epoch; None if even the last epoch is further away."""
    elbo = model.history["elbo_validation"].to_numpy().ravel()
    smooth = np.array([elbo[max(0, i + 1 - window) : i + 1].mean() for i in range(len(elbo))])
    final = elbo[-10:].mean()
    within = np.abs(smooth - final) <= tolerance * abs(final)
    epoch = next((i for i in range(len(elbo)) if within[i:].all()), None)
    return (None, None) if epoch is None else (epoch + 1, clock.ends[epoch])


def knn_labels(ref_latent, ref_labels, query_latent) -> np.ndarray:
    return KNeighborsClassifier(n_neighbors=15).fit(ref_latent, ref_labels).predict(query_latent)


def confusions(true, predicted, n: int = 4) -> list[str]:
    """The ``n`` most frequent wrong labels, as 'true > predicted: count'."""
    wrong = collections.Counter((t, p) for t, p in zip(np.asarray(true), predicted) if t != p)
    return [f"{t} > {p}: {count}" for (t, p), count in wrong.most_common(n)]


def map_and_compare(name: str, ref: anndata.AnnData, query: anndata.AnnData, batch_key: str, label_key: str, args):
    ref, query = ref.copy(), query.copy()
    LinearSCVI.setup_anndata(ref, batch_key=batch_key)
    reference = LinearSCVI(ref, n_latent=args.n_latent, seed=0)
    ref_seconds = timed_train(reference, args.epochs, args)
    loadings, latent = reference.get_loadings(), reference.get_latent_representation()
    mapped = LinearSCVI.load_query_data(query, reference)
    map_clock = EpochClock()
    map_seconds = timed_train(mapped, args.epochs, args, map_clock)
    identical = bool(
        mapped.get_loadings().equals(loadings) and np.array_equal(mapped.get_latent_representation(ref), latent)
    )
    labels_map = knn_labels(latent, ref.obs[label_key], mapped.get_latent_representation())
    # the encoders adapt too: the reference cells' factors move, so the classifier is fitted on
    # the query model's representation of them
    adapted = LinearSCVI.load_query_data(query.copy(), reference, train_encoder=True)
    timed_train(adapted, args.epochs, args)
    labels_adapted = knn_labels(
        adapted.get_latent_representation(ref), ref.obs[label_key], adapted.get_latent_representation()
    )
    both = anndata.concat([ref, query])
    both.uns.pop("_pyro_ldvae_setup", None)
    LinearSCVI.setup_anndata(both, batch_key=batch_key)
    joint = LinearSCVI(both, n_latent=args.n_latent, seed=0)
    joint_clock = EpochClock()
    joint_seconds = timed_train(joint, args.epochs, args, joint_clock)
    joint_latent = joint.get_latent_representation()
    is_ref = np.r_[np.ones(ref.n_obs, bool), np.zeros(query.n_obs, bool)]
    labels_joint = knn_labels(joint_latent[is_ref], ref.obs[label_key], joint_latent[~is_ref])
    truth = query.obs[label_key].to_numpy()
    map_settled, map_settled_seconds = settled(mapped, map_clock)
    joint_settled, _ = settled(joint, joint_clock)
    record(
        args, part="real", dataset=name, n_ref=ref.n_obs, n_query=query.n_obs, epochs=args.epochs,
        accuracy_mapped=round(float((labels_map == truth).mean()), 4),
        accuracy_joint=round(float((labels_joint == truth).mean()), 4),
        accuracy_mapped_train_encoder=round(float((labels_adapted == truth).mean()), 4),
        confusions_mapped=confusions(truth, labels_map), confusions_joint=confusions(truth, labels_joint),
        confusions_mapped_train_encoder=confusions(truth, labels_adapted),
        seconds_reference=round(ref_seconds, 1), seconds_map=round(map_seconds, 1),
        seconds_joint=round(joint_seconds, 1), speedup=round(joint_seconds / map_seconds, 2),
        map_settled_epoch=map_settled, seconds_map_settled=round(map_settled_seconds, 1),
        joint_settled_epoch=joint_settled, speedup_settled=round(joint_seconds / map_settled_seconds, 2) if map_settled_seconds else None,
        reference_bit_identical=identical,
    )  # fmt: skip


def hvg(adata: anndata.AnnData, n_top: int) -> list[str]:
    """The ``n_top`` most variable genes (scanpy's 'seurat' flavour on log-normalised counts)."""
    norm = adata.copy()
    sc.pp.normalize_total(norm, target_sum=1e4)
    sc.pp.log1p(norm)
    sc.pp.highly_variable_genes(norm, n_top_genes=n_top)
    return list(norm.var_names[norm.var["highly_variable"]])


def part_real(args) -> None:
    if "pancreas" in args.datasets:
        adata = anndata.read_h5ad(f"{DATA}/pancreas_baron_human_2142.h5ad")
        adata.obs["donor"] = adata.obs["donor"].astype(str)
        for donor in args.pancreas_donors:
            is_query = (adata.obs["donor"] == donor).to_numpy()
            genes = hvg(adata[~is_query], 2000)
            ref, query = adata[~is_query, genes].copy(), adata[is_query, genes].copy()
            map_and_compare(f"pancreas query={donor}", ref, query, "donor", "cell_type1", args)
    if "kang" in args.datasets:
        adata = kang()
        is_query = (adata.obs["group_id"] == "stim").to_numpy()
        map_and_compare("kang query=stim", adata[~is_query].copy(), adata[is_query].copy(), "sample_id",
                        "cluster_id", args)  # fmt: skip


def kang() -> anndata.AnnData:
    adata = anndata.read_h5ad(f"{DATA}/pbmc_kang_stim_1556.h5ad")
    for key in ("sample_id", "group_id", "cluster_id"):
        adata.obs[key] = adata.obs[key].astype(str)
    return adata


def fit_new_factors(ref, query, batch_key: str, args, seed: int = 0, ref_epochs: int | None = None,
                    ref_warmup: int | None = None):  # fmt: skip
    LinearSCVI.setup_anndata(ref, batch_key=batch_key)
    reference = LinearSCVI(ref, n_latent=args.n_latent_sim if batch_key == "batch" else args.n_latent, seed=seed)
    if ref_epochs is None:
        timed_train(reference, args.epochs, args)
    else:  # trained to convergence: a reference's own misfit is what new factors would otherwise absorb
        reference.train(max_epochs=ref_epochs, batch_size=128, progress_bar=False,
                        plan_kwargs={**args.plan_kwargs, "n_epochs_kl_warmup": ref_warmup or None})  # fmt: skip
    mapped = LinearSCVI.load_query_data(query, reference, n_new_factors=3, new_factor_encoder=args.encoder)
    timed_train(mapped, args.query_epochs, args)
    return reference, mapped


def part_discovery(args) -> None:
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for novel in (True, False):
            ref, query = simulate_query(seed=seed, novel=novel, n_latent=args.n_latent_sim)
            _, mapped = fit_new_factors(ref, query, "batch", args, seed, args.sim_ref_epochs, args.sim_ref_warmup)
            activity = mapped.get_new_factor_activity()
            row = dict(part="discovery", seed=seed, novel=novel, encoder=args.encoder, ref_epochs=args.sim_ref_epochs,
                       n_active=int(activity["active"].sum()), relative=activity["relative"].round(3).tolist())  # fmt: skip
            if novel:
                strongest = activity["relative"].idxmax()
                loadings = mapped.get_loadings()[strongest].abs()
                row["auprc"] = round(float(average_precision_score(query.var["program"], loadings)), 4)
                novelty = mapped.get_novelty()
                row["novelty_auroc"] = round(float(roc_auc_score(query.obs["novel"], novelty)), 4)
                z_norm = np.abs(mapped.get_latent_representation()[:, -3:]).sum(1)
                row["z_new_norm_auroc"] = round(float(roc_auc_score(query.obs["novel"], z_norm)), 4)
            record(args, **row)


def part_kang_novelty(args) -> None:
    adata = kang()
    ref_epochs = None if args.kang_ref_warmup is None else args.epochs  # None: timed, the default warm-up
    _, mapped = fit_new_factors(adata[adata.obs["group_id"] == "ctrl"].copy(), adata, "sample_id", args,
                                ref_epochs=ref_epochs, ref_warmup=args.kang_ref_warmup)  # fmt: skip
    novelty = mapped.get_novelty()
    activity = mapped.get_new_factor_activity()
    strongest = activity["relative"].idxmax()
    aurocs = {}
    for cell_type, frame in adata.obs.groupby("cluster_id", observed=True):
        rows = adata.obs_names.get_indexer(frame.index)
        aurocs[cell_type] = round(float(roc_auc_score(frame["group_id"] == "stim", novelty[rows])), 4)
    top = mapped.get_loadings()[strongest].sort_values(ascending=False)
    record(args, part="kang-novelty", ref_epochs=args.epochs, ref_warmup=args.kang_ref_warmup, relative=activity["relative"].round(3).tolist(), auroc_by_type=aurocs,
           top_genes=list(top.index[:15]))  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["real", "discovery", "kang-novelty"])
    parser.add_argument("--datasets", nargs="+", default=["pancreas", "kang"])
    parser.add_argument("--pancreas-donors", nargs="+", default=["human1", "human2", "human3", "human4"])
    parser.add_argument("--epochs", type=int, default=200, help="epochs of reference, mapping and joint models")
    parser.add_argument("--query-epochs", type=int, default=200, help="epochs of a query with new factors")
    parser.add_argument("--n-latent", type=int, default=10)
    parser.add_argument("--n-latent-sim", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--sim-ref-epochs", type=int, default=300, help="epochs of the simulated reference")
    parser.add_argument("--sim-ref-warmup", type=int, default=150, help="its KL warm-up epochs (0: none)")
    parser.add_argument("--kang-ref-warmup", type=int, default=None,
                        help="KL warm-up epochs of the Kang reference (0: none; default: the model's default)")  # fmt: skip
    parser.add_argument("--encoder", default="separate", choices=["heads", "separate"])
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="reference_mapping.jsonl")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.plan_kwargs = {"lr": args.lr}
    for part in args.parts:
        {"real": part_real, "discovery": part_discovery, "kang-novelty": part_kang_novelty}[part](args)


if __name__ == "__main__":
    main()

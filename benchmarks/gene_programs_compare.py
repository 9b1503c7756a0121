"""Gene programs side by side: pyro_ldvae, expiMap, MuVI and Spectra on the same simulated counts.

Two simulators, so that no tool is graded on its home ground only:

- ``ours``: ``pyro_ldvae.simulate(programs=...)``, counts from the LDVAE generative model;
- ``muvi``: MuVI's own generator (``muvi.core.synthetic.DataGenerator``, run in MuVI's
  environment) gives factor scores ``z`` and sparse loadings ``W``; counts are drawn here as
  ``NB(l * softmax(z W + b), theta=5)`` with a log-normal library ``l`` and gene baseline ``b``.

Both write the same noisy annotation beside the truth (``noisy_annotation``: a fraction of the
listed members false, a fraction of the true members missing). Each tool gets the counts and the
noisy annotation; metrics, per program then summarised over programs:

- membership AUPRC: the tool's membership score of every gene against the true membership
  (the noisy annotation itself is the baseline row ``annotation``);
- activity correlation: ``|pearson|`` between the program's activity per cell and the true factor.

Peers run in their own virtual environments through ``benchmarks/gene_program_peers.py``::

    python3 -m venv /tmp/venv-peers && /tmp/venv-peers/bin/pip install torch==2.13.0 scarches scspectra "setuptools<81"
    python3 -m venv /tmp/venv-muvi && /tmp/venv-muvi/bin/pip install torch==2.13.0 muvi "pyro-ppl==1.8.6" "setuptools<81"
    python benchmarks/gene_programs_compare.py --seeds 0 1 2 --peers-python /tmp/venv-peers/bin/python \\
        --muvi-python /tmp/venv-muvi/bin/python

A tool whose environment is not given, or that fails, is reported as such, with its error.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.metrics import average_precision_score

import pyro_ldvae
from pyro_ldvae.api.simulate import noisy_annotation

HERE = Path(__file__).resolve().parent
PEERS = ("expimap", "expimap_hard", "muvi", "spectra")


def our_data(seed: int, cells: int, genes: int, programs: int, noise: float):
    adata = pyro_ldvae.simulate(
        n_cells=cells,
        n_genes=genes,
        n_latent=programs,
        programs=programs,
        program_size=max(10, genes // 20),
        false_member_fraction=noise,
        missing_member_fraction=noise,
        seed=seed,
    )
    return adata, np.asarray(adata.varm["true_programs"], bool), np.asarray(adata.obsm["true_z"])[:, :programs]


def muvi_data(seed: int, cells: int, genes: int, programs: int, noise: float, muvi_python: str, workdir: Path):
    import anndata as ad

    truth_path = workdir / f"muvi_truth_{seed}.npz"
    subprocess.run(
        [muvi_python, str(HERE / "gene_program_peers.py"), "muvi-truth", str(truth_path), "--cells", str(cells)]
        + ["--genes", str(genes), "--programs", str(programs), "--seed", str(seed)],
        check=True,
        capture_output=True,
    )
    truth = np.load(truth_path)
    z, w, support = truth["z"], truth["w"], truth["w_mask"].astype(bool)  # (cells, K), (K, genes), (K, genes)
    rng = np.random.default_rng(1000 + seed)
    logits = z @ w + rng.normal(0.0, 1.0, size=genes)
    rho = np.exp(logits - logits.max(axis=1, keepdims=True))
    rho /= rho.sum(axis=1, keepdims=True)
    library = np.exp(rng.normal(7.5, 0.3, size=(cells, 1)))
    mean, theta = library * rho, 5.0
    counts = rng.poisson(rng.gamma(theta, mean / theta)).astype(np.float32)  # NB as a Gamma-Poisson mixture
    adata = ad.AnnData(sp.csr_matrix(counts))
    adata.var_names = [f"gene_{g}" for g in range(genes)]
    members = support.T  # (genes, programs)
    adata.varm["true_programs"] = members
    adata.varm["programs"] = noisy_annotation(members, noise, noise, rng)
    adata.uns["terms"] = np.asarray([f"program_{k}" for k in range(programs)])
    return adata, members, z


def fit_ours(adata, seed: int, epochs: int | None):
    start = time.perf_counter()
    adata = adata.copy()
    pyro_ldvae.LinearSCVI.setup_anndata(adata)
    model = pyro_ldvae.LinearSCVI(adata, gene_programs="programs", n_unannotated=2)
    options = {"seed": seed, "progress_bar": False}
    model.train(max_epochs=epochs, **options) if epochs else model.train(**options)
    membership = model.get_program_membership().to_numpy()  # (genes, programs)
    activity = model.get_program_activity().to_numpy()  # (cells, programs)
    return membership, activity, time.perf_counter() - start


def fit_peer(tool: str, python: str, path: Path, seed: int, epochs: int | None, workdir: Path):
    out = workdir / f"{tool}_{seed}.npz"
    command = [python, str(HERE / "gene_program_peers.py"), "run", tool, str(path), str(out), "--seed", str(seed)]
    done = subprocess.run(command + (["--epochs", str(epochs)] if epochs else []), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}")
    result = np.load(out)
    return result["membership"], result["activity"], float(result["seconds"])


def scores(membership: np.ndarray, activity: np.ndarray | None, truth: np.ndarray, z: np.ndarray) -> dict:
    n_programs = truth.shape[1]
    auprc = [average_precision_score(truth[:, k], membership[:, k]) for k in range(n_programs)]
    row = {"auprc_mean": float(np.mean(auprc)), "auprc_min": float(np.min(auprc))}
    if activity is not None:
        corr = [abs(np.corrcoef(activity[:, k], z[:, k])[0, 1]) for k in range(n_programs)]
        row["activity_corr_median"] = float(np.nanmedian(corr))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--simulators", nargs="+", default=["ours", "muvi"], choices=["ours", "muvi"])
    parser.add_argument("--tools", nargs="+", default=["pyro_ldvae", *PEERS], choices=["pyro_ldvae", *PEERS])
    parser.add_argument("--cells", type=int, default=2000)
    parser.add_argument("--genes", type=int, default=600)
    parser.add_argument("--programs", type=int, default=6)
    parser.add_argument("--noise", type=float, default=0.2, help="false and missing member fraction")
    parser.add_argument("--epochs", type=int, default=None, help="ours; default: the package's default")
    parser.add_argument("--peer-epochs", type=int, default=None, help="default: each peer's own")
    parser.add_argument("--peers-python", default=None, help="python of the expiMap/Spectra environment")
    parser.add_argument("--muvi-python", default=None, help="python of the MuVI environment")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="CSV of every run")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    pythons = {"expimap": args.peers_python, "expimap_hard": args.peers_python, "spectra": args.peers_python}
    pythons["muvi"] = args.muvi_python
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for simulator in args.simulators:
            if simulator == "muvi" and not args.muvi_python:
                print("muvi simulator: skipped (no --muvi-python)", file=sys.stderr)
                continue
            for seed in args.seeds:
                if simulator == "ours":
                    adata, truth, z = our_data(seed, args.cells, args.genes, args.programs, args.noise)
                else:
                    adata, truth, z = muvi_data(
                        seed, args.cells, args.genes, args.programs, args.noise, args.muvi_python, workdir
                    )
                path = workdir / f"{simulator}_{seed}.h5ad"
                adata.write_h5ad(path)
                base = {"simulator": simulator, "seed": seed}
                annotation = np.asarray(adata.varm["programs"], float)
                rows.append({**base, "tool": "annotation", **scores(annotation, None, truth, z), "seconds": 0.0})
                for tool in args.tools:
                    try:
                        if tool == "pyro_ldvae":
                            membership, activity, seconds = fit_ours(adata, seed, args.epochs)
                        elif pythons[tool] is None:
                            rows.append({**base, "tool": tool, "error": "no environment given"})
                            continue
                        else:
                            membership, activity, seconds = fit_peer(
                                tool, pythons[tool], path, seed, args.peer_epochs, workdir
                            )
                        rows.append(
                            {**base, "tool": tool, **scores(membership, activity, truth, z), "seconds": seconds}
                        )
                    except Exception as error:  # a peer failing is a result to report, not a crash
                        rows.append({**base, "tool": tool, "error": f"{type(error).__name__}: {error}"[:200]})
                    print(rows[-1], flush=True)
    frame = pd.DataFrame(rows)
    if args.out:
        frame.to_csv(args.out, index=False)
    metrics = [c for c in ("auprc_mean", "auprc_min", "activity_corr_median", "seconds") if c in frame]
    ok = frame[frame.get("error", pd.Series(index=frame.index, dtype=object)).isna()] if "error" in frame else frame
    summary = ok.groupby(["simulator", "tool"])[metrics].agg(["median", "min", "max"]).round(3)
    print(summary.to_string())
    if "error" in frame:
        for _, row in frame[frame["error"].notna()].iterrows():
            print(f"{row['simulator']} seed {row['seed']} {row['tool']}: {row['error']}")


if __name__ == "__main__":
    main()

"""Gene programs: calibration and power of ``differential_program_activity``, and the cost of the program prior.

Calibration: simulated datasets (``pyro_ldvae.simulate(programs=4)``, noisy annotations) whose
cells are split at random into groups A and B, so no program truly differs; every call at
``fdr_target=0.05`` is false. Reported: the fraction of datasets with any call and the mean
fraction of programs called.

Power: the same simulations with counts redrawn from the true parameters after adding half a
standard deviation (0.5; true activities are standard Normal) to group A's activity of
``--n-shifted`` programs. Reported: the fraction of shifted programs called and the false
discovery proportion among the calls.

Cost: the program model against the default (unconstrained) ``LinearSCVI`` with the same number
of factors, on the same simulation: held-out ELBO per cell (half of the cells held out) and
training seconds per epoch (the median epoch), fitted alternately in one run. Speed: the
default, horseshoe and program models alternated twice for a short run without KL warm-up,
seconds per epoch and held-out ELBO of each.

    python benchmarks/program_calibration.py --part null --datasets 20 --threads 1 --out null.jsonl
    python benchmarks/program_calibration.py --part power --datasets 10 --threads 1 --out power.jsonl
    python benchmarks/program_calibration.py --part cost --datasets 3 --threads 1 --out cost.jsonl
    python benchmarks/program_calibration.py --part speed --datasets 1 --epochs 30 --threads 1 --out speed.jsonl
    python benchmarks/program_calibration.py --summarise null.jsonl power.jsonl cost.jsonl

Each dataset's result is appended to ``--out`` as one JSON line as soon as it is done, so a part
can be split over processes with ``--first-seed`` and the files summarised together.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData

import pyro_ldvae

SHIFT = 0.5  # in standard deviations of the true activity, which is standard Normal
FDR_TARGET = 0.05
CALL = f"is_de_fdr_{FDR_TARGET}"


def simulated(seed: int, n_cells: int, n_genes: int, n_programs: int) -> AnnData:
    """A simulation with ``n_programs`` programs (noisy annotations) and one factor outside them."""
    return pyro_ldvae.simulate(
        n_cells=n_cells,
        n_genes=n_genes,
        n_latent=n_programs + 1,
        programs=n_programs,
        program_size=30,
        loadings_density=0.2,
        seed=seed,
    )


def redraw_counts(adata: AnnData, z: np.ndarray, seed: int) -> AnnData:
    """``adata`` with counts drawn afresh from its true parameters at activities ``z``.

    The LDVAE likelihood with one batch: ``mu = exp(l) softmax(z W^T + b)``, counts
    ``NB(mu, theta)`` drawn as a Gamma-Poisson mixture.
    """
    rng = np.random.default_rng(seed)
    logits = z @ adata.varm["true_loadings"].T + adata.var["true_intercept"].to_numpy()
    rho = np.exp(logits - logits.max(1, keepdims=True))
    rho /= rho.sum(1, keepdims=True)
    mu = np.exp(adata.obs["true_library"].to_numpy())[:, None] * rho
    theta = adata.var["true_theta"].to_numpy()
    counts = rng.poisson(rng.gamma(theta, mu / theta)).astype(np.float32)
    out = adata.copy()
    out.X = sp.csr_matrix(counts)
    out.obsm["true_z"] = z
    return out


def fit(
    adata: AnnData, seed: int, epochs: int, programs: bool, kl_warmup: bool = True
) -> tuple[pyro_ldvae.LinearSCVI, float]:
    """A program model (or the default model with as many factors) trained for ``epochs``; seconds taken.

    ``kl_warmup=False`` trains on the full ELBO from the first epoch (the default warm-up lasts
    400 epochs, so a shorter run never optimises the ELBO that is compared).
    """
    pyro_ldvae.LinearSCVI.setup_anndata(adata)
    n_programs = len(adata.uns["terms"])
    if programs:
        model = pyro_ldvae.LinearSCVI(adata, gene_programs="programs", n_unannotated=1, seed=seed)
    else:
        model = pyro_ldvae.LinearSCVI(adata, n_latent=n_programs + 1, seed=seed)
    start = time.perf_counter()
    plan = {} if kl_warmup else {"plan_kwargs": {"n_epochs_kl_warmup": None}}
    model.train(max_epochs=epochs, progress_bar=False, **plan)
    return model, time.perf_counter() - start


def null_dataset(seed: int, args: argparse.Namespace) -> dict:
    """Calibration: programs called between two random halves of the cells."""
    adata = simulated(seed, args.n_cells, args.n_genes, args.n_programs)
    adata.obs["group"] = np.where(np.random.default_rng(seed + 1000).random(adata.n_obs) < 0.5, "A", "B")
    model, _ = fit(adata, seed, args.epochs, programs=True)
    de = model.differential_program_activity("group", "A", "B", fdr_target=FDR_TARGET)
    return {
        "seed": seed,
        "n_programs": len(de),
        "n_called": int(de[CALL].sum()),
        "max_proba_de": float(de["proba_de"].max()),
        "max_abs_effect": float(de["effect_size"].abs().max()),
    }


def power_dataset(seed: int, args: argparse.Namespace) -> dict:
    """Power: group A's true activity of the first ``n_shifted`` programs raised by ``SHIFT``."""
    base = simulated(seed, args.n_cells, args.n_genes, args.n_programs)
    in_a = np.random.default_rng(seed + 1000).random(base.n_obs) < 0.5
    z = base.obsm["true_z"].copy()
    shifted = list(base.uns["terms"][: args.n_shifted])
    z[np.ix_(in_a, np.arange(args.n_shifted))] += SHIFT
    adata = redraw_counts(base, z, seed + 2000)
    adata.obs["group"] = np.where(in_a, "A", "B")
    model, _ = fit(adata, seed, args.epochs, programs=True)
    de = model.differential_program_activity("group", "A", "B", fdr_target=FDR_TARGET)
    called = set(de.index[de[CALL]])
    return {
        "seed": seed,
        "shifted": shifted,
        "called": sorted(called),
        "n_true_called": len(called & set(shifted)),
        "n_false_called": len(called - set(shifted)),
        "effect_shifted": [float(de.loc[name, "effect_size"]) for name in shifted],
        "proba_shifted": [float(de.loc[name, "proba_de"]) for name in shifted],
    }


def cost_dataset(seed: int, args: argparse.Namespace) -> dict:
    """Held-out ELBO and seconds per epoch, program model and default model fitted alternately."""
    adata = simulated(seed, 2 * args.n_cells, args.n_genes, args.n_programs)
    train, held_out = adata[: args.n_cells].copy(), adata[args.n_cells :].copy()
    row = {"seed": seed, "kl_warmup": not args.no_kl_warmup}
    for name, programs in (("programs", True), ("default", False)):
        model, seconds = fit(train, seed, args.epochs, programs, kl_warmup=not args.no_kl_warmup)
        row[f"elbo_{name}"] = float(model.get_elbo(held_out))
        # the median epoch, so the first epoch's one-off set-up does not count
        row[f"s_per_epoch_{name}"] = float(np.median(model.history["train_time"].to_numpy()))
        row[f"train_s_{name}"] = seconds
    return row


def speed_dataset(seed: int, args: argparse.Namespace) -> dict:
    """Seconds per epoch and held-out ELBO of the default, horseshoe and program models, alternated twice.

    All three train on the full ELBO from the first epoch (no KL warm-up), so they optimise the
    same objective; each model's time is the median epoch after the first two.
    """
    adata = simulated(seed, 2 * args.n_cells, args.n_genes, args.n_programs)
    train, held_out = adata[: args.n_cells].copy(), adata[args.n_cells :].copy()
    pyro_ldvae.LinearSCVI.setup_anndata(train)
    n_latent = len(adata.uns["terms"]) + 1
    settings = {
        "default": {"n_latent": n_latent},
        "horseshoe": {"n_latent": n_latent, "loadings_prior": "horseshoe"},
        "programs": {"gene_programs": "programs", "n_unannotated": 1},
    }
    row: dict = {"seed": seed}
    for _ in range(2):
        for name, kwargs in settings.items():
            model = pyro_ldvae.LinearSCVI(train, seed=seed, **kwargs)
            model.train(max_epochs=args.epochs, progress_bar=False, plan_kwargs={"n_epochs_kl_warmup": None})
            row.setdefault(f"s_per_epoch_{name}", []).append(float(np.median(model.history["train_time"][2:])))
            row.setdefault(f"elbo_{name}", []).append(float(model.get_elbo(held_out)))
    return row


def summarise(paths: list[str]) -> None:
    """Print the tables of the JSON-lines results in ``paths`` (the part is read from each row)."""
    rows = [json.loads(line) for path in paths for line in Path(path).read_text().splitlines() if line.strip()]
    rows = list(
        {(r["part"], r["seed"], r.get("kl_warmup"), r["epochs"]): r for r in rows}.values()
    )  # a dataset run twice counts once
    parts = {part: pd.DataFrame([r for r in rows if r["part"] == part]) for part in ("null", "power", "cost", "speed")}
    null, power, cost = parts["null"], parts["power"], parts["cost"]
    if len(null):
        fraction = null["n_called"] / null["n_programs"]
        print(
            f"null ({len(null)} datasets): datasets with any call {(null['n_called'] > 0).mean():.3f}; "
            f"mean fraction of programs called {fraction.mean():.4f} (sd {fraction.std():.4f}); "
            f"max proba_de median {null['max_proba_de'].median():.3f}, max {null['max_proba_de'].max():.3f}; "
            f"max |effect| median {null['max_abs_effect'].median():.3f}"
        )
    if len(power):
        n_shifted = power["shifted"].map(len).sum()
        calls = power["n_true_called"] + power["n_false_called"]
        fdp = (power["n_false_called"] / calls.clip(lower=1)).mean()
        effects = np.concatenate(power["effect_shifted"].to_list())
        print(
            f"power ({len(power)} datasets, {n_shifted} shifted programs): called {power['n_true_called'].sum()}"
            f"/{n_shifted} = {power['n_true_called'].sum() / n_shifted:.3f}; false calls "
            f"{power['n_false_called'].sum()} of {calls.sum()}; mean false discovery proportion {fdp:.3f}; "
            f"effect size of shifted programs {effects.mean():.3f} (sd {effects.std():.3f})"
        )
    if len(cost):
        cost["kl_warmup"] = (
            cost["kl_warmup"].astype(object).where(cost["kl_warmup"].notna(), True) if "kl_warmup" in cost else True
        )
        print(cost.drop(columns="part").round(4).to_string(index=False))
        for (epochs, warmup), group in cost.groupby(["epochs", "kl_warmup"]):
            gap = (group["elbo_programs"] - group["elbo_default"]) / group["elbo_default"].abs()
            ratio = group["s_per_epoch_programs"] / group["s_per_epoch_default"]
            print(
                f"cost ({len(group)} datasets, {epochs} epochs, KL warm-up {warmup}): held-out ELBO gap (programs - default) / |default| "
                f"{gap.mean():+.4f} (sd {gap.std():.4f}); time per epoch ratio {ratio.mean():.2f} (sd {ratio.std():.2f})"
            )

    for row in parts["speed"].to_dict("records"):
        print(
            f"speed (seed {row['seed']}, {row['epochs']} epochs, no KL warm-up, two alternations): "
            + "; ".join(
                f"{name} {row[f's_per_epoch_{name}']} s/epoch, held-out ELBO {[round(e) for e in row[f'elbo_{name}']]}"
                for name in ("default", "horseshoe", "programs")
            )
        )


def main() -> None:
    """Run one part over its datasets, appending each result to ``--out``; or summarise result files."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["null", "power", "cost", "speed"], default="null")
    parser.add_argument("--datasets", type=int, default=20)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--n-cells", type=int, default=1000)
    parser.add_argument("--n-genes", type=int, default=300)
    parser.add_argument("--n-programs", type=int, default=4)
    parser.add_argument("--n-shifted", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--no-kl-warmup", action="store_true", help="cost: train on the full ELBO throughout")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="append one JSON line per dataset here")
    parser.add_argument("--summarise", nargs="+", metavar="JSONL", help="print the tables of these result files")
    args = parser.parse_args()
    if args.summarise:
        summarise(args.summarise)
        return
    torch.set_num_threads(args.threads)
    run = {"null": null_dataset, "power": power_dataset, "cost": cost_dataset, "speed": speed_dataset}[args.part]
    for seed in range(args.first_seed, args.first_seed + args.datasets):
        row = {"part": args.part, "epochs": args.epochs, **run(seed, args)}
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as handle:
                handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()

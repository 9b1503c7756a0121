"""Held-out ELBO of pyro_ldvae against scvi-tools' LinearSCVI over several seeds, paired by seed.

The validation ELBO after a given epoch moves by 1-2% from one epoch to the next and from one
seed to the next, in both libraries (benchmarks/README.md). One run's difference says little;
this script trains both libraries once per seed (``benchmark_train.py``'s workers: the same data,
split, threads, batch size and epochs) and prints, per seed and as mean +- standard error over
seeds, the relative difference ``(ours - scvi) / scvi`` of the held-out negative ELBO after the
last epoch and of the validation curve's mean over the last 3 and 5 epochs.

python benchmarks/elbo_seeds.py --dataset cbmc --epochs 20 --seeds 8 --threads 1
python benchmarks/elbo_seeds.py --from-log saved.txt   # re-summarise the 'seed' lines of a run
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchmark_train  # noqa: E402


def differences(ours: dict, scvi: dict) -> dict[str, float]:
    """Relative differences in percent, (ours - scvi) / |scvi|, of one seed's two runs (the means
    take all epochs when there are fewer than 3 or 5)."""
    o, s = np.asarray(ours["val_curve"]), np.asarray(scvi["val_curve"])
    gap = lambda a, b: 100 * (a - b) / abs(b)  # noqa: E731
    return {
        "after the last epoch": gap(ours["held_out"], scvi["held_out"]),
        "mean of the last 3 epochs": gap(o[-3:].mean(), s[-3:].mean()),
        "mean of the last 5 epochs": gap(o[-5:].mean(), s[-5:].mean()),
    }


def summarise(pairs: dict[int, dict[str, dict]]) -> str:
    rows = {seed: differences(runs["ours"], runs["scvi"]) for seed, runs in sorted(pairs.items())}
    keys = list(next(iter(rows.values())))
    lines = ["| seed | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {seed} | " + " | ".join(f"{row[k]:+.2f}%" for k in keys) + " |" for seed, row in rows.items()]
    table = np.array([[row[k] for k in keys] for row in rows.values()])
    sem = table.std(0, ddof=1) / np.sqrt(len(table)) if len(table) > 1 else np.full(len(keys), np.nan)
    lines.append(
        f"| mean +- s.e. ({len(table)} seeds) | "
        + " | ".join(f"{m:+.2f}% +- {e:.2f}%" for m, e in zip(table.mean(0), sem))
        + " |"
    )
    return "held-out -ELBO, (ours - scvi) / |scvi|\n" + "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=sorted(benchmark_train.DATASETS), default="cbmc")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seeds", type=int, default=8, help="seeds 0 .. seeds-1")
    parser.add_argument("--from-log", default=None, help="re-summarise the 'seed' lines of a saved run")
    args = parser.parse_args()
    pairs: dict[int, dict[str, dict]] = {}
    if args.from_log:
        for line in Path(args.from_log).read_text().splitlines():
            if line.startswith("seed "):
                _, seed, library = line.split(": ", 1)[0].split()
                pairs.setdefault(int(seed), {})[library] = json.loads(line.split(": ", 1)[1])
    else:
        if args.dataset == "sim100k":
            benchmark_train.simulated_path()
        for seed in range(args.seeds):
            run_args = benchmark_train.build_parser().parse_args(
                [f"--dataset={args.dataset}", f"--epochs={args.epochs}", f"--threads={args.threads}", f"--seed={seed}"]
            )
            for library in ("ours", "scvi"):
                run = benchmark_train.spawn(library, run_args)
                pairs.setdefault(seed, {})[library] = run
                print(f"seed {seed} {library}: {json.dumps(run)}", flush=True)
        print()
    print(summarise(pairs))


if __name__ == "__main__":
    main()

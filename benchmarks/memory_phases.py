"""Resident memory at each phase of an on-disk (backed='r') session, to see what grows with cells.

For each phase it prints the RSS after the phase and the peak RSS during it (the peak is reset
between phases through /proc/self/clear_refs, so Linux only). With ``--trace`` it also prints
tracemalloc's figures (numpy and Python allocations; torch's own are not traced) and the source
lines whose allocations grew most in the phase. Run it on two files (e.g. 100k and 1M cells, as
written by benchmark_backed.py) and compare phase by phase.

Examples
--------
OMP_NUM_THREADS=1 python benchmarks/memory_phases.py /tmp/pyro_ldvae_bench/sim_1000000.h5ad
OMP_NUM_THREADS=1 python benchmarks/memory_phases.py sim_100000.h5ad --trace --max-steps 50
"""

from __future__ import annotations

import argparse
import gc
import shutil
import tempfile
import time
import tracemalloc


def rss_mb() -> tuple[float, float]:
    """(current, peak since the last reset) resident memory in MB."""
    with open("/proc/self/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


class Phases:
    """Prints one line per phase; ``trace`` adds tracemalloc's view."""

    def __init__(self, trace: bool):
        self.trace = trace
        self.previous = None
        if trace:
            tracemalloc.start()

    def end(self, name: str) -> None:
        gc.collect()
        now, peak = rss_mb()
        line = f"{name:28s} RSS {now:6.0f} MB, peak during phase {peak:6.0f} MB"
        if self.trace:
            traced, traced_peak = tracemalloc.get_traced_memory()
            line += f" | traced {traced / 2**20:6.1f} MB, peak {traced_peak / 2**20:6.1f} MB"
        print(line, flush=True)
        if self.trace:
            snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
            if self.previous is not None:
                for stat in snapshot.compare_to(self.previous, "lineno")[:5]:
                    if abs(stat.size_diff) >= 1 << 20:
                        frame = stat.traceback[0]
                        where = frame.filename.split("site-packages/")[-1]
                        print(f"    {stat.size_diff / 2**20:+8.1f} MB  {where}:{frame.lineno}")
            self.previous = snapshot
            tracemalloc.reset_peak()
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # resets the peak (VmHWM) for the next phase


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help=".h5ad file, opened with backed='r'")
    parser.add_argument("--trace", action="store_true", help="also report tracemalloc (slower)")
    parser.add_argument("--max-steps", type=int, default=None, help="stop the epoch after this many steps")
    args = parser.parse_args()

    import anndata
    import torch

    from pyro_ldvae import LinearSCVI
    from pyro_ldvae.data.backed import BackedCellData
    from pyro_ldvae.infer.evaluate import evaluate_elbo

    torch.set_num_threads(1)
    phases = Phases(args.trace)
    phases.end("imports")
    adata = anndata.read_h5ad(args.path, backed="r")
    phases.end("read_h5ad(backed='r')")
    LinearSCVI.setup_anndata(adata)
    phases.end("setup_anndata")
    model = LinearSCVI(adata, seed=0)
    phases.end("LinearSCVI()")
    if args.max_steps is not None:
        full_epoch = BackedCellData.iter_epoch

        def first_steps(self, *a, **k):
            for step, minibatch in enumerate(full_epoch(self, *a, **k)):
                if step == args.max_steps:
                    return
                yield minibatch

        BackedCellData.iter_epoch = first_steps
    start = time.perf_counter()
    model.train(max_epochs=1, batch_size=128, accelerator="cpu", progress_bar=False, check_val_every_n_epoch=10**9)
    phases.end(f"train 1 epoch ({time.perf_counter() - start:.0f} s)")
    evaluate_elbo(model.module, model._cells(None), model.validation_indices)
    phases.end("validation ELBO")
    z = model.get_latent_representation(batch_size=4096)
    phases.end("get_latent_representation")
    del z
    model.to_adata()
    phases.end("to_adata")
    folder = tempfile.mkdtemp()
    try:
        model.save(f"{folder}/model")
        phases.end("save")
    finally:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()

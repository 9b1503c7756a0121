"""Our training loop against a minimal ``lightning.Trainer`` driving the very same step.

Both drive one ``TracedStep`` (the replayed CPU step) over the same simulated cells, minibatches
and optimizer; Lightning runs with manual optimisation, no logger, checkpointing, progress bar
or validation, and hands the minibatch through unchanged (``transfer_batch_to_device``). A
second pair drives a step that does nothing, which isolates each loop's own cost per step: the
cost that a CUDA-graph step (a replay is one call) would pay on top of its replay. Runs
alternate (ours, Lightning, ours, ...) on a shared machine; the best epoch of each counts.

python benchmarks/loop_overhead.py --threads 2 --cells 5120 --genes 2000 --epochs 4 --repeats 3
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cells", type=int, default=5120)
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    import lightning.pytorch as lp

    from pyro_ldvae import LinearSCVI, simulate
    from pyro_ldvae.data.cells import CellData
    from pyro_ldvae.data.registry import get_registry
    from pyro_ldvae.data.sources import minibatch_source
    from pyro_ldvae.infer.plan import TrainingPlan, make_optimizer
    from pyro_ldvae.infer.policy import planned_step_kinds
    from pyro_ldvae.infer.steps import TracedStep

    adata = simulate(n_cells=args.cells, n_genes=args.genes, seed=0)
    LinearSCVI.setup_anndata(adata)
    model = LinearSCVI(adata, n_latent=10, seed=0)
    cells = CellData(adata, get_registry(adata))
    train_idx, batch = np.arange(args.cells), 128
    plan = TrainingPlan(n_epochs_kl_warmup=None)
    module = model.module.train()
    optimizer = make_optimizer(module, plan)
    planned = planned_step_kinds(plan, 0, 1000, len(train_idx), batch)
    step = TracedStep(module, optimizer, module.elbo, len(train_idx), torch.device("cpu"), planned_steps=planned)
    source = minibatch_source(cells, train_idx, batch, form=step.form)
    generator = torch.Generator().manual_seed(0)
    n_steps = len(train_idx) // batch
    step.begin_epoch(1.0)
    for mb in source(generator):  # records the graph
        step(mb)

    def noop(mb) -> None:
        pass

    def ours(take) -> float:
        best = np.inf
        for _ in range(args.epochs):
            start = time.perf_counter()
            step.begin_epoch(1.0)
            for i, mb in enumerate(source(generator)):
                take(mb)
                if (i + 1) % 100 == 0 and not torch.isfinite(step.loss_sum + step.elbo_sum):
                    break
            bool(torch.isfinite(step.loss_sum + step.elbo_sum))
            best = min(best, time.perf_counter() - start)
        return best / n_steps

    class Epoch:
        def __iter__(self):
            return source(generator)

    class Module(lp.LightningModule):
        def __init__(self, take):
            super().__init__()
            self.automatic_optimization = False
            self.inner, self.take = module, take

        def configure_optimizers(self):
            return optimizer

        def transfer_batch_to_device(self, batch, device, dataloader_idx):
            return batch

        def training_step(self, mb, batch_idx):
            self.take(mb)

    class Timer(lp.Callback):
        def __init__(self):
            self.best = np.inf

        def on_train_epoch_start(self, trainer, pl_module):
            step.begin_epoch(1.0)
            self.start = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module):
            bool(torch.isfinite(step.loss_sum + step.elbo_sum))
            self.best = min(self.best, time.perf_counter() - self.start)

    def lightning(take) -> float:
        timer = Timer()
        trainer = lp.Trainer(
            max_epochs=args.epochs,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            callbacks=[timer],
        )
        trainer.fit(Module(take), train_dataloaders=Epoch())
        return timer.best / n_steps

    results = {key: [] for key in ("ours traced", "lightning traced", "ours no-op", "lightning no-op")}
    for _ in range(args.repeats):
        results["ours traced"].append(ours(step))
        results["lightning traced"].append(lightning(step))
        results["ours no-op"].append(ours(noop))
        results["lightning no-op"].append(lightning(noop))
    print(f"{args.cells} cells x {args.genes} genes, {batch} per step, {args.threads} threads, best epoch of each run")
    for key, times in results.items():
        print(f"{key:18s} ms/step: " + ", ".join(f"{1e3 * t:.3f}" for t in times) + f"  (min {1e3 * min(times):.3f})")


if __name__ == "__main__":
    main()

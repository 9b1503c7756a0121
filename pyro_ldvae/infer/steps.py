"""Step strategies: how one SVI step is taken, apart from the loop that takes them.

Each strategy declares the minibatch form it consumes (``form``, see ``data.sources``) and keeps
the epoch's running sums of the loss and the per-cell ELBO in tensors it owns, updated in place
(a CUDA graph writes to fixed addresses). The loop calls ``begin_epoch(kl_weight)`` and then the
strategy with every item its source yields (with a KL warm-up by step, ``set_kl_weight`` before
each step); ``policy.choose_step`` picks the strategy.

- ``EagerStep``: Pyro's program, ``backward`` and Adam, op by op from Python.
- ``TracedStep``: on CPU, gradients from a graph of the step recorded once and replayed
  (``traced_step``); minibatches it does not take, and failed recordings, go eagerly.
- ``GraphedStep``: on a GPU, the whole step (gather, ELBO, backward, Adam) replayed as a CUDA graph
  for every full minibatch (``cuda_graph``); an epoch's last, smaller minibatch goes eagerly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import pyro
import torch

from ..data.minibatch import Minibatch
from ..data.sources import MinibatchForm, ResidentMinibatches
from ..models.ldvae import LDVAE
from .cuda_graph import GraphedTrainingStep
from .policy import StepKind
from .traced_step import TracedTrainingStep


class EagerStep:
    """One SVI step as Pyro runs it: loss ``-ELBO / n_train``, backward, optional clipping, Adam."""

    form: ClassVar[MinibatchForm] = "csr"

    def __init__(
        self,
        module: LDVAE,
        optimizer: torch.optim.Optimizer,
        elbo_fn: Callable,
        n_train: int,
        device: torch.device,
        gradient_clip_val: float | None = None,
        source: Callable | None = None,
        planned_steps: dict[tuple[int, bool], int] | None = None,
    ):
        self.module, self.optimizer, self.elbo_fn, self.n_train = module, optimizer, elbo_fn, n_train
        self.gradient_clip_val = gradient_clip_val
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.elbo_sum = torch.zeros((), device=device)  # the epoch's per-cell ELBO
        self.loss_sum = torch.zeros((), device=device)  # the epoch's loss, checked for NaN/inf by the loop
        self.kl_weight: float | torch.Tensor = 1.0

    def begin_epoch(self, kl_weight: float) -> None:
        """Zero the running sums and set the epoch's KL warm-up weight."""
        self.elbo_sum.zero_()
        self.loss_sum.zero_()
        self.kl_weight = kl_weight

    def set_kl_weight(self, kl_weight: float) -> None:
        """Set the KL weight of the steps to come (a warm-up by step, ``n_steps_kl_warmup``)."""
        self.kl_weight = kl_weight

    def __call__(self, mb: Minibatch) -> None:
        """Take one step on ``mb`` with the current KL weight."""
        self.take(mb, self.kl_weight)

    def take(self, mb: Minibatch, kl_weight: float | torch.Tensor) -> None:
        """One whole step on ``mb``: gradients, clipping, Adam, running sums."""
        self.optimizer.zero_grad(set_to_none=True)
        loss, step_elbo = self.gradients(mb, kl_weight)
        if self.gradient_clip_val is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.gradient_clip_val)
        self.optimizer.step()
        self.elbo_sum.add_(step_elbo)
        self.loss_sum.add_(loss)

    def gradients(self, mb: Minibatch, kl_weight: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Set each parameter's ``.grad``; return the loss and the minibatch's ELBO sum, detached."""
        with pyro.validation_enabled(False):  # argument checks cost a host sync each; divergence is caught apart
            elbo, per_cell = self.elbo_fn(mb, n_obs=self.n_train, kl_weight=kl_weight)
        loss = -elbo / self.n_train
        loss.backward()
        return loss.detach(), per_cell.detach().sum()


class TracedStep(EagerStep):
    """The eager step with its gradients replayed from a recorded graph where one applies."""

    form: ClassVar[MinibatchForm] = "sparse_counts"

    def __init__(self, module: LDVAE, *args, planned_steps: dict[tuple[int, bool], int] | None = None, **kwargs):
        super().__init__(module, *args, **kwargs)
        self.traced = TracedTrainingStep(module, self.n_train, planned_steps)

    def gradients(self, mb: Minibatch, kl_weight: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss and gradients on ``mb``, from the replayed graph when it accepts ``mb``, else eagerly."""
        replayed = self.traced(mb, kl_weight) if self.traced.accepts(mb) else None
        return replayed if replayed is not None else super().gradients(mb, kl_weight)


class GraphedStep(EagerStep):
    """The eager step captured as a CUDA graph, which gathers each full minibatch from its positions."""

    form: ClassVar[MinibatchForm] = "positions"

    def __init__(self, module: LDVAE, *args, source: ResidentMinibatches, **kwargs):
        super().__init__(module, *args, **kwargs)
        self.source, self.batch_size = source, source.batch_size
        source.resident.capacity(self.batch_size)  # read once here, not inside the capture
        self.graph = GraphedTrainingStep(
            lambda positions, kl_weight: self.take(source.minibatch(positions), kl_weight),
            self.batch_size,
            self.elbo_sum.device,
        )

    def begin_epoch(self, kl_weight: float) -> None:
        """Start an epoch at ``kl_weight``, in the captured graph too."""
        super().begin_epoch(kl_weight)
        self.graph.set_kl_weight(kl_weight)

    def set_kl_weight(self, kl_weight: float) -> None:
        """Set the KL weight of the steps to come, in the captured graph too."""
        super().set_kl_weight(kl_weight)
        self.graph.set_kl_weight(kl_weight)  # the graph's input tensor, filled in place: no host copy

    def __call__(self, positions: torch.Tensor) -> None:
        """Take one step on ``positions``: the captured graph for a full minibatch, an eager step otherwise."""
        if len(positions) == self.batch_size:  # a shape, known on the host: no sync
            self.graph(positions)
        else:
            self.take(self.source.minibatch(positions), self.kl_weight)


STEPS: dict[StepKind, type[EagerStep]] = {"eager": EagerStep, "traced": TracedStep, "cuda_graph": GraphedStep}

"""One SVI training step captured as a CUDA graph, replayed for every full-size minibatch.

Why: on a GPU one step of this model is a few hundred small kernels (encoders, Pyro's traces of
guide and model, the ELBO terms, backward, Adam). Launching them one by one from Python costs
milliseconds of host time while the GPU finishes each kernel in microseconds, so the GPU mostly
waits. A CUDA graph (``torch.cuda.CUDAGraph``) records the launches of one step once and
replays all of them with a single call.

The rules a captured model follows are stated in ``models.capture``; here is how the training
step around the model follows them:

- no host synchronisation (no ``.item()``, no shapes that depend on values): the counts are
  resident on the GPU and each minibatch is gathered inside the graph by a static index tensor,
  as a dense ``(cells, genes)`` block: one row gather from a dense matrix, or from CSR a gather
  into a fixed number of slots (``DeviceCells.fixed_shape_rows``);
- no host-to-device copy (a Python number made into a device tensor is one): the model builds
  its distributions from tensors, and the KL warm-up weight is a device tensor set once an epoch;
- fixed shapes: only full-size minibatches replay; an epoch's last, smaller one runs eagerly;
- Adam's step count on the device (``torch.optim.Adam(capturable=True)``).

Random draws (the reparameterised z, dropout, the loadings drawn from the guide of a Bayesian
model) stay random: PyTorch advances the CUDA generator's offset on every replay. Which models
are captured is decided by ``policy.choose_step`` from ``models.capture``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)

# Eager steps on a side stream before the capture, as PyTorch's whole-network capture recipe
# asks: they initialise lazily created state (Adam's moments, cuBLAS workspaces) outside the graph.
WARMUP_STEPS = 3


def warn_eager_fallback(attempt: str, failure: str, option: str) -> None:
    """Warn that ``attempt`` failed with ``failure`` and that training goes on with eager steps."""
    warnings.warn(
        f"Could not {attempt} ({failure}); training goes on with eager steps. Pass {option}=False to skip the attempt.",
        RuntimeWarning,
        stacklevel=4,
    )


class GraphedTrainingStep:
    """Run ``step(positions, kl_weight)`` as a replayed CUDA graph for ``batch_size`` positions.

    ``step`` does one whole SVI step (minibatch gather, ELBO, backward, optimizer) and keeps its
    running sums in tensors it owns, updated in place. The first ``WARMUP_STEPS`` calls run it
    eagerly on a side stream; the next captures it and replays; every later call copies the
    positions into the graph's static input and replays. If the capture fails, a warning names
    the reason and every step runs eagerly from then on: training goes on, only slower.
    """

    def __init__(self, step: Callable[[torch.Tensor, torch.Tensor], None], batch_size: int, device: torch.device):
        self.step = step
        self.batch_size = batch_size
        self.positions = torch.zeros(batch_size, dtype=torch.int64, device=device)  # the graph's static input
        self.kl_weight = torch.zeros((), device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.failure: str | None = None
        self._warmup_left = WARMUP_STEPS

    def set_kl_weight(self, kl_weight: float) -> None:
        """Set the KL weight the captured graph reads, in place."""
        self.kl_weight.fill_(kl_weight)  # a kernel with the number as argument: no host copy

    def __call__(self, positions: torch.Tensor) -> None:
        """Take one step on the cells at ``positions``: warm-up steps on a side stream, then capture, then replay."""
        self.positions.copy_(positions)
        if self._warmup_left > 0:
            self._warmup_left -= 1
            side = torch.cuda.Stream(device=self.positions.device)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.step(self.positions, self.kl_weight)
            torch.cuda.current_stream().wait_stream(side)
            return
        if self.graph is None and self.failure is None:
            self._capture()
        if self.graph is not None:
            self.graph.replay()  # also right after the capture, which records the step without running it
        else:
            self.step(self.positions, self.kl_weight)

    def _capture(self) -> None:
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.step(self.positions, self.kl_weight)
        except Exception as error:  # noqa: BLE001 - any failure falls back to eager steps
            self.failure = f"{type(error).__name__}: {error}"
            warn_eager_fallback("capture the training step as a CUDA graph", self.failure, "cuda_graphs")
            torch.cuda.synchronize()
            return
        self.graph = graph
        logger.info("Training step captured as a CUDA graph (%d cells per minibatch).", self.batch_size)

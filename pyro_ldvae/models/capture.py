"""The rules a model must follow for its training step to be replayed from a graph.

A replayed step (a CUDA graph on a GPU, a recorded graph of torch ops on CPU, see
``infer.steps``) runs the ops that one eager step dispatched, with no Python around them. The
step is therefore replayable only if the program it runs:

- builds every distribution from tensors, not from Python numbers (``dist.Normal(0.0, 1.0)``
  makes a tensor from a number: on a GPU, a host-to-device copy that a graph cannot hold);
- reads no value back to the host (no ``.item()``, ``bool(tensor)``, ``if tensor > 0``);
- makes no shape that depends on values (no ``x[mask]``, ``nonzero``, ``unique``).

``tests/test_cuda_graph.py`` scans the training step of every built-in model and prior for each
of these on CPU. A prior of the user's own is not scanned, so a model that holds one trains
eagerly; so does a subclass of a built-in prior, which may override what was scanned.
"""

from __future__ import annotations

from . import priors
from .program_prior import ProgramPrior

# The priors whose programs the scan covers; the loadings and z priors of a replayable model.
SCANNED_PRIORS = (
    priors.NormalLoadings,
    priors.LaplaceLoadings,
    priors.Horseshoe,
    priors.ARD,
    priors.LearnedScaleNormal,
    priors.GaussianMixture,
    ProgramPrior,
)


def capturable(prior: object | None) -> bool:
    """Whether a model with this prior can be replayed: no prior, or exactly a scanned built-in one."""
    return prior is None or type(prior) in SCANNED_PRIORS


def eager_reasons(module: object) -> list[str]:
    """Why the training step of ``module`` (an ``LDVAE``) must run eagerly; empty when it may be replayed."""
    if capturable(getattr(module, "loadings_prior", None)) and capturable(getattr(module, "z_prior", None)):
        return []
    return ["a prior other than the built-in ones runs eagerly (it may build tensors or compute in Python)"]

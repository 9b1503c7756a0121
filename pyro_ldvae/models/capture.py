"""The rules a model must follow for its training step to be replayed from a graph.

A replayed step (a CUDA graph on a GPU, a recorded graph of torch ops on CPU, see
``infer.steps``) runs the ops that one eager step dispatched, with no Python around them. The
step is therefore replayable only if the program it runs:

- builds every distribution from tensors, not from Python numbers (``dist.Normal(0.0, 1.0)``
  makes a tensor from a number: on a GPU, a host-to-device copy that a graph cannot hold; on CPU
  the number is recorded as a constant, which is harmless);
- reads no value back to the host (no ``.item()``, ``bool(tensor)``, ``if tensor > 0``);
- makes no shape that depends on values (no ``x[mask]``, ``nonzero``, ``unique``);
- does the same at every step: no state kept in Python (a step counter) and no random draws
  outside torch (``numpy.random``, ``random``), which a replay would freeze at the recorded step.

``tests/test_cuda_graph.py`` scans the training step of every built-in model and prior for the
first three on CPU. A prior of the user's own (or a subclass of a built-in one, which may
override what was scanned) is scanned when training starts (``prior_hazards``): its sample
sites are drawn and scored twice from one seed under a dispatch mode that records every op
breaking a rule; one that breaks a rule trains eagerly, and the warning names the rule.
"""

from __future__ import annotations

from typing import Literal

import pyro
import torch
from torch.utils._python_dispatch import TorchDispatchMode

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

Replay = Literal["cpu", "cuda"]

HOST_NUMBERS = "build every distribution from tensors, not from Python numbers (a host-to-device copy on a GPU)"
HOST_READ = "read no value back to the host (no .item(), bool(tensor), if tensor > 0)"
VALUE_SHAPES = "make no shape that depends on values (no x[mask], nonzero, unique)"
SAME_EVERY_STEP = (
    "do the same at every step (no state kept in Python, no random draws outside torch such as numpy.random)"
)

# The ops that break each rule, by their schema name; x[mask] is found apart (an index by a bool tensor).
_RULE_OF_OP = {
    **dict.fromkeys(("aten::lift_fresh", "aten::lift_fresh_copy"), HOST_NUMBERS),
    **dict.fromkeys(("aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal"), HOST_READ),
    **dict.fromkeys(
        ("aten::nonzero", "aten::masked_select", "aten::unique", "aten::_unique2", "aten::repeat_interleave"),
        VALUE_SHAPES,
    ),
}


class RuleScan(TorchDispatchMode):
    """Records, op by op, which capture rule each dispatched op breaks (``found``: rule -> op names)."""

    def __init__(self):
        super().__init__()
        self.found: dict[str, set[str]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        """Note the rule that ``func`` breaks, if any, then run it."""
        name = func._schema.name
        rule = _RULE_OF_OP.get(name)
        if rule == HOST_NUMBERS and args and isinstance(args[0], torch.Tensor) and args[0].numel() == 0:
            rule = None  # Pyro asks torch.tensor(()).device: no data to copy
        masked = name in ("aten::index", "aten::index_put", "aten::index_put_") and any(
            i is not None and i.dtype == torch.bool for i in args[1]
        )
        if masked:
            rule, name = VALUE_SHAPES, f"{name} (boolean mask)"
        if rule is not None:
            self.found.setdefault(rule, set()).add(name)
        return func(*args, **(kwargs or {}))


def capturable(prior: object | None) -> bool:
    """Whether a prior is known to follow the rules: no prior, or exactly a scanned built-in one."""
    return prior is None or type(prior) in SCANNED_PRIORS


def prior_hazards(module: object, replay: Replay) -> list[str]:
    """List the capture rules that the priors of ``module`` (an ``LDVAE``) break.

    For a ``replay`` on 'cpu' (a recorded graph) or 'cuda' (a CUDA graph), each as a message
    naming the rule. Built-in priors are known to follow them. A prior of the user's own is run
    (its sample sites drawn and scored) twice from one seed under ``RuleScan``, with the global
    random state restored afterwards; the results must be equal (the same at every step). On
    CPU, tensors made from Python numbers are recorded as constants and break nothing.
    """
    loadings_prior, z_prior = getattr(module, "loadings_prior", None), getattr(module, "z_prior", None)
    if capturable(loadings_prior) and capturable(z_prior):
        return []
    scan = RuleScan()
    try:
        first, second = (_run_priors(module, scan) for _ in range(2))
    except Exception as error:  # noqa: BLE001 - a prior that cannot run outside training is not scanned
        return [f"its priors could not be scanned outside a training step ({type(error).__name__}: {error})"]
    rules = [rule for rule in (HOST_READ, VALUE_SHAPES, HOST_NUMBERS) if rule in scan.found]
    if replay == "cpu" and HOST_NUMBERS in rules:
        rules.remove(HOST_NUMBERS)
    messages = [f"a prior must {rule}; it calls {', '.join(sorted(scan.found[rule]))}" for rule in rules]
    if len(first) != len(second) or not all(torch.equal(a, b) for a, b in zip(first, second)):
        messages.append(f"a prior must {SAME_EVERY_STEP}; two runs from one seed gave different values")
    return messages


def _run_priors(module, scan: RuleScan) -> list[torch.Tensor]:
    """Run the priors from seed 0: their sample sites, log-densities and a z drawn from z's prior."""
    # Argument checks off, as in a training step (each would read a value back to the host).
    with torch.random.fork_rng(devices=[]), torch.no_grad(), pyro.poutine.block(), pyro.validation_enabled(False):
        torch.manual_seed(0)
        with scan:
            trace = pyro.poutine.trace(module.global_latents).get_trace()
            values: list[torch.Tensor] = []
            for site in trace.nodes.values():
                if site["type"] == "sample":
                    values += [site["value"], site["fn"].log_prob(site["value"])]
            loadings, z_prior = trace.nodes["_RETURN"]["value"]
            if loadings is not None:
                values.append(loadings)
            if z_prior is not None:
                z = z_prior.sample()
                values += [z, z_prior.log_prob(z)]
    return [v.detach() for v in values]


def eager_reasons(module: object, replay: Replay = "cuda") -> list[str]:
    """List why the training step of ``module`` (an ``LDVAE``) must run eagerly; empty when it may be replayed.

    ``replay`` is 'cpu' (the recorded step) or 'cuda' (a CUDA graph).
    """
    return prior_hazards(module, replay)

"""The policy that picks how a training step is taken: eager, replayed on CPU, or a CUDA graph.

A run takes one kind of step (``StepKind``), chosen here once from the options, the device, the
model (``models.capture``: only models that follow the device rules are replayed), whether the
counts are resident on the device, and how many steps the run plans. The chosen step declares
the minibatch form it consumes (``steps.STEPS[kind].form``), from which the source is built.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch

from ..models.capture import eager_reasons
from ..models.ldvae import LDVAE
from .plan import TrainingPlan

StepKind = Literal["eager", "traced", "cuda_graph"]

# Recording the CPU step as a graph (traced_step), and importing torch's tracing machinery once
# per process, repay only over many replayed steps: by default a run records only when it plans
# at least this many steps.
TRACED_STEP_MIN_STEPS = 1000


def _replay_wanted(
    option: str, value: bool | None, reasons: list[str], module: LDVAE, replay: Literal["cpu", "cuda"], due: bool
) -> bool:
    """``value`` of the option ``option`` against the ``reasons`` it cannot be met; ``True`` unmet is an error.

    The model's own reasons (``models.capture``: a prior that breaks a capture rule) are looked
    for only when nothing else rules the replay out; when the replay is ``due`` by default, they
    are warned about (naming the rule) and the run takes eager steps.
    """
    if value is not False and not reasons:
        reasons = eager_reasons(module, replay)
        if reasons and value is None and due:
            warnings.warn(
                f"The training step runs eagerly, not replayed ({option}): {'; '.join(reasons)}. "
                f"Pass {option}=False to silence this.",
                RuntimeWarning,
                stacklevel=5,
            )
    if value and reasons:
        raise ValueError(f"{option}=True cannot be met: {'; '.join(reasons)}. Pass {option}=None or False.")
    return value is not False and not reasons


def _distributed(ddp: object | None) -> list[str]:
    return ["distributed training runs eagerly"] if ddp is not None else []


def use_cuda_graphs(
    cuda_graphs: bool | None,
    module: LDVAE,
    resident: bool,
    device: torch.device,
    ddp: object | None,
    plan: TrainingPlan | None = None,
) -> bool:
    """Whether to replay the training step as a CUDA graph; ``True`` that cannot be met is an error."""
    reasons = [] if plan is None else plan.graph_reasons()
    if device.type != "cuda":
        reasons.append("it needs a CUDA device")
    if not resident:
        reasons.append("it needs the counts resident on the GPU (data_on_device; in-memory data that fit)")
    return _replay_wanted("cuda_graphs", cuda_graphs, reasons + _distributed(ddp), module, "cuda", True)


def use_traced_step(
    traced_step: bool | None, module: LDVAE, device: torch.device, ddp: object | None, planned_steps: int
) -> bool:
    """Whether to replay the CPU training step from a recorded graph; ``True`` that cannot be met is an error.

    By default only for runs of at least ``TRACED_STEP_MIN_STEPS`` minibatches, which repay the recording.
    """
    reasons = [] if device.type == "cpu" else ["it runs on CPU (on CUDA the step is a CUDA graph, see cuda_graphs)"]
    due = planned_steps >= TRACED_STEP_MIN_STEPS
    wanted = _replay_wanted("traced_step", traced_step, reasons + _distributed(ddp), module, "cpu", due)
    return wanted and (traced_step is not None or due)


def choose_step(
    cuda_graphs: bool | None,
    traced_step: bool | None,
    module: LDVAE,
    device: torch.device,
    ddp: object | None,
    resident: bool,
    planned_steps: int,
    plan: TrainingPlan | None = None,
) -> StepKind:
    """The kind of step a run takes; an option set to True that cannot be met is an error."""
    graphed = use_cuda_graphs(cuda_graphs, module, resident, device, ddp, plan)
    traced = use_traced_step(traced_step, module, device, ddp, planned_steps)
    return "cuda_graph" if graphed else "traced" if traced else "eager"


def planned_step_kinds(
    plan: TrainingPlan, start_epoch: int, max_epochs: int, n_train: int, batch_size: int, drop_last: bool = False
) -> dict[tuple[int, bool], int]:
    """How many steps of each ``(cells, KL weight is 0)`` kind the epochs to come will take.

    ``TracedTrainingStep`` records a graph only for kinds that repay the recording. The sizes are those
    ``data.sources.minibatch_indices`` yields: full minibatches, then the rest unless it is one cell or
    ``drop_last``. With a KL warm-up by step, the weight is 0 at most in the run's first step
    (``min_kl_weight=0``) or throughout (``max_kl_weight=0``).
    """
    rest = n_train % batch_size
    sizes = [batch_size] * (n_train // batch_size) + ([rest] if rest > 1 and not drop_last else [])
    planned: dict[tuple[int, bool], int] = {}
    for epoch in range(start_epoch, max_epochs):
        masked = plan.kl_weight(epoch) == 0 if not plan.by_step else plan.max_kl_weight == 0
        for size in sizes:
            planned[size, masked] = planned.get((size, masked), 0) + 1
    if (
        plan.by_step
        and plan.max_kl_weight != 0
        and start_epoch == 0 < max_epochs
        and sizes
        and plan.kl_weight(0, 0) == 0
    ):
        planned[sizes[0], False] -= 1  # the run's first step: weight 0
        planned[sizes[0], True] = 1
    return planned

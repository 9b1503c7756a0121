"""The CPU training step recorded once as a graph of aten ops and replayed for every minibatch.

Why: at batch size 128 on CPU, about half of a step's time is Python rather than arithmetic:
Pyro's traces of guide and model, the module calls, and the autograd engine walking a few
hundred nodes (benchmarks/README.md has the figures). ``make_fx`` runs one real step on fake tensors (the
guide, the model, the ELBO and ``torch.autograd.grad``) and records every aten op it
dispatches, forward and backward. Replaying the recording runs the same ops on the next
minibatch without the Python around them, from TorchScript's interpreter (``script_replay``).

The Pyro program stays the single source of truth: the graph is recorded from it at the start of
each training run. A replayed step runs the eager step's ops in the eager order, random draws
included (the graph draws from torch's generator in the same order), so it gives the eager
step's loss, gradients and batch-norm statistics bit for bit (``tests/test_traced_step.py``,
on simulated data and on cbmc's counts).

What the graph takes:
- the trainable parameters, and the fixed tensors: the buffers and the frozen parameters
  (``requires_grad=False``, as a query model's reference parts); batch norm's running statistics
  are updated in place by the graph, as by the eager step;
- the minibatch as plain tensors, its counts as ``SparseCounts`` (CSR and its transpose);
- the KL warm-up weight, as a 0-dim float64 tensor (a weight of 0 has graphs of its own,
  which take None instead, see ``TracedTrainingStep``).

Every shape is fixed at recording except the number of non-zeros, which stays symbolic: one graph
serves every minibatch of its size, and another one is recorded for an epoch's last, smaller
minibatch if training runs for long enough to repay it. Adam and gradient clipping run after
the graph, as after the eager step's backward.

When: see ``policy.use_traced_step``. If the recording fails, a warning names the reason and
training goes on eagerly.
"""

from __future__ import annotations

import logging
import operator
import typing
import warnings
from collections.abc import Callable

import pyro
import torch
from torch.utils import _pytree as pytree

from ..data.minibatch import Minibatch
from ..kernels.sparse import SparseCounts, is_sparse_counts
from ..models.ldvae import LDVAE
from .cuda_graph import warn_eager_fallback

logger = logging.getLogger(__name__)


class _Elbo(torch.nn.Module):
    """``module.elbo`` as a forward, for ``torch.func.functional_call``."""

    def __init__(self, module: LDVAE):
        super().__init__()
        self.module = module

    def forward(self, mb: Minibatch, n_obs: int, kl_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.module.elbo(mb, n_obs=n_obs, kl_weight=kl_weight)


class TracedTrainingStep:
    """Loss, per-cell ELBO sum and gradients of one SVI step, replayed from a recorded graph.

    Call it with a minibatch it ``accepts`` (sparse counts on CPU) and the KL weight: it sets each
    parameter's ``.grad`` and returns ``(loss, elbo_sum)``, or None when the caller must take an
    eager step. A graph is recorded per minibatch size and per kind of KL weight (0, where the
    eager step masks the z terms out, or positive, where it scales them by a tensor input), at
    most ``MAX_GRAPHS``. ``planned_steps`` says how many steps of each kind, ``(cells, weight is
    0)``, the run will take: only those of at least ``MIN_REPLAYS`` are recorded, since a
    recording costs about as much as a few hundred replays save. Training for a few epochs thus leaves the epoch's last,
    smaller minibatch eager, and the first epoch's KL weight of 0 too on a small dataset.
    Without ``planned_steps`` every kind is recorded when first asked for.
    """

    MAX_GRAPHS = 4
    MIN_REPLAYS = 200

    def __init__(self, module: LDVAE, n_obs: int, planned_steps: dict[tuple[int, bool], int] | None = None):
        self.module, self.n_obs, self.planned_steps = module, n_obs, planned_steps
        named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
        self.param_names, self.params = [n for n, _ in named], [p for _, p in named]
        # Inputs the graph reads but does not differentiate: buffers and frozen parameters.
        fixed = list(module.named_buffers()) + [(n, p) for n, p in module.named_parameters() if not p.requires_grad]
        self.buffer_names, self.buffers = [n for n, _ in fixed], [b for _, b in fixed]
        self.elbo = _Elbo(module)
        # by (number of cells, z terms masked out: KL weight 0)
        self.graphs: dict[tuple[int, bool], torch.fx.GraphModule] = {}
        self.replays: dict[tuple[int, bool], Callable] = {}
        self.failure: str | None = None

    def accepts(self, mb: Minibatch) -> bool:
        """Whether ``mb`` can be replayed: sparse counts on the CPU, and no recording has failed."""
        return self.failure is None and is_sparse_counts(mb.x) and mb.x.device.type == "cpu"

    def __call__(self, mb: Minibatch, kl_weight: float) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Replay the step on ``mb``, recording its graph first if due. None: take an eager step.

        At KL weight 0 (the first epoch of the warm-up) the eager step leaves the z terms out
        (``module.kl_warmup``); a graph that multiplied them by a weight of 0 would give gradients
        that differ by float rounding, so weight 0 has graphs of its own, recorded with the
        terms masked out as in the eager step.
        """
        masked = float(kl_weight) == 0.0
        key = (mb.n_cells, masked)
        replay = self.replays.get(key)
        if replay is None and not self._worth_recording(key):
            return None
        counts = mb.x if isinstance(mb.x, SparseCounts) else SparseCounts.from_torch_csr(mb.x)
        if counts.val.shape[0] < 2:  # the recording assumes at least 2 non-zeros (torch's 0/1 specialisation)
            return None
        # The weight enters as a 0-dim float64 tensor, as exact as the eager step's Python float
        # (a float32 weight changed the z terms' gradients by rounding on some minibatches, see
        # test_replayed_training_on_real_counts_equals_eager_training); None (weight 0) masks
        # the z terms out.
        weight = None if masked else torch.tensor(kl_weight, dtype=torch.float64)
        data = (counts.tensors(), mb.batch, mb.labels, mb.cat_covs, mb.cont_covs, mb.idx, weight)
        if replay is None:
            replay = self._record(counts, data, key)
            if replay is None:
                return None
        with torch.no_grad():
            loss, elbo_sum, grads = replay(self.params, self.buffers, data)
        for param, grad in zip(self.params, grads):
            param.grad = grad
        return loss, elbo_sum

    def _worth_recording(self, key: tuple[int, bool]) -> bool:
        if len(self.replays) >= self.MAX_GRAPHS:
            return False
        return self.planned_steps is None or self.planned_steps.get(key, 0) >= self.MIN_REPLAYS

    def _loss_and_grads(self, params, buffers, data):
        """What the graph records: one SVI step's loss, per-cell ELBO sum and gradients."""
        counts, batch, labels, cat_covs, cont_covs, idx, kl_weight = data
        kl_weight = 0.0 if kl_weight is None else kl_weight
        x = SparseCounts(*counts, shape=torch.Size((batch.shape[0], self.module.n_genes)))
        mb = Minibatch(x=x, batch=batch, labels=labels, cat_covs=cat_covs, cont_covs=cont_covs, idx=idx)
        state = {f"module.{name}": value for name, value in zip(self.param_names, params)}
        state.update({f"module.{name}": value for name, value in zip(self.buffer_names, buffers)})
        with pyro.validation_enabled(False):
            elbo, per_cell = torch.func.functional_call(self.elbo, state, (mb, self.n_obs, kl_weight), strict=True)
        loss = -elbo / self.n_obs
        # None for a parameter the step does not use (theta under a Poisson likelihood), as
        # backward() leaves its .grad: Adam then skips it, weight decay included.
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return loss.detach(), per_cell.detach().sum(), [_in_layout_of(p, g) for p, g in zip(params, grads)]

    def _record(self, counts: SparseCounts, data: tuple, key: tuple[int, bool]) -> Callable | None:
        try:
            # A plain function: make_fx counts the arguments of the function's code, self included.
            def step(params, buffers, data):
                return self._loss_and_grads(params, buffers, data)

            graph = record(step, self.params, self.buffers, data, counts)
            self.replays[key] = replay = compile_replay(graph)
        except Exception as error:  # noqa: BLE001 - any failure falls back to eager steps
            self.failure = f"{type(error).__name__}: {error}"
            warn_eager_fallback("record the training step as a graph", self.failure, "traced_step")
            return None
        self.graphs[key] = graph
        logger.info(
            "Training step for %d cells%s recorded as a graph of %d nodes, replayed by %s.",
            key[0],
            " at KL weight 0" if key[1] else "",
            len(graph.graph.nodes),
            replay.interpreter,
        )
        return replay


def _in_layout_of(param: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor | None:
    """``grad`` with ``param``'s strides, as autograd's accumulation gives it to the eager step.

    Why: the gradient of a parameter that is a slice of a larger weight (a query model's new
    batch columns) can be a strided view; the fused Adam step reads it as if it had the
    parameter's layout and takes a wrong step. Called while recording, so the copy, where one
    is needed, is an op of the graph and the replay pays nothing for the check.
    """
    if grad is None or grad.stride() == param.stride():
        return grad
    return torch.empty_like(param).copy_(grad)


def record(fn, params: list, buffers: list, data: tuple, counts: SparseCounts) -> torch.fx.GraphModule:
    """Record ``fn(params, buffers, data)`` with ``make_fx`` on fake tensors of the same shapes.

    Only the non-zero dimension of the counts' per-entry tensors is symbolic. The recording is
    refused (``RuntimeError``) if tracing left any condition on the shapes other than those
    tensors having one common length: the graph would then hold only for the recorded minibatch.
    """
    import sympy
    from torch._dynamo.source import ConstantSource
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    shape_env = ShapeEnv()
    fake_mode = FakeTensorMode(shape_env=shape_env)
    per_entry = {id(t) for t in (counts.row, counts.col, counts.val, counts.col_t, counts.val_t)}
    n_made = 0

    def fake(value):
        nonlocal n_made
        if not isinstance(value, torch.Tensor):
            return value
        n_made += 1
        dynamic = [
            DimDynamic.DYNAMIC if (d == 0 and id(value) in per_entry) else DimDynamic.STATIC for d in range(value.dim())
        ]
        made = fake_mode.from_tensor(
            value.detach(),
            source=ConstantSource(f"input{n_made}"),
            symbolic_context=StatelessSymbolicContext(dynamic_sizes=dynamic),
        )
        return made.requires_grad_(value.requires_grad)

    fake_data = tuple(tuple(fake(t) for t in item) if isinstance(item, tuple) else fake(item) for item in data)
    nnz = {fake_data[0][i].shape[0].node.expr for i in (1, 2, 3, 5, 6)}  # row, col, val, col_t, val_t
    graph = make_fx(fn, tracing_mode="fake")([fake(p) for p in params], [fake(b) for b in buffers], fake_data)
    for guard in shape_env.guards:
        expr = guard.expr
        if not (isinstance(expr, sympy.Eq) and expr.free_symbols <= nnz and all(s.is_Symbol for s in expr.args)):
            raise RuntimeError(f"the recorded step depends on the shapes through {expr}")
    return graph


def compile_replay(graph: torch.fx.GraphModule) -> Callable:
    """A function that runs ``graph``'s ops as ``graph(*args)`` would, with less overhead.

    ``detach`` (a no-op here: the replay runs under ``no_grad``) and unused results are dropped
    first. Then the graph runs in TorchScript's interpreter, which calls the ops from C++
    (``script_replay``); where TorchScript cannot take the graph, generated Python code calls
    each op's C++ handle (``python_replay``). Both give the graph's results bit for bit.
    """
    nodes = graph.graph
    for node in list(nodes.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten.detach.default:
            node.replace_all_uses_with(node.args[0])
            nodes.erase_node(node)
    nodes.eliminate_dead_code()  # keeps ops that write to their inputs (batch norm's statistics)
    graph.recompile()
    n_inputs = sum(node.op == "placeholder" for node in nodes.nodes)
    scripted = script_replay(graph)
    flat_replay = scripted or python_replay(graph)
    out_spec = graph._out_spec

    def replay(*args):
        flat = pytree.arg_tree_leaves(*args)
        if len(flat) != n_inputs:
            raise ValueError(f"the recorded step takes {n_inputs} tensors, got {len(flat)}")
        return pytree.tree_unflatten(flat_replay(*flat), out_spec)

    replay.interpreter = "torchscript" if scripted is not None else "python"
    return replay


def script_replay(graph: torch.fx.GraphModule) -> Callable | None:
    """``graph`` as a TorchScript function of its flat inputs, returning its flat outputs.

    None if TorchScript cannot compile it.

    Why: the interpreter dispatches each op from C++, without a Python call per op, which makes
    a replayed step faster than ``python_replay`` (``benchmarks/README.md``). TorchScript's CPU fuser is off by default (and without LLVM in torch's CPU
    wheels), so the ops run unfused and the results equal the eager step's bit for bit
    (``tests/test_traced_step.py``). ``torch.jit.script`` is deprecated in favour of
    ``torch.compile``; ``torch.compile``'s inductor would fuse the ops and could be faster still,
    but compiles for 5-40 s with a C++ compiler, and its fused arithmetic rounds differently.
    """
    copy = torch.fx.Graph()
    outputs = list(copy.graph_copy(graph.graph, {}))
    # TorchScript returns tensors: constants and None (a parameter without a gradient) are put
    # back around its results.
    computed = [i for i, value in enumerate(outputs) if isinstance(value, torch.fx.Node)]
    copy.output(tuple(outputs[i] for i in computed))
    for node in copy.nodes:
        if node.op == "placeholder" and not isinstance(node.meta.get("val"), torch.Tensor):
            if node.users:
                return None  # a non-tensor input that the step reads: TorchScript would type it as a tensor
            node.type = typing.Any  # an unused one (a number the recording made a constant)
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            node.target = node.target.overloadpacket  # TorchScript resolves the overload itself
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.script's deprecation and type-system notes
            scripted = torch.jit.script(torch.fx.GraphModule(graph, copy))
    except Exception as error:  # noqa: BLE001 - the Python replay runs the same graph
        logger.info("TorchScript could not compile the recorded step (%s); replaying it from Python.", error)
        return None

    def flat_replay(*flat):
        results = list(outputs)
        for i, value in zip(computed, scripted(*flat)):
            results[i] = value
        return results

    return flat_replay


def python_replay(graph: torch.fx.GraphModule) -> Callable:
    """Generated Python code that calls each op of ``graph`` on its flat inputs.

    The graph's own code calls each op as ``torch.ops.aten.mul.Tensor(...)``; calling the op's C++
    handle directly skips a Python lookup per op.
    """
    nodes = graph.graph
    names: dict[torch.fx.Node, str] = {}
    scope: dict[str, object] = {}
    lines, inputs = [], []

    def source(value) -> str:
        if isinstance(value, torch.fx.Node):
            return names[value]
        if isinstance(value, (list, tuple)):
            inner = "".join(f"{source(v)}, " for v in value)
            return f"[{inner}]" if isinstance(value, list) else f"({inner})"
        if value is None or isinstance(value, (bool, int, str)):
            return repr(value)
        name = f"constant_{len(scope)}"  # floats (inf, nan), dtypes, devices, tensors
        scope[name] = value
        return name

    for i, node in enumerate(nodes.nodes):
        if node.op == "placeholder":
            names[node] = f"input_{i}"
            inputs.append(names[node])
        elif node.op == "get_attr":
            names[node] = source(operator.attrgetter(node.target)(graph))
        elif node.op == "call_function":
            op = node.target._op if isinstance(node.target, torch._ops.OpOverload) else node.target
            scope[f"op_{i}"] = op
            args = [source(a) for a in node.args] + [f"{k}={source(v)}" for k, v in node.kwargs.items()]
            names[node] = f"value_{i}"
            lines.append(f"    value_{i} = op_{i}({', '.join(args)})")
        elif node.op == "output":
            lines.append(f"    return {source(node.args[0])}")
        else:
            raise NotImplementedError(f"graph node {node.op!r}")
    code = f"def replay({', '.join(inputs)}):\n" + "\n".join(lines) + "\n"
    exec(compile(code, "<recorded training step>", "exec"), scope)  # noqa: S102 - code generated above
    return scope["replay"]

"""Data-parallel training over processes and machines with ``torch.distributed`` (torchrun).

Under ``torchrun`` (which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) every
process holds the whole model; each epoch all ranks draw the same permutation of the training
cells from the shared seed and rank r trains on positions r, r + N, r + 2N, ... of it. The loss
``-ELBO / n_train`` is computed by ``LDVAE.elbo`` inside a small ``nn.Module`` wrapped in
``DistributedDataParallel``, which averages gradients over ranks after every backward pass, so
one step is a step on the union of the ranks' minibatches. Every weight of LDVAE (loadings,
theta, encoders) is an ``nn.Parameter`` of the module, so DDP keeps them identical on all ranks.
Training and validation ELBOs are summed over ranks; only rank 0 writes results.

Launch (one machine, 4 processes; two machines with ``--nnodes=2 --rdzv-endpoint=HOST:PORT``)::

    torchrun --nproc_per_node=4 -m pyro_ldvae fit input.h5ad -o out.h5ad
"""

from __future__ import annotations

import atexit
import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from pyro.nn import PyroModule
from torch import nn
from torch.nn.parallel import DistributedDataParallel

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistributedContext:
    """The place of this process in the process group."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the process that logs and writes."""
        return self.rank == 0

    def shard(self, order: np.ndarray) -> np.ndarray:
        """The rank's strided share of ``order``, equal in length on every rank.

        The remainder ``len(order) % world_size`` (different cells each epoch) is left out.
        """
        usable = len(order) - len(order) % self.world_size
        return order[:usable][self.rank :: self.world_size]

    def sync_buffers(self, module: nn.Module) -> None:
        """Copy rank 0's buffers (batch-norm running statistics) to every rank."""
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of ``tensor`` over ranks (a new tensor; the input is left unchanged)."""
        out = tensor.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out


def torchrun_env() -> bool:
    """Whether this process was started by torchrun (or another launcher setting the same env)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def init_from_env(accelerator: str = "auto") -> DistributedContext | None:
    """Join the process group described by torchrun's environment; None when not under torchrun.

    gloo on CPU, NCCL on CUDA (each process on GPU ``LOCAL_RANK``). Safe to call twice.
    """
    if not torchrun_env():
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = accelerator != "cpu" and torch.cuda.is_available()
    if use_cuda and local_rank >= torch.cuda.device_count():
        raise RuntimeError(
            f"torchrun started process {local_rank} on this node, which has {torch.cuda.device_count()} "
            "visible GPU(s): start at most one process per GPU (--nproc_per_node), or train the "
            "processes on the CPU with gloo (--accelerator cpu)."
        )
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        store = _attempt_store()
        backend = "nccl" if use_cuda else "gloo"
        if store is None:
            dist.init_process_group(backend=backend)
        else:
            rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size)
        atexit.register(_shutdown)
        logger.info("rank %d of %d joined the process group", dist.get_rank(), dist.get_world_size())
    return current()


def _attempt_store() -> dist.Store | None:
    """Return a view of torchrun's rendezvous store private to this restart, or None where ``env://`` is safe.

    torchrun shares its rendezvous TCPStore with the workers and keeps it across restarts, so a
    restarted group would read the addresses its dead predecessors published and fail to connect
    (pytorch issue 135712). On one node every worker has the same restart count, so a prefix by
    it isolates each attempt; across nodes the counts can differ, and torchrun must be told to
    give each attempt a store of its own instead (``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``).
    """
    shared = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    if not shared or int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) == 0:
        return None
    if int(os.environ.get("GROUP_WORLD_SIZE", "1")) > 1:
        raise RuntimeError(
            "torchrun with --max-restarts on several nodes shares its rendezvous store with the workers across "
            "restarts, so a restarted group cannot connect (pytorch issue 135712): launch torchrun with "
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its environment on every node."
        )
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        int(os.environ["WORLD_SIZE"]),
        is_master=False,
        timeout=timedelta(minutes=30),
    )
    return dist.PrefixStore(f"pyro_ldvae/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def _shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def current() -> DistributedContext | None:
    """The process group this process belongs to, or None (single-process training)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    return DistributedContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def is_main_process() -> bool:
    """True on rank 0 and in single-process runs: the process that writes files and prints."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the gradient of every rank's input is the sum of all ranks' gradients."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


class SyncBatchNorm1d(nn.BatchNorm1d):
    """``BatchNorm1d`` whose training statistics are taken over the cells of all ranks.

    With it, N ranks x B cells normalise exactly as one process with N x B cells, so results do
    not depend on the number of processes. Unlike ``torch.nn.SyncBatchNorm`` it runs on CPU
    (gloo) as well: the per-feature sums are combined with a differentiable all-reduce.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Batch norm of ``x`` with the statistics of all ranks' cells in training."""
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        n_features = x.shape[1]
        local = torch.cat([x.sum(0), (x * x).sum(0), x.new_full((1,), float(x.shape[0]))])  # (2 features + 1,)
        total = _AllReduceSum.apply(local)
        n = total[-1]
        mean = total[:n_features] / n
        var = total[n_features : 2 * n_features] / n - mean * mean  # biased, as batch norm normalises
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * n / (n - 1), self.momentum)
        out = (x - mean) * torch.rsqrt(var + self.eps)
        return out * self.weight + self.bias if self.affine else out


def use_sync_batch_norm(module: nn.Module) -> nn.Module:
    """Make every ``BatchNorm1d`` of ``module`` a ``SyncBatchNorm1d`` in place (same parameters, buffers)."""
    for sub in module.modules():
        if isinstance(sub, nn.BatchNorm1d) and not isinstance(sub, SyncBatchNorm1d):
            # decoder heads are PyroModules: keep them so, with the synchronised forward
            sub.__class__ = PyroModule[SyncBatchNorm1d] if isinstance(sub, PyroModule) else SyncBatchNorm1d
    return module


class ElboLoss(nn.Module):
    """``forward(mb, n_obs, kl_weight) -> module.elbo(...)``: the module DDP wraps."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, mb, n_obs: int | None = None, kl_weight: float = 1.0):
        """The module's ELBO loss on ``mb`` (DDP synchronises the gradients of this call)."""
        return self.module.elbo(mb, n_obs, kl_weight)


def wrap(module: nn.Module, ctx: DistributedContext) -> DistributedDataParallel:
    """``module.elbo`` under DDP.

    The initial weights are broadcast from rank 0 and batch norm statistics are synchronised across ranks
    (``SyncBatchNorm1d``).
    """
    device_ids = (
        [module.device.index if module.device.index is not None else ctx.local_rank]
        if module.device.type == "cuda"
        else None
    )
    use_sync_batch_norm(module)
    # find_unused_parameters: theta is unused with a Poisson likelihood, and priors may add more.
    return DistributedDataParallel(ElboLoss(module), device_ids=device_ids, find_unused_parameters=True)

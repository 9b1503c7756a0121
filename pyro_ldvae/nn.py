"""Neural network pieces: the amortized encoder and the linear decoder heads.

Layer shapes and hyper-parameters mirror scvi-tools (``scvi.nn.Encoder``, ``FCLayers`` and
``LinearDecoderSCVI``) so that weights can be copied between the two implementations:
Linear -> BatchNorm1d(momentum=0.01, eps=1e-3) -> ReLU -> Dropout for every hidden layer,
variance = exp(.) + 1e-4.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .distributions import SparseCounts, csr_transpose_arrays

BN_MOMENTUM = 0.01
BN_EPS = 1e-3
VAR_EPS = 1e-4


class _SparseLinear(torch.autograd.Function):
    """``x @ W + b`` for sparse ``x`` ``(cells, n_in)`` (torch CSR or ``SparseCounts``) and ``W``
    ``(n_in, n_out)``; gradients for ``W`` and ``b`` only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor | SparseCounts, weight_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.x = x  # data, not a result of this function: no reference cycle through ctx
        ctx.has_bias = bias is not None
        out = _csr_matmul(x, weight_t)  # (cells, n_out)
        return out + bias if bias is not None else out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_weight = _sparse_t_matmul(ctx.x, grad_out) if ctx.needs_input_grad[1] else None  # (n_in, n_out)
        grad_bias = grad_out.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return None, grad_weight, grad_bias


def _csr_matmul(x: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """``x @ dense`` for a sparse CSR ``x`` ``(m, k)`` and a dense ``(k, n)``, as a dense ``(m, n)``.

    On CPU as a weighted sum of the rows of ``dense`` named by each row's column indices:
    ``embedding_bag`` computes exactly that, in FBGEMM kernels that run 2.3x (x @ W, (128, 2000)
    at 7% non-zeros, W (2000, 128)) to 4x (x.T @ grad) faster than torch's CSR product on the
    2-core benchmark machine. Elsewhere torch's sparse product (cuSPARSE on CUDA).
    """
    if isinstance(x, SparseCounts):
        return _row_sums(x.crow, x.col, x.val, dense)
    if x.device.type != "cpu":
        return x.matmul(dense)
    return _row_sums(x.crow_indices(), x.col_indices(), x.values(), dense)


def _row_sums(crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """Row i of the result: ``sum_k val[k] * dense[col[k]]`` over the entries ``crow[i]:crow[i + 1]``."""
    return F.embedding_bag(col, dense.contiguous(), crow, mode="sum", per_sample_weights=val, include_last_offset=True)


def _sparse_t_matmul(x: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """``x.T @ dense`` for a sparse CSR ``x``, as a dense tensor."""
    if isinstance(x, SparseCounts):  # its transpose was built with it, outside the step
        return _row_sums(x.crow_t, x.col_t, x.val_t, dense)
    return _csr_matmul(_csr_transpose(x), dense)


def _csr_transpose(x: torch.Tensor) -> torch.Tensor:
    """``x.T`` as a CSR tensor; on CPU through scipy's C transpose (much faster than torch's).

    Cached on ``x``: the two encoders share one input, so it is transposed once per step.
    """
    cached = getattr(x, "_transposed", None)
    if cached is not None:
        return cached
    x._transposed = transposed = _csr_transpose_uncached(x)
    return transposed


def _csr_transpose_uncached(x: torch.Tensor) -> torch.Tensor:
    if x.device.type != "cpu":
        return x.t().to_sparse_csr()
    n_rows, n_cols = x.shape
    indptr, indices, values = x.crow_indices().numpy(), x.col_indices().numpy(), x.values().detach().numpy()
    t_indptr, t_indices, t_values = csr_transpose_arrays(n_rows, n_cols, indptr, indices, values)
    return torch.sparse_csr_tensor(
        torch.from_numpy(t_indptr.astype(np.int64, copy=False)),
        torch.from_numpy(t_indices.astype(np.int64, copy=False)),
        torch.from_numpy(t_values),
        size=(n_cols, n_rows),
        check_invariants=False,
    )


class InputLinear(nn.Module):
    """The encoder's first layer, ``x @ W.T + b`` as ``nn.Linear``, for dense or sparse CSR ``x``.

    The weight is stored transposed, as a contiguous ``weight_t`` ``(n_in, n_out)``. On sparse
    input the product ``x @ weight_t`` costs O(non-zeros) and reads ``weight_t`` as it lies, and
    its gradient ``x.T @ grad`` comes out in the same layout. Stored as ``nn.Linear`` does, the
    weight would be transposed (copied) twice a step, and a non-contiguous view of it makes the
    fused Adam step copy it too. ``weight`` gives the usual ``(n_out, n_in)`` view; state dicts
    written with a ``weight`` entry (``nn.Linear``'s layout) load too. The initialisation is
    ``nn.Linear``'s, drawn in the same order.
    """

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        linear = nn.Linear(n_in, n_out)
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous())
        self.bias = nn.Parameter(linear.bias.detach().clone())

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_t.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, SparseCounts) or x.layout == torch.sparse_csr:
            return _SparseLinear.apply(x, self.weight_t, self.bias)
        return torch.addmm(self.bias, x, self.weight_t)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "weight" in state_dict and prefix + "weight_t" not in state_dict:
            state_dict[prefix + "weight_t"] = state_dict.pop(prefix + "weight").t()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class Encoder(nn.Module):
    """MLP from ``(cells, n_input)`` to a Normal's mean and variance, each ``(cells, n_output)``."""

    def __init__(
        self,
        n_input: int,
        n_output: int,
        n_layers: int = 1,
        n_hidden: int = 128,
        dropout_rate: float = 0.1,
    ):
        super().__init__()
        dims = [n_input] + [n_hidden] * n_layers
        layers: list[nn.Module] = []
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            layers += [
                InputLinear(d_in, d_out) if not layers else nn.Linear(d_in, d_out),
                nn.BatchNorm1d(d_out, momentum=BN_MOMENTUM, eps=BN_EPS),
                nn.ReLU(),
                nn.Dropout(dropout_rate),
            ]
        self.hidden = nn.Sequential(*layers)
        self.mean = nn.Linear(n_hidden, n_output)
        self.log_var = nn.Linear(n_hidden, n_output)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.hidden(x)  # the first layer takes sparse CSR x in O(non-zeros)
        return self.mean(h), torch.exp(self.log_var(h)) + VAR_EPS


class _NarrowLinear(torch.autograd.Function):
    """``x @ W.T + b`` for a narrow input ``x`` ``(cells, n_in)`` and a tall ``W`` ``(n_out, n_in)``,
    the decoder's shape (a few factors in, thousands of genes out).

    Only the backward differs from ``F.linear``: the products are taken in the orientation that
    has the short dimension outermost, ``(x.T @ grad).T`` and ``(W.T @ grad.T).T``. For
    ``(128, 10) -> 2000`` on CPU that is 2.5-3x faster than ``grad.T @ x`` and ``grad @ W``, which
    BLAS runs poorly for this shape; the results are the same products.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = torch.mm(weight.t(), grad_out.t()).t() if ctx.needs_input_grad[0] else None
        grad_weight = torch.mm(x.t(), grad_out).t().contiguous() if ctx.needs_input_grad[1] else None
        grad_bias = grad_out.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias


def narrow_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with a faster backward for a narrow 2-D input; other inputs go to ``F.linear``."""
    if x.dim() != 2:
        return F.linear(x, weight, bias)
    return _NarrowLinear.apply(x, weight, bias)


class LinearHead(nn.Module):
    """``BN(W [z ; covariates] + b)``: one linear map with no activation, optional batch norm.

    ``W`` has shape ``(n_output, n_latent + n_covariates)``; the covariate columns come after
    the factor columns, as in scvi-tools' LinearDecoderSCVI.
    """

    def __init__(self, n_input: int, n_output: int, use_batch_norm: bool = True, bias: bool = False):
        super().__init__()
        self.linear = nn.Linear(n_input, n_output, bias=bias)
        self.batch_norm = nn.BatchNorm1d(n_output, momentum=BN_MOMENTUM, eps=BN_EPS) if use_batch_norm else None

    def forward(self, decoder_input: torch.Tensor) -> torch.Tensor:
        out = narrow_linear(decoder_input, self.linear.weight, self.linear.bias)
        return out if self.batch_norm is None else self.batch_norm(out)

    def folded_weight(self) -> torch.Tensor:
        """``diag(gamma / sqrt(running_var + eps)) W``: the weight with batch norm's scale folded in."""
        weight = self.linear.weight
        if self.batch_norm is None:
            return weight
        bn = self.batch_norm
        return (bn.weight / torch.sqrt(bn.running_var + bn.eps))[:, None] * weight

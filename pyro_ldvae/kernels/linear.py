"""Linear maps with hand-written gradients: sparse-input products and a narrow dense product (pure torch)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .sparse import SparseCounts, csr_transpose_arrays


class _SparseLinear(torch.autograd.Function):
    """``x @ W + b`` for sparse ``x`` ``(cells, n_in)`` (torch CSR or ``SparseCounts``) and ``W`` ``(n_in, n_out)``.

    Gradients for ``W`` and ``b`` only.
    """

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
    ``embedding_bag`` computes exactly that, in FBGEMM kernels that are faster than torch's CSR
    product for minibatch shapes. Elsewhere torch's sparse product (cuSPARSE on CUDA).
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


class _NarrowLinear(torch.autograd.Function):
    """``x @ W.T + b`` for a narrow input ``x`` ``(cells, n_in)`` and a tall ``W`` ``(n_out, n_in)``.

    That is the decoder's shape: a few factors in, thousands of genes out.

    Only the backward differs from ``F.linear``: the products are taken in the orientation that
    has the short dimension outermost, ``(x.T @ grad).T`` and ``(W.T @ grad.T).T``, because BLAS
    runs ``grad.T @ x`` and ``grad @ W`` poorly for this shape; the results are the same products.
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

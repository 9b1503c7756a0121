"""The encoder's sparse first layer and the decoder's narrow linear map equal torch's nn.Linear."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pyro_ldvae.kernels import sparse as sparse_kernels
from pyro_ldvae.kernels.linear import narrow_linear
from pyro_ldvae.models.nn import Encoder, InputLinear


def _sparse_input(cells: int = 9, genes: int = 30, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(cells, genes, generator=g) < 0.2) * torch.rand(cells, genes, generator=g) * 4


def test_input_linear_equals_nn_linear_on_dense_and_sparse_input():
    torch.manual_seed(0)
    reference = nn.Linear(30, 8)
    torch.manual_seed(0)
    layer = InputLinear(30, 8)  # same initialisation, drawn in the same order
    assert torch.equal(layer.weight, reference.weight) and torch.equal(layer.bias, reference.bias)
    assert layer.weight_t.is_contiguous() and layer.weight_t.shape == (30, 8)
    x = _sparse_input()
    grads = []
    for inp, module in ((x, reference), (x, layer), (x.to_sparse_csr(), layer)):
        module.zero_grad()
        out = module(inp)
        torch.testing.assert_close(out, reference(x))
        (out * torch.arange(8.0)).sum().backward()
        weight_grad = module.weight.grad if module is reference else module.weight_t.grad.t()
        grads.append((weight_grad.clone(), module.bias.grad.clone()))
    for weight_grad, bias_grad in grads[1:]:
        torch.testing.assert_close(weight_grad, grads[0][0])
        torch.testing.assert_close(bias_grad, grads[0][1])


def test_input_linear_loads_an_nn_linear_state_dict():
    """A state dict in nn.Linear's layout (a 'weight' of (n_out, n_in)) loads into the transposed storage."""
    reference = nn.Linear(30, 8)
    layer = InputLinear(30, 8)
    layer.load_state_dict(reference.state_dict())
    assert torch.equal(layer.weight, reference.weight)
    assert layer.weight_t.is_contiguous()
    assert set(layer.state_dict()) == {"weight_t", "bias"}


def test_encoder_gives_the_same_output_for_sparse_and_dense_input():
    encoder = Encoder(30, 3, n_layers=2, n_hidden=16).eval()
    x = torch.log1p(_sparse_input())
    for a, b in zip(encoder(x), encoder(x.to_sparse_csr())):
        torch.testing.assert_close(a, b)


def test_narrow_linear_matches_f_linear_in_value_and_gradient():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 4, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 4, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(50, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(narrow_linear, (x, weight, bias))
    assert torch.autograd.gradcheck(lambda a, w: narrow_linear(a, w), (x, weight))
    torch.testing.assert_close(narrow_linear(x, weight, bias), torch.nn.functional.linear(x, weight, bias))


@pytest.mark.parametrize("scipy_kernel", [True, False], ids=["scipy-kernel", "public-scipy"])
def test_sparse_products_handle_cells_and_genes_without_counts(monkeypatch, scipy_kernel):
    """Empty rows (cells without counts) and empty columns (genes unseen in the minibatch) in the
    sparse first layer: output and weight gradient equal the dense layer's, with the transpose of the
    backward taken by scipy's C kernel or by its public csr_matrix route."""
    if not scipy_kernel:
        monkeypatch.setattr(sparse_kernels, "_csr_tocsc", None)
    x = _sparse_input(cells=6, genes=12)
    x[[1, 4]] = 0.0  # two cells without counts
    x[:, [0, 7, 11]] = 0.0  # three genes without counts
    layer = InputLinear(12, 5)
    outputs, grads = [], []
    for inp in (x, x.to_sparse_csr(), torch.zeros(6, 12).to_sparse_csr()):
        layer.zero_grad()
        out = layer(inp)
        (out * torch.arange(5.0)).sum().backward()
        outputs.append(out.detach())
        grads.append(layer.weight_t.grad.clone())
    torch.testing.assert_close(outputs[1], outputs[0])
    torch.testing.assert_close(grads[1], grads[0])
    assert torch.equal(grads[1][[0, 7, 11]], torch.zeros(3, 5))
    torch.testing.assert_close(outputs[2], layer.bias.detach().expand(6, 5))  # no counts: the bias alone
    assert torch.equal(grads[2], torch.zeros(12, 5))

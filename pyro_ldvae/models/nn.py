"""Neural network pieces: the amortized encoder and the linear decoder heads.

Layer shapes and hyper-parameters mirror scvi-tools (``scvi.nn.Encoder``, ``FCLayers`` and
``LinearDecoderSCVI``) so that weights can be copied between the two implementations:
Linear -> BatchNorm1d(momentum=0.01, eps=1e-3) -> ReLU -> Dropout for every hidden layer,
variance = exp(.) + 1e-4.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels.linear import _SparseLinear, narrow_linear
from ..kernels.sparse import SparseCounts

BN_MOMENTUM = 0.01
BN_EPS = 1e-3
VAR_EPS = 1e-4


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
        """The weight in ``nn.Linear``'s ``(n_out, n_in)`` layout."""
        return self.weight_t.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T + b``; sparse CSR ``x`` is multiplied in O(non-zeros)."""
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
        """Mean and variance of ``q(z | x)``, each ``(cells, n_output)``."""
        h = self.hidden(x)  # the first layer takes sparse CSR x in O(non-zeros)
        return self.mean(h), torch.exp(self.log_var(h)) + VAR_EPS


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
        """Decoder logits ``(cells, genes)`` from the factors (and batch one-hot)."""
        out = narrow_linear(decoder_input, self.linear.weight, self.linear.bias)
        return out if self.batch_norm is None else self.batch_norm(out)

    def folded_weight(self) -> torch.Tensor:
        """``diag(gamma / sqrt(running_var + eps)) W``: the weight with batch norm's scale folded in."""
        weight = self.linear.weight
        if self.batch_norm is None:
            return weight
        bn = self.batch_norm
        return (bn.weight / torch.sqrt(bn.running_var + bn.eps))[:, None] * weight

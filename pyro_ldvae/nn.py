"""Neural network pieces: the amortized encoder and the linear decoder heads.

Layer shapes and hyper-parameters mirror scvi-tools (``scvi.nn.Encoder``, ``FCLayers`` and
``LinearDecoderSCVI``) so that weights can be copied between the two implementations:
Linear -> BatchNorm1d(momentum=0.01, eps=1e-3) -> ReLU -> Dropout for every hidden layer,
variance = exp(.) + 1e-4.
"""

from __future__ import annotations

import torch
from torch import nn

BN_MOMENTUM = 0.01
BN_EPS = 1e-3
VAR_EPS = 1e-4


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
                nn.Linear(d_in, d_out),
                nn.BatchNorm1d(d_out, momentum=BN_MOMENTUM, eps=BN_EPS),
                nn.ReLU(),
                nn.Dropout(dropout_rate),
            ]
        self.hidden = nn.Sequential(*layers)
        self.mean = nn.Linear(n_hidden, n_output)
        self.log_var = nn.Linear(n_hidden, n_output)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.hidden(x)
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
        out = self.linear(decoder_input)
        return out if self.batch_norm is None else self.batch_norm(out)

    def folded_weight(self) -> torch.Tensor:
        """``diag(gamma / sqrt(running_var + eps)) W``: the weight with batch norm's scale folded in."""
        weight = self.linear.weight
        if self.batch_norm is None:
            return weight
        bn = self.batch_norm
        return (bn.weight / torch.sqrt(bn.running_var + bn.eps))[:, None] * weight

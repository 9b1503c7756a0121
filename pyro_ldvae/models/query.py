"""Extending a trained LDVAE to new batches, and freezing what the reference learned.

A reference model's decoder maps ``[z ; one-hot batch ; covariates]``; a query brings batches
the reference never saw. :func:`extend_state` widens a reference's ``state_dict`` to the extended
batch categories: new batch columns in every decoder head, new library prior entries, new theta
rows for ``dispersion='gene-batch'``. :func:`freeze_reference` then makes every tensor the
reference learned a fixed value, so that only the new batches' columns and theta rows train.

Frozen parts are not parameters at all (``requires_grad=False``, or buffers inside
:class:`ExtendedLinear`), so optimizers never touch them: with Adam's weight decay, a zeroed
gradient alone would still move them. The state dict keeps the plain module's keys, so a query
model saves and loads as an ordinary :class:`~pyro_ldvae.LDVAE` with more batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .ldvae import LDVAE

HEADS = ("factor_regressor", "px_dropout_decoder", "px_r_decoder")


def batch_columns(n_batch: int) -> int:
    """Decoder columns of the one-hot batch: ``n_batch`` when ``n_batch > 1``, else none."""
    return n_batch if n_batch > 1 else 0


def extend_state(
    state: dict[str, torch.Tensor],
    n_latent: int,
    n_ref_batch: int,
    n_new_batch: int,
    library_log_means: torch.Tensor | None = None,
    library_log_vars: torch.Tensor | None = None,
    init: str = "mean",
) -> dict[str, torch.Tensor]:
    """A reference ``state_dict`` widened from ``n_ref_batch`` to ``n_ref_batch + n_new_batch`` batches.

    Parameters
    ----------
    state
        The reference module's ``state_dict``.
    n_latent
        Number of factors (the decoder's first columns).
    n_ref_batch, n_new_batch
        Batches of the reference, and new batches appended after them.
    library_log_means, library_log_vars
        The new batches' library prior ``(n_new_batch,)``; required for a latent library size.
    init
        Initial decoder columns of the new batches: 'mean' (the mean of the reference's batch
        columns: with ``bias=False`` those columns are the genes' intercepts, so the new batch
        starts as the reference's average batch) or 'zero'. A reference with one batch has no
        batch columns; it gets a zero column for its own batch, and the new batches start at zero.

    Returns
    -------
    The extended ``state_dict``; the reference's tensors are copied, never modified.
    """
    if init not in ("mean", "zero"):
        raise ValueError(f"init must be 'mean' or 'zero', got {init!r}.")
    state = {k: v.clone() for k, v in state.items()}
    start, n_ref_cols = n_latent, batch_columns(n_ref_batch)
    for head in HEADS:
        key = f"decoder.{head}.linear.weight"
        if key not in state:
            continue
        weight = state[key]  # (genes, n_latent + n_covariates)
        ref_cols = weight[:, start : start + n_ref_cols]
        if n_ref_cols == 0:  # the reference's single batch gets a zero column of its own
            own = weight.new_zeros(weight.shape[0], 1)
            new = weight.new_zeros(weight.shape[0], n_new_batch)
            added = torch.cat([own, new], dim=1)
        elif init == "mean":
            added = ref_cols.mean(dim=1, keepdim=True).expand(-1, n_new_batch).clone()
        else:
            added = weight.new_zeros(weight.shape[0], n_new_batch)
        state[key] = torch.cat([weight[:, : start + n_ref_cols], added, weight[:, start + n_ref_cols :]], dim=1)
    if "theta_unconstrained" in state and state["theta_unconstrained"].dim() == 2:  # 'gene-batch'
        theta = state["theta_unconstrained"]  # (n_ref_batch, genes), log theta
        new_rows = theta.mean(dim=0, keepdim=True).expand(n_new_batch, -1)
        state["theta_unconstrained"] = torch.cat([theta, new_rows], dim=0)
    if library_log_means is not None:
        means = torch.as_tensor(library_log_means, dtype=state["library_log_means"].dtype).reshape(-1)
        variances = torch.as_tensor(library_log_vars, dtype=state["library_log_vars"].dtype).reshape(-1)
        state["library_log_means"] = torch.cat([state["library_log_means"], means])
        state["library_log_vars"] = torch.cat([state["library_log_vars"], variances])
    return state


class ExtendedLinear(nn.Module):
    """A linear map whose weight is fixed except for a block of trainable columns.

    ``weight = [fixed[:, :start] ; new ; fixed[:, start:]]`` ``(out, in)``: ``fixed`` is a
    buffer, ``new`` ``(out, n_new)`` the only parameter; a bias stays fixed. The state dict holds
    ``weight`` (and ``bias``) as ``nn.Linear`` does.
    """

    def __init__(self, linear: nn.Linear, start: int, n_new: int):
        super().__init__()
        weight = linear.weight.detach()
        self.start, self.stop = start, start + n_new
        self.register_buffer("fixed", torch.cat([weight[:, :start], weight[:, self.stop :]], dim=1), persistent=False)
        self.new = nn.Parameter(weight[:, start : self.stop].clone())
        bias = None if linear.bias is None else linear.bias.detach().clone()
        self.register_buffer("bias", bias)

    @property
    def weight(self) -> torch.Tensor:
        """The full weight: the reference's columns, then the new batches'."""
        return torch.cat([self.fixed[:, : self.start], self.new, self.fixed[:, self.start :]], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T + b`` with the full weight."""
        return F.linear(x, self.weight, self.bias)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight if keep_vars else self.weight.detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        key = prefix + "weight"
        if key not in state_dict:
            missing_keys.append(key)
            return
        weight = state_dict[key]
        with torch.no_grad():
            self.fixed.copy_(torch.cat([weight[:, : self.start], weight[:, self.stop :]], dim=1))
            self.new.copy_(weight[:, self.start : self.stop])
            if self.bias is not None and prefix + "bias" in state_dict:
                self.bias.copy_(state_dict[prefix + "bias"])


class ExtendedTheta(nn.Module):
    """theta per gene and batch ``(n_batch, genes)`` whose reference rows are fixed.

    Stored as log theta, as ``PyroParam(constraint=positive)`` stores it; the state dict key is
    the module's own ``theta_unconstrained``, written by :func:`freeze_reference`'s hooks.
    """

    def __init__(self, unconstrained: torch.Tensor, n_ref: int):
        super().__init__()
        self.register_buffer("fixed", unconstrained[:n_ref].detach().clone(), persistent=False)
        self.new = nn.Parameter(unconstrained[n_ref:].detach().clone())

    def unconstrained(self) -> torch.Tensor:
        """The unconstrained dispersion: the reference's rows, then the new batches'."""
        return torch.cat([self.fixed, self.new], dim=0)

    def forward(self) -> torch.Tensor:
        """The dispersion ``exp(unconstrained)``."""
        return torch.exp(self.unconstrained())

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        pass  # saved by the owning QueryLDVAE under its plain key

    def _load_from_state_dict(self, *args, **kwargs):
        pass  # loaded by the owning QueryLDVAE


class FrozenReferenceMixin:
    """What a module changed by :func:`freeze_reference` adds: its parameters that learn faster."""

    def global_rate_parameters(self) -> list[nn.Parameter]:
        """Parameters that learn at the plan's ``global_lr``: the new batches' decoder columns and theta rows.

        They are per-gene offsets and dispersions shared by all of a batch's cells, global
        parameters; at the encoder's rate (1e-3) they were still moving after 400 epochs on a
        pancreas donor, at ``global_lr`` they settle within 14-25 (``benchmarks/README.md``,
        "Reference mapping").
        """
        columns = [head.linear.new for name in HEADS if (head := getattr(self.decoder, name, None)) is not None]
        theta = getattr(self, "theta_parts", None)
        return columns + ([theta.new] if theta is not None else [])


class QueryLDVAE(FrozenReferenceMixin, LDVAE):
    """A frozen query :class:`LDVAE` whose 'gene-batch' theta has fixed reference rows (see :class:`ExtendedTheta`)."""

    @property
    def theta(self) -> torch.Tensor:
        """The dispersion, reference and new batches together."""
        return self.theta_parts()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        value = self.theta_parts.unconstrained()
        destination[prefix + "theta_unconstrained"] = value if keep_vars else value.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        key = prefix + "theta_unconstrained"
        value = state_dict.get(key)
        rest = {k: v for k, v in state_dict.items() if k != key}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)
        if value is None:
            missing_keys.append(key)
            return
        n_ref = self.theta_parts.fixed.shape[0]
        with torch.no_grad():
            self.theta_parts.fixed.copy_(value[:n_ref])
            self.theta_parts.new.copy_(value[n_ref:])


_MIXED: dict[tuple[type, type], type] = {}


def mix_into(module: nn.Module, mixin: type) -> nn.Module:
    """``module`` (changed in place) with ``mixin`` put before its class; the state dict does not change.

    One class per (mixin, class) pair, named after both, so that modules changed alike share it.
    """
    cls = type(module)
    if not isinstance(module, mixin):
        if (mixin, cls) not in _MIXED:
            _MIXED[mixin, cls] = type(f"{mixin.__name__.removesuffix('Mixin')}{cls.__name__}", (mixin, cls), {})
        module.__class__ = _MIXED[mixin, cls]
    return module


_EVAL_LOCKED: dict[type, type] = {}


def _train_in_eval(self: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(self, False)


def eval_locked(module: nn.Module) -> nn.Module:
    """``module`` (changed in place) stays in eval mode whatever ``train()`` asks.

    Batch norm uses and keeps its running statistics, dropout is off. The class changes, the state dict does not.
    """
    cls = type(module)
    if cls not in _EVAL_LOCKED.values():
        if cls not in _EVAL_LOCKED:
            _EVAL_LOCKED[cls] = type(f"EvalLocked{cls.__name__}", (cls,), {"train": _train_in_eval})
        module.__class__ = _EVAL_LOCKED[cls]
    return module.eval()


def eval_unlocked(module: nn.Module) -> nn.Module:
    """``module`` (changed in place) with :func:`eval_locked` undone: ``train()`` works again."""
    cls = type(module)
    if cls in _EVAL_LOCKED.values():
        module.__class__ = cls.__mro__[1]
    return module


def freeze_reference(module: LDVAE, n_ref_batch: int, n_new_batch: int, train_encoder: bool = False) -> LDVAE:
    """Fix everything the reference learned; only the new batches' decoder columns and theta rows train.

    ``module`` (already extended by :func:`extend_state`) is changed in place and returned:
    every parameter gets ``requires_grad=False``; each decoder head's linear map becomes an
    :class:`ExtendedLinear` whose trainable block is the new batches' columns; for
    'gene-batch' the new theta rows train (:class:`ExtendedTheta`). The decoder's batch norm
    and the encoders stay in eval mode during training (:func:`eval_locked`): batch norm
    normalises with the reference's running statistics, so the new columns are fitted on the
    scale the model is evaluated on (a minibatch's own mean would cancel a batch's constant
    offset), and the loadings and the encoders' outputs stay the reference's.
    ``train_encoder=True`` lets the encoders (weights and batch-norm statistics) adapt.
    The new columns and theta rows learn at the plan's ``global_lr``
    (:meth:`FrozenReferenceMixin.global_rate_parameters`).
    """
    if module.z_prior is not None:
        raise ValueError("Query mapping supports models without a z_prior.")
    n_cols = n_new_batch if n_ref_batch + n_new_batch > 1 else 0  # the new batches' columns
    start = module.n_latent + batch_columns(n_ref_batch + n_new_batch) - n_cols
    for param in module.parameters():
        param.requires_grad_(False)
    for name in HEADS:
        head = getattr(module.decoder, name, None)
        if head is not None:
            head.linear = ExtendedLinear(head.linear, start, n_cols)
    if module.dispersion == "gene-batch" and module.gene_likelihood != "poisson":
        unconstrained = module.theta_unconstrained.detach()
        del module.theta
        module.__class__ = QueryLDVAE
        module.theta_parts = ExtendedTheta(unconstrained, n_ref_batch)
    mix_into(module, FrozenReferenceMixin)
    for layer in module.decoder.modules():
        if isinstance(layer, nn.BatchNorm1d):
            eval_locked(layer)
    if not train_encoder:
        for part in (module.z_encoder, getattr(module, "l_encoder", None)):
            if part is not None:
                eval_locked(part)
    else:
        for part in (module.z_encoder, getattr(module, "l_encoder", None)):
            if part is not None:
                part.requires_grad_(True)
    return module

"""scvi-tools' ``VAE`` keyword arguments that ``scvi.module.LDVAE`` passes on, checked for a linear decoder.

``LDVAE`` takes them so that code written for scvi-tools runs unchanged. What a linear decoder
and scvi-tools' LDVAE encoder can honour is honoured; anything else raises ``ValueError`` with
the reason, instead of being ignored as scvi-tools' LDVAE ignores most of them.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch

NormPlace = Literal["encoder", "decoder", "both", "none"]
NORM_PLACES = ("encoder", "decoder", "both", "none")
SCVI_MODULE_KWARGS = (
    "use_layer_norm",
    "var_activation",
    "encode_covariates",
    "deeply_inject_covariates",
    "extra_encoder_kwargs",
    "extra_decoder_kwargs",
    "use_size_factor_key",
)


def decoder_batch_norm(use_batch_norm: bool | NormPlace | None) -> bool | None:
    """The linear decoder's batch norm for ``use_batch_norm`` given as a bool, None or scvi-tools' place.

    The encoders always use batch norm (as in scvi-tools' LDVAE, whose encoders ignore the
    argument), so 'both' means decoder batch norm, 'encoder' none in the decoder; 'decoder' and
    'none' would drop the encoders' batch norm and are refused.
    """
    if use_batch_norm is None or isinstance(use_batch_norm, bool):
        return use_batch_norm
    if use_batch_norm in ("both", "encoder"):
        return use_batch_norm == "both"
    if use_batch_norm in ("decoder", "none"):
        raise ValueError(
            f"use_batch_norm={use_batch_norm!r} would remove the encoders' batch norm, which LDVAE's encoders "
            "always have (as in scvi-tools' LDVAE). Use 'both' (decoder batch norm, the default) or 'encoder' "
            "(none in the decoder), or a bool for the decoder."
        )
    raise ValueError(f"use_batch_norm must be a bool, None or one of {NORM_PLACES}, got {use_batch_norm!r}.")


def check_scvi_module_kwargs(
    use_layer_norm: bool | NormPlace | None = "none",
    var_activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
    encode_covariates: bool = False,
    deeply_inject_covariates: bool = True,
    extra_encoder_kwargs: dict | None = None,
    extra_decoder_kwargs: dict | None = None,
    use_size_factor_key: bool = False,
) -> None:
    """Refuse, with the reason, the scvi-tools ``VAE`` options a linearly decoded model cannot honour.

    Accepted: ``use_layer_norm`` 'none' (or False/None); ``var_activation`` None or
    ``torch.exp`` (the encoders' variance is ``exp(.) + 1e-4``); ``encode_covariates=False``;
    ``deeply_inject_covariates`` either way (the linear decoder has no hidden layer to inject
    into and the encoders see no covariates, so both values describe the same model); empty
    ``extra_encoder_kwargs`` / ``extra_decoder_kwargs``; ``use_size_factor_key=False``.
    """
    if use_layer_norm not in (None, False, "none"):
        raise ValueError(
            f"use_layer_norm={use_layer_norm!r} is not supported: LDVAE's encoders use batch norm and its decoder is "
            "a single linear map (scvi-tools' LDVAE also builds both without layer norm). Leave it 'none'."
        )
    if var_activation is not None and var_activation is not torch.exp:
        raise ValueError(
            "var_activation must be None or torch.exp: the encoders' variance is exp(.) + 1e-4, the layout "
            "scvi-tools' LDVAE encoders use (they ignore var_activation)."
        )
    if encode_covariates:
        raise ValueError(
            "encode_covariates=True is not supported: the encoders see only log1p(x), as scvi-tools' LDVAE "
            "encoders do; batch and covariates enter the linear decoder."
        )
    if not isinstance(deeply_inject_covariates, bool):
        raise ValueError(f"deeply_inject_covariates must be a bool, got {deeply_inject_covariates!r}.")
    for name, extra in (("extra_encoder_kwargs", extra_encoder_kwargs), ("extra_decoder_kwargs", extra_decoder_kwargs)):
        if extra:
            raise ValueError(
                f"{name} {sorted(extra)} are not supported: LDVAE's encoders and linear decoder take their settings "
                "from the named arguments (n_hidden, n_layers_encoder, dropout_rate, use_batch_norm, bias)."
            )
    if use_size_factor_key:
        raise ValueError(
            "use_size_factor_key=True is not supported (LinearSCVI.setup_anndata takes no size_factor_key, as in "
            "scvi-tools). Use use_observed_lib_size=True for the observed total counts as the library size."
        )

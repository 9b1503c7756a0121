"""Importing a trained ``scvi.model.LinearSCVI``: its module's weights mapped onto :class:`LDVAE`."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from ..data.registry import Registry
from ..models.ldvae import LDVAE
from .io import ModelParts, match_genes


def _scvi_encoder_state(prefix_scvi: str, prefix_ours: str, state: dict, n_layers: int) -> dict:
    out = {}
    for i in range(n_layers):
        for part, ours in (("0", 4 * i), ("1", 4 * i + 1)):
            head = f"{prefix_scvi}.encoder.fc_layers.Layer {i}.{part}."
            for key, value in state.items():
                if key.startswith(head):
                    leaf = key[len(head) :]
                    if ours == 0 and leaf == "weight":  # our first layer stores W.T (nn.InputLinear)
                        leaf, value = "weight_t", value.t().contiguous()
                    out[f"{prefix_ours}.hidden.{ours}.{leaf}"] = value
    for scvi_name, ours in (("mean_encoder", "mean"), ("var_encoder", "log_var")):
        for leaf in ("weight", "bias"):
            out[f"{prefix_ours}.{ours}.{leaf}"] = state[f"{prefix_scvi}.{scvi_name}.{leaf}"]
    return out


def _scvi_head_state(name: str, state: dict) -> dict:
    out = {}
    for part, ours in (("0", "linear"), ("1", "batch_norm")):
        head = f"decoder.{name}.fc_layers.Layer 0.{part}."
        for key, value in state.items():
            if key.startswith(head):
                out[f"decoder.{name}.{ours}.{key[len(head) :]}"] = value
    return out


def _scvi_module_args(scvi_module) -> dict:
    """LDVAE constructor arguments that reproduce ``scvi_module``'s architecture."""
    fc = scvi_module.z_encoder.encoder.fc_layers
    dropout = next((m.p for m in scvi_module.z_encoder.modules() if isinstance(m, torch.nn.Dropout)), 0.0)
    first = scvi_module.decoder.factor_regressor.fc_layers[0]
    return dict(
        n_input=int(scvi_module.n_input),
        n_batch=int(scvi_module.n_batch),
        n_labels=int(scvi_module.n_labels),
        n_hidden=int(scvi_module.n_hidden),
        n_latent=int(scvi_module.n_latent),
        n_layers_encoder=len(fc),
        dropout_rate=float(dropout),
        dispersion=scvi_module.dispersion,
        log_variational=bool(scvi_module.log_variational),
        gene_likelihood=scvi_module.gene_likelihood,
        use_batch_norm=bool(getattr(scvi_module, "use_batch_norm", first[1] is not None)),
        bias=first[0].bias is not None,
        latent_distribution=scvi_module.latent_distribution,
        use_observed_lib_size=bool(scvi_module.use_observed_lib_size),
    )


def module_from_scvi(scvi_module) -> LDVAE:
    """An :class:`~pyro_ldvae.LDVAE` with the weights of a ``scvi.module.LDVAE``.

    Maps scvi-tools' parameter names onto ours (encoder ``fc_layers['Layer i'][0/1]`` to
    ``hidden[4i]/hidden[4i+1]``, ``mean_encoder``/``var_encoder`` to ``mean``/``log_var``, the
    decoder heads' ``fc_layers['Layer 0'][0/1]`` to ``linear``/``batch_norm``), ``px_r``
    ``(genes,)`` or ``(genes, n_cat)`` to ``theta_unconstrained`` (transposed when 2-D), and the
    ``(1, n_batch)`` library prior buffers to ``(n_batch,)``. The result is in eval mode.
    """
    args = _scvi_module_args(scvi_module)
    if args["dispersion"] == "gene-cell":
        raise ValueError("dispersion='gene-cell' cannot be imported (scvi-tools' LDVAE does not support it).")
    state = {k: v.detach().cpu() for k, v in scvi_module.state_dict().items()}
    n_batch = max(args["n_batch"], 1)
    lib_means = state.get("library_log_means", torch.zeros(1, n_batch))
    lib_vars = state.get("library_log_vars", torch.ones(1, n_batch))
    with torch.random.fork_rng(devices=[]):
        module = LDVAE(
            **args,
            library_log_means=None if args["use_observed_lib_size"] else lib_means.numpy(),
            library_log_vars=None if args["use_observed_lib_size"] else lib_vars.numpy(),
        )
    ours = dict(_scvi_encoder_state("z_encoder", "z_encoder", state, args["n_layers_encoder"]))
    if not args["use_observed_lib_size"]:
        ours.update(_scvi_encoder_state("l_encoder", "l_encoder", state, 1))
        ours["library_log_means"] = lib_means.reshape(-1).float()
        ours["library_log_vars"] = lib_vars.reshape(-1).float()
    else:
        ours["library_log_means"] = module.library_log_means
        ours["library_log_vars"] = module.library_log_vars
    ours.update(_scvi_head_state("factor_regressor", state))
    if args["gene_likelihood"] == "zinb":
        ours.update(_scvi_head_state("px_dropout_decoder", state))
    if args["gene_likelihood"] != "poisson" or "px_r" in state:
        px_r = state["px_r"]
        ours["theta_unconstrained"] = px_r.T.contiguous() if px_r.dim() == 2 else px_r
    expected = set(module.state_dict())
    if "theta_unconstrained" not in expected:
        ours.pop("theta_unconstrained", None)
    missing, unexpected = expected - set(ours), set(ours) - expected
    if missing or unexpected:
        raise ValueError(
            f"Cannot map this scvi-tools module: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}."
        )
    module.load_state_dict(ours, strict=True)
    return module.eval()


def _scvi_registry(scvi_model) -> Registry:
    manager = scvi_model.adata_manager
    setup = manager.registry["setup_args"]
    registry = Registry(
        layer=setup.get("layer"),
        batch_key=setup.get("batch_key"),
        labels_key=setup.get("labels_key"),
    )
    if registry.batch_key is not None:
        registry.batch_categories = [str(c) for c in manager.get_state_registry("batch").categorical_mapping]
    if registry.labels_key is not None:
        registry.label_categories = [str(c) for c in manager.get_state_registry("labels").categorical_mapping]
    return registry


def from_scvi(scvi_model, adata: AnnData | None = None) -> ModelParts:
    """The parts of a trained ``scvi.model.LinearSCVI``: weights, setup, settings and history.

    ``LinearSCVI.from_scvi`` assembles them into a :class:`~pyro_ldvae.LinearSCVI`.

    Parameters
    ----------
    scvi_model
        A ``scvi.model.LinearSCVI`` (scvi-tools installed).
    adata
        AnnData to attach (default: the scvi model's); its genes are checked as on ``load``.
    """
    module = module_from_scvi(scvi_model.module)
    var_names = [str(g) for g in scvi_model.adata.var_names]
    adata = scvi_model.adata if adata is None else adata
    settings = dict(
        n_hidden=module.n_hidden,
        n_latent=module.n_latent,
        n_layers=module.n_layers_encoder,
        dropout_rate=module.dropout_rate,
        dispersion=module.dispersion,
        gene_likelihood=module.gene_likelihood,
        latent_distribution=module.latent_distribution,
        use_observed_lib_size=module.use_observed_lib_size,
    )
    if not module.log_variational:
        settings["log_variational"] = False
    if not module.use_batch_norm:
        settings["use_batch_norm"] = False
    if module.bias:
        settings["bias"] = True
    history = getattr(scvi_model, "history_", None) or {}
    indices = {}
    for name in ("train_indices", "validation_indices"):
        value = getattr(scvi_model, name, None)
        if value is not None:
            indices[name] = np.asarray(value, dtype=np.int64)
    return ModelParts(
        settings=settings,
        registry=_scvi_registry(scvi_model),
        var_names=var_names,
        state=module.state_dict(),
        history={k: v.copy() for k, v in history.items() if isinstance(v, pd.DataFrame)},
        is_trained=bool(getattr(scvi_model, "is_trained_", True)),
        adata=match_genes(adata, var_names, "the scvi-tools model"),
        source="the scvi-tools model",
        **indices,
    )

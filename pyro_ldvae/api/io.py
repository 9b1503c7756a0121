"""Saving, loading and importing models, and writing results into AnnData.

A saved model is a directory with

* ``model.pt``: the module's ``state_dict`` (tensors only), read back with
  ``torch.load(..., weights_only=True)``, so loading never runs pickled code;
* ``model.json``: format marker, model class, package and format versions, constructor
  arguments, the setup registry (keys and category orders), ``var_names``, training history and
  split, and the SHA-256 of ``model.pt`` (a truncated or altered weights file is detected);
* ``adata.h5ad`` when saved with ``save_anndata=True``.

Saving writes into a temporary directory next to the target and renames it into place, so an
interrupted save never leaves a directory that loads as a valid but wrong model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from ..data.registry import SETUP_KEY, Registry
from ..models.ldvae import LDVAE

if TYPE_CHECKING:
    from .linear_scvi import LinearSCVI

logger = logging.getLogger(__name__)

FORMAT = "pyro_ldvae"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.pt"
META_FILE = "model.json"
ADATA_FILE = "adata.h5ad"
INDEX_CHUNK = 1 << 16  # cell indices turned into text at a time when saving


@contextmanager
def string_arrays_writable() -> Iterator[None]:
    """Let anndata write pandas string arrays while inside (``allow_write_nullable_strings``).

    pandas 3 makes every string index and column such an array, and anndata 0.11-0.12 refuses
    to write one unless that setting is on (readers older than anndata 0.11 cannot read them).
    Under pandas 2 nothing changes.
    """
    import anndata

    if not hasattr(anndata.settings, "allow_write_nullable_strings"):
        yield
        return
    with anndata.settings.override(allow_write_nullable_strings=True):
        yield


def write_h5ad(adata: AnnData, path: str | os.PathLike) -> None:
    """``adata.write_h5ad(path)``, also when names or labels are pandas string arrays (pandas 3)."""
    with string_arrays_writable():
        adata.write_h5ad(path)


def _package_version() -> str:
    from .._version import __version__

    return __version__


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _history_to_json(history: dict[str, pd.DataFrame]) -> dict:
    return {
        key: {"index": [int(i) for i in frame.index], "values": [float(v) for v in frame.iloc[:, 0]]}
        for key, frame in history.items()
    }


def _history_from_json(payload: dict) -> dict[str, pd.DataFrame]:
    return {
        key: pd.DataFrame({key: item["values"]}, index=pd.Index(item["index"], name="epoch"))
        for key, item in payload.items()
    }


# ----------------------------------------------------------------------------------------
# Save
# ----------------------------------------------------------------------------------------
# Settings that may hold code: a prior given as a callable or an object. Code is never pickled
# (loading a model must not run code from the file): save records its qualified name, and load
# asks the caller for the same object again (``LinearSCVI.load(..., loadings_prior=...)``).
CODE_SETTINGS = ("loadings_prior", "z_prior")


def _code_name(value) -> str:
    named = value if hasattr(value, "__qualname__") else type(value)  # a function or class, else an instance
    return f"{named.__module__}.{named.__qualname__}"


def _settings_for_json(init_params: dict) -> dict:
    settings = dict(init_params)
    for key in CODE_SETTINGS:
        value = settings.get(key)
        if value is not None and not isinstance(value, str):
            settings[key] = {"code": _code_name(value)}
    return settings


def _settings_with_code(settings: dict, code: dict, source: str, directory: Path) -> dict:
    """The saved settings with the caller's objects put back where the model was saved with code."""
    settings = dict(settings)
    for key, value in code.items():
        saved = settings.get(key)
        if isinstance(saved, dict) and "code" in saved:
            if value is None:
                raise ValueError(
                    f"{source} was saved with a custom {key} ({saved['code']}); code is not saved with a model. "
                    f"Pass the same object again: LinearSCVI.load({str(directory)!r}, adata, {key}=...)."
                )
            settings[key] = value
        elif value is not None:
            raise ValueError(f"{source} was saved with {key}={saved!r}, not with a custom one; load it without {key}=.")
    return settings


def save(
    model: LinearSCVI,
    dir_path: str | os.PathLike,
    overwrite: bool = False,
    save_anndata: bool = False,
    prefix: str | None = None,
) -> None:
    """Save ``model`` to the directory ``dir_path`` (created; atomic).

    Parameters
    ----------
    model
        A :class:`~pyro_ldvae.LinearSCVI`.
    dir_path
        Target directory. It must not exist unless ``overwrite``.
    overwrite
        Replace an existing directory (the old one is removed only after the new one is complete).
    save_anndata
        Also write the training AnnData as ``adata.h5ad``.
    prefix
        Prefix of the file names inside the directory.
    """
    target = Path(dir_path)
    if target.exists() and not overwrite:
        raise ValueError(f"{target} already exists; pass overwrite=True to replace it.")
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} exists and is not a directory.")
    prefix = prefix or ""
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_class": type(model).__name__,
        "package_version": _package_version(),
        "init_params": _settings_for_json(model.init_params_),
        "seed": model.seed,
        "registry": json.loads(model.registry.to_json()),
        "var_names": [str(v) for v in model.var_names],
        "n_obs_train": int(model.adata.n_obs) if model.adata is not None else None,
        "is_trained": bool(model.is_trained_),
        # written by _write_meta, chunk by chunk
        "train_indices": [],
        "validation_indices": [],
        "history": _history_to_json(model.history_),
        "weights_file": prefix + WEIGHTS_FILE,
        "adata_file": prefix + ADATA_FILE if save_anndata else None,
    }
    try:
        json.dumps(meta)
    except TypeError as err:
        raise ValueError(f"Cannot save: a model setting is not JSON-serializable ({err}).") from err

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        weights_path = tmp / meta["weights_file"]
        state = {k: v.detach().cpu().clone() for k, v in model.module.state_dict().items()}
        torch.save(state, weights_path)
        meta["weights_sha256"] = _sha256(weights_path)
        if save_anndata:
            write_h5ad(model.adata, tmp / meta["adata_file"])
        # The metadata file is written last: a directory without it is not a model.
        with open(tmp / (prefix + META_FILE), "w") as handle:
            indices = {"train_indices": model.train_indices, "validation_indices": model.validation_indices}
            _write_meta(handle, meta, indices)
            handle.flush()
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp creates 0700; give the usual permissions
        if target.exists():
            backup = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(target, backup)
            os.rename(tmp, target)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("Saved model to %s", target)


def _write_meta(handle, meta: dict, lists: dict[str, np.ndarray]) -> None:
    """Write ``meta`` as indented JSON with the integer arrays ``lists`` as one-line JSON lists.

    The arrays (the train and validation cells) are written ``INDEX_CHUNK`` values at a time:
    built as one indented JSON text, a million indices took about 110 bytes per cell of Python
    objects.
    """
    marks = {key: f"<{key} {uuid.uuid4().hex}>" for key in lists}
    text = json.dumps({**meta, **marks}, indent=1)
    for key, values in lists.items():
        before, text = text.split(json.dumps(marks[key]), 1)
        handle.write(before + "[")
        values = np.asarray(values)
        for start in range(0, len(values), INDEX_CHUNK):
            chunk = values[start : start + INDEX_CHUNK].tolist()
            handle.write((", " if start else "") + ", ".join(map(str, chunk)))
        handle.write("]")
    handle.write(text)


# ----------------------------------------------------------------------------------------
# Load
# ----------------------------------------------------------------------------------------
def read_metadata(dir_path: str | os.PathLike, prefix: str | None = None) -> dict:
    """The checked contents of ``model.json`` in ``dir_path``."""
    directory = Path(dir_path)
    if not directory.is_dir():
        raise ValueError(f"{directory} is not a directory; pass the directory written by model.save().")
    path = directory / ((prefix or "") + META_FILE)
    if not path.exists():
        hint = ""
        if (directory / "model.pt").exists():
            hint = (
                " It has a model.pt but no model.json: if it was saved by scvi-tools, load it with "
                "scvi.model.LinearSCVI.load and import it with pyro_ldvae.LinearSCVI.from_scvi."
            )
        raise ValueError(f"{path} is missing: {directory} is not a saved pyro_ldvae model.{hint}")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is corrupt or truncated ({err}); save the model again.") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a pyro_ldvae model file (no 'format': '{FORMAT}' entry).")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{path} was written by pyro_ldvae {meta.get('package_version', '?')} in format version {version}, "
            f"which this pyro_ldvae {_package_version()} (format {FORMAT_VERSION}) cannot read; upgrade pyro_ldvae."
        )
    required = ("model_class", "init_params", "registry", "var_names", "weights_file", "weights_sha256")
    missing = [key for key in required if key not in meta]
    if missing:
        raise ValueError(f"{path} lacks the entries {missing}; the file is incomplete or corrupt.")
    return meta


def read_weights(path: Path, expected_sha256: str | None, device: torch.device) -> dict[str, torch.Tensor]:
    """Tensors of a weights file, checked against its recorded hash; never unpickles objects."""
    if not path.exists():
        raise ValueError(f"{path} is missing; the saved model is incomplete.")
    if expected_sha256 is not None and _sha256(path) != expected_sha256:
        raise ValueError(f"{path} is corrupt or truncated: its checksum differs from the one recorded at save time.")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"{path} cannot be read as pyro_ldvae weights (it is truncated, corrupt, or holds objects other "
            f"than tensors, which are never unpickled): {first_line}"
        ) from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state_dict of tensors.")
    return state


def _match_genes(adata: AnnData, var_names: list[str], source: str) -> AnnData:
    """``adata`` with the model's genes in the model's order: reordered/subset when all are present."""
    if list(adata.var_names) == var_names:
        return adata
    present = pd.Index(adata.var_names)
    missing = [g for g in var_names if g not in present]
    if missing:
        raise ValueError(
            f"adata lacks {len(missing)} of the {len(var_names)} genes of the model in {source} "
            f"(for example {missing[:5]}); give an AnnData with the genes the model was trained on."
        )
    if not present.is_unique:
        raise ValueError("adata.var_names has duplicates; make them unique (adata.var_names_make_unique()).")
    logger.warning(
        "adata's genes differ in order or number from the model's; using a copy with the model's %d genes in its order.",
        len(var_names),
    )
    return adata[:, var_names].copy()


def _build(adata: AnnData, registry: Registry, init_params: dict, seed: int, source: str) -> LinearSCVI:
    """A LinearSCVI on ``adata`` with the given setup (registered into ``adata.uns``)."""
    from .linear_scvi import LinearSCVI

    adata.uns[SETUP_KEY] = registry.to_json()
    try:
        return LinearSCVI(adata, seed=seed, **init_params)
    except TypeError as err:
        raise ValueError(f"The settings in {source} do not fit this pyro_ldvae version: {err}") from err


def load(
    dir_path: str | os.PathLike,
    adata: AnnData | None = None,
    accelerator: str = "auto",
    device: str | int = "auto",
    prefix: str | None = None,
    loadings_prior=None,
    z_prior=None,
) -> LinearSCVI:
    """Load a model written by :func:`save`.

    Parameters
    ----------
    dir_path
        The directory given to ``save``.
    adata
        AnnData to attach (its genes are checked, and reordered when all are present; its
        batch/label categories must be known to the model). Default: the saved ``adata.h5ad``.
    accelerator, device
        Where to put the module ('auto': CUDA when available).
    prefix
        File name prefix used at save time.
    loadings_prior, z_prior
        Only for a model saved with a custom prior (a callable or an object, which is code and
        is not saved): the same prior again. Its parameters are restored from the file.

    Raises
    ------
    ValueError
        Missing, truncated or corrupt files, another model class, an incompatible version, or an
        AnnData whose genes or categories do not match; the message names the file or the genes.
        A model saved with a custom prior loaded without it, or a prior given for one saved without.
    """
    import anndata

    from .linear_scvi import resolve_device

    directory = Path(dir_path)
    meta = read_metadata(directory, prefix)
    meta_path = directory / ((prefix or "") + META_FILE)
    if meta["model_class"] != "LinearSCVI":
        raise ValueError(f"{meta_path} holds a {meta['model_class']!r} model, not a LinearSCVI.")
    if adata is None:
        if not meta.get("adata_file"):
            raise ValueError(f"{directory} was saved without its AnnData (save_anndata=False); pass adata=.")
        adata_path = directory / meta["adata_file"]
        try:
            adata = anndata.read_h5ad(adata_path)
        except Exception as err:  # h5py raises many types for damaged files
            raise ValueError(f"{adata_path} cannot be read ({type(err).__name__}: {err}).") from err
    target_device = resolve_device(accelerator, device)
    state = read_weights(directory / meta["weights_file"], meta["weights_sha256"], target_device)
    registry = Registry(**meta["registry"])
    adata = _match_genes(adata, list(meta["var_names"]), str(meta_path))
    code = {"loadings_prior": loadings_prior, "z_prior": z_prior}
    settings = _settings_with_code(meta["init_params"], code, str(meta_path), directory)
    model = _build(adata, registry, settings, meta.get("seed", 0), str(meta_path))
    try:
        model.module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first_line = str(err).strip().splitlines()[0]
        raise ValueError(
            f"{directory / meta['weights_file']} does not match the model described in {meta_path}: {first_line}"
        ) from err
    model.module.to(target_device).eval()
    model.history_ = _history_from_json(meta.get("history", {}))
    model.is_trained_ = bool(meta.get("is_trained", True))
    model.train_indices = np.asarray(meta.get("train_indices", []), dtype=np.int64)
    model.validation_indices = np.asarray(meta.get("validation_indices", []), dtype=np.int64)
    return model


# ----------------------------------------------------------------------------------------
# Import from scvi-tools
# ----------------------------------------------------------------------------------------
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


def from_scvi(scvi_model, adata: AnnData | None = None) -> LinearSCVI:
    """A :class:`~pyro_ldvae.LinearSCVI` with the weights, setup and history of a trained
    ``scvi.model.LinearSCVI``.

    Parameters
    ----------
    scvi_model
        A ``scvi.model.LinearSCVI`` (scvi-tools installed).
    adata
        AnnData to attach (default: the scvi model's). Its ``uns`` receives pyro_ldvae's setup.
    """
    module = module_from_scvi(scvi_model.module)
    registry = _scvi_registry(scvi_model)
    adata = scvi_model.adata if adata is None else adata
    adata = _match_genes(adata, [str(g) for g in scvi_model.adata.var_names], "the scvi-tools model")
    init_params = dict(
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
        init_params["log_variational"] = False
    if not module.use_batch_norm:
        init_params["use_batch_norm"] = False
    if module.bias:
        init_params["bias"] = True
    model = _build(adata, registry, init_params, 0, "the scvi-tools model")
    model.module = module
    history = getattr(scvi_model, "history_", None) or {}
    model.history_ = {k: v.copy() for k, v in history.items() if isinstance(v, pd.DataFrame)}
    model.is_trained_ = bool(getattr(scvi_model, "is_trained_", True))
    for name in ("train_indices", "validation_indices"):
        value = getattr(scvi_model, name, None)
        if value is not None:
            setattr(model, name, np.asarray(value, dtype=np.int64))
    return model


# ----------------------------------------------------------------------------------------
# Results into AnnData
# ----------------------------------------------------------------------------------------
def _h5ad_scalar(value):
    """A value h5ad can store in ``uns``: None and other objects become strings."""
    if isinstance(value, (bool, int, float, str, np.integer, np.floating)):
        return value
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def write_results(model: LinearSCVI, adata: AnnData, key: str = "ldvae") -> AnnData:
    """Store the model's results in ``adata`` (scanpy style) and return it.

    Writes ``obsm['X_<key>']`` (cells, n_latent) posterior means, ``varm['<key>_loadings']``
    (genes, n_latent) and ``uns['<key>']`` with ``params`` (settings), ``registry`` (JSON),
    ``history`` (per-epoch arrays), ``variance_explained`` and ``variance_explained_fraction``
    (per factor), ``factor_names`` and ``factor_order`` (by decreasing variance), ``version``.
    Everything in ``uns`` is h5ad-writable.
    """
    if list(adata.var_names) != list(model.var_names):
        raise ValueError(
            "adata.var_names differ from the model's genes; subset and order them as model.var_names first."
        )
    latent = model.get_latent_representation(adata)
    loadings = model.get_loadings()
    variance = model.get_factor_variance_explained(adata)
    adata.obsm[f"X_{key}"] = np.asarray(latent, dtype=np.float32)
    adata.varm[f"{key}_loadings"] = loadings.to_numpy(dtype=np.float32)
    history = {}
    for name, frame in model.history_.items():
        history[name] = frame.iloc[:, 0].to_numpy(dtype=np.float64)
    adata.uns[key] = {
        "params": {k: _h5ad_scalar(v) for k, v in model.init_params_.items()},
        "registry": model.registry.to_json(),
        "history": history,
        "history_epochs": np.asarray(next(iter(model.history_.values())).index, dtype=np.int64)
        if model.history_
        else np.zeros(0, dtype=np.int64),
        "variance_explained": variance["variance"].to_numpy(dtype=np.float64),
        "variance_explained_fraction": variance["fraction"].to_numpy(dtype=np.float64),
        "factor_names": np.asarray(loadings.columns, dtype=str),
        "factor_order": np.asarray(variance.sort_values("variance", ascending=False).index, dtype=str),
        "version": _package_version(),
    }
    return adata

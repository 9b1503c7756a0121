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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from ..data.registry import Registry
from . import multimodal

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


@dataclass
class ModelParts:
    """What a model is made of, as saved and loaded: ``LinearSCVI`` is rebuilt from these.

    ``settings`` are the constructor arguments, ``state`` the module's ``state_dict``,
    ``adata`` the cells it is attached to (genes in the model's order), ``source`` names where
    the parts came from (for error messages).
    """

    settings: dict
    registry: Registry
    var_names: list[str]
    state: dict[str, torch.Tensor]
    history: dict[str, pd.DataFrame] = field(default_factory=dict)
    seed: int = 0
    is_trained: bool = True
    train_indices: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    validation_indices: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    adata: AnnData | None = None
    source: str = "the saved model"


def package_version() -> str:
    """The installed pyro_ldvae version."""
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
    parts: ModelParts,
    dir_path: str | os.PathLike,
    overwrite: bool = False,
    save_anndata: bool = False,
    prefix: str | None = None,
    model_class: str = "LinearSCVI",
) -> None:
    """Save a model's ``parts`` to the directory ``dir_path`` (created; atomic).

    Parameters
    ----------
    parts
        The model's parts (``LinearSCVI.save`` gathers them).
    dir_path
        Target directory. It must not exist unless ``overwrite``.
    overwrite
        Replace an existing directory (the old one is removed only after the new one is complete).
    save_anndata
        Also write the training AnnData (``parts.adata``) as ``adata.h5ad``.
    prefix
        Prefix of the file names inside the directory.
    model_class
        The class name recorded in ``model.json``, which ``load`` checks.
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
        "model_class": model_class,
        "package_version": package_version(),
        "init_params": _settings_for_json(parts.settings),
        "seed": parts.seed,
        "registry": json.loads(parts.registry.to_json()),
        "var_names": [str(v) for v in parts.var_names],
        "n_obs_train": int(parts.adata.n_obs) if parts.adata is not None else None,
        "is_trained": bool(parts.is_trained),
        # written by _write_meta, chunk by chunk
        "train_indices": [],
        "validation_indices": [],
        "history": _history_to_json(parts.history),
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
        state = {k: v.detach().cpu().clone() for k, v in parts.state.items()}
        torch.save(state, weights_path)
        meta["weights_sha256"] = _sha256(weights_path)
        if save_anndata:
            write_h5ad(parts.adata, tmp / meta["adata_file"])
        # The metadata file is written last: a directory without it is not a model.
        with open(tmp / (prefix + META_FILE), "w") as handle:
            indices = {"train_indices": parts.train_indices, "validation_indices": parts.validation_indices}
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
            f"which this pyro_ldvae {package_version()} (format {FORMAT_VERSION}) cannot read; upgrade pyro_ldvae."
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


def match_genes(adata: AnnData, var_names: list[str], source: str) -> AnnData:
    """``adata`` with the model's genes in the model's order (reordered when only the order differs).

    Raises
    ------
    ValueError
        When ``adata`` lacks genes of the model or has genes the model does not know (as
        scvi-tools does): results on other genes would be silently wrong.
    """
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
    extra = present.difference(pd.Index(var_names))
    if len(extra):
        raise ValueError(
            f"adata has {len(extra)} genes that the model in {source} does not know (for example "
            f"{list(extra[:5])}); subset it to the model's genes: adata[:, model_var_names].copy()."
        )
    logger.warning("adata's genes are in another order than the model's; using a copy in the model's order.")
    return adata[:, var_names].copy()


def load(
    dir_path: str | os.PathLike,
    adata: AnnData | None = None,
    device: torch.device | str = "cpu",
    prefix: str | None = None,
    loadings_prior=None,
    z_prior=None,
    model_class: str = "LinearSCVI",
) -> ModelParts:
    """The parts of a model written by :func:`save`, checked; ``LinearSCVI.load`` assembles them.

    Parameters
    ----------
    dir_path
        The directory given to ``save``.
    adata
        AnnData to attach (its genes are checked, and reordered when only their order differs), or a
        MuData set up with ``setup_mudata`` (its RNA modality is attached).
        Default: the saved ``adata.h5ad``.
    device
        Where to put the weights.
    prefix
        File name prefix used at save time.
    loadings_prior, z_prior
        Only for a model saved with a custom prior (a callable or an object, which is code and
        is not saved): the same prior again. Its parameters are restored from the file.
    model_class
        The class the model must have been saved from.

    Raises
    ------
    ValueError
        Missing, truncated or corrupt files, another model class, an incompatible version, or an
        AnnData whose genes do not match; the message names the file or the genes. A model saved
        with a custom prior loaded without it, or a prior given for one saved without.
    """
    import anndata

    adata = multimodal.split(adata)[1]
    directory = Path(dir_path)
    meta = read_metadata(directory, prefix)
    meta_path = directory / ((prefix or "") + META_FILE)
    if meta["model_class"] != model_class:
        raise ValueError(f"{meta_path} holds a {meta['model_class']!r} model, not a {model_class}.")
    if adata is None:
        if not meta.get("adata_file"):
            raise ValueError(f"{directory} was saved without its AnnData (save_anndata=False); pass adata=.")
        adata_path = directory / meta["adata_file"]
        try:
            adata = anndata.read_h5ad(adata_path)
        except Exception as err:  # h5py raises many types for damaged files
            raise ValueError(f"{adata_path} cannot be read ({type(err).__name__}: {err}).") from err
    weights_path = directory / meta["weights_file"]
    state = read_weights(weights_path, meta["weights_sha256"], torch.device(device))
    code = {"loadings_prior": loadings_prior, "z_prior": z_prior}
    return ModelParts(
        settings=_settings_with_code(meta["init_params"], code, str(meta_path), directory),
        registry=Registry(**meta["registry"]),
        var_names=list(meta["var_names"]),
        state=state,
        history=_history_from_json(meta.get("history", {})),
        seed=meta.get("seed", 0),
        is_trained=bool(meta.get("is_trained", True)),
        train_indices=np.asarray(meta.get("train_indices", []), dtype=np.int64),
        validation_indices=np.asarray(meta.get("validation_indices", []), dtype=np.int64),
        adata=match_genes(adata, list(meta["var_names"]), str(meta_path)),
        source=f"{weights_path} and {meta_path}",
    )

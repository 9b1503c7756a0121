"""Bad input is rejected early with a clear message.

``BAD_INPUTS`` is the table: each row builds an AnnData and says at which stage (setup_anndata,
the constructor, train, inference) it must fail and which words the message must contain. The
same rows that the command line can express run through ``pyro-ldvae fit`` as well.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from pyro_ldvae import LinearSCVI, simulate
from pyro_ldvae.api import cli
from pyro_ldvae.data.registry import SETUP_KEY


@pytest.fixture(scope="module")
def base() -> anndata.AnnData:
    adata = simulate(n_cells=60, n_genes=20, n_latent=2, n_batch=2, seed=1)
    adata.obs["label"] = pd.Categorical(np.where(np.arange(60) % 2, "a", "b"))
    adata.obs["age"] = np.linspace(20.0, 80.0, 60)
    adata.obs["donor"] = pd.Categorical(np.where(np.arange(60) % 3, "d1", "d2"))
    adata.layers["counts"] = adata.X.copy()
    return adata


def _with_value(adata, value, layer=None):
    dense = adata.X.toarray()
    dense[3, 4] = value
    if layer is None:
        adata.X = sp.csr_matrix(dense)
    else:
        adata.layers[layer] = dense
    return adata


def _lognorm(adata):
    adata.X = sp.csr_matrix(np.log1p(adata.X.toarray() / adata.X.sum(1).A * 1e4))
    return adata


def _zero_cell(adata):
    dense = adata.X.toarray()
    dense[[5, 7]] = 0
    adata.X = sp.csr_matrix(dense)
    return adata


def _obs(column, values):
    def change(adata):
        adata.obs[column] = values
        return adata

    return change


def _new_data(change):
    """Inference on a copy of the training data changed by ``change``."""
    return change


@dataclass
class Case:
    """One bad input: how to make it, where it must fail, what the message must say."""

    name: str
    make: Callable[[anndata.AnnData], anndata.AnnData] = lambda a: a
    setup: dict | None = field(default_factory=dict)  # None: setup_anndata is not called
    model: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    infer: Callable[[anndata.AnnData], anndata.AnnData] | None = None  # new data at inference time
    stage: str = "setup"  # setup | model | train | infer
    words: tuple[str, ...] = ()
    error: type = ValueError
    cli: list[str] | None = None  # CLI arguments expressing it (None: not expressible)


NAN_MISSING = pd.Categorical(["a", None] * 30)

BAD_INPUTS = [
    # values of the count matrix
    Case("negative values", lambda a: _with_value(a, -1.0), words=("adata.X", "negative"), cli=[]),
    Case("NaN values", lambda a: _with_value(a, np.nan), words=("adata.X", "NaN"), cli=[]),
    Case("infinite values", lambda a: _with_value(a, np.inf), words=("adata.X", "infinite"), cli=[]),
    Case("log-normalized X", _lognorm, words=("adata.X", "non-integer", "log", "layer="), cli=[]),
    Case(
        "non-integer layer",
        lambda a: _with_value(a, 0.5, layer="counts"),
        setup={"layer": "counts"},
        words=("adata.layers['counts']", "non-integer"),
        cli=["--layer", "counts"],
    ),
    Case(
        "negative layer",
        lambda a: _with_value(a, -3, layer="counts"),
        setup={"layer": "counts"},
        words=("layers['counts']", "negative"),
    ),
    # shape and totals
    Case("zero cells", lambda a: a[:0].copy(), words=("0 cells",), cli=[]),
    Case("zero genes", lambda a: a[:, :0].copy(), words=("0 genes",), cli=[]),
    Case("cells with zero total count", _zero_cell, words=("2 cell(s)", "total count of zero", "filter_cells"), cli=[]),
    # keys
    Case("missing layer", setup={"layer": "raw"}, words=("layer 'raw'", "adata.layers"), cli=["--layer", "raw"]),
    Case(
        "missing batch_key",
        setup={"batch_key": "sample"},
        words=("batch_key", "'sample'"),
        cli=["--batch-key", "sample"],
    ),
    Case(
        "missing labels_key", setup={"labels_key": "type"}, words=("labels_key", "'type'"), cli=["--labels-key", "type"]
    ),
    Case(
        "missing categorical covariate",
        setup={"categorical_covariate_keys": ["site"]},
        words=("categorical covariate", "'site'"),
    ),
    Case(
        "missing continuous covariate",
        setup={"continuous_covariate_keys": ["dose"]},
        words=("continuous covariate", "'dose'"),
    ),
    Case(
        "covariate keys as a string",
        setup={"categorical_covariate_keys": "donor"},
        words=("categorical_covariate_keys", "list"),
    ),
    Case(
        "batch with missing values",
        _obs("batch", NAN_MISSING),
        setup={"batch_key": "batch"},
        words=("obs['batch']", "missing"),
        cli=["--batch-key", "batch"],
    ),
    Case(
        "labels with missing values",
        _obs("label", NAN_MISSING),
        setup={"labels_key": "label"},
        words=("obs['label']", "missing"),
        cli=["--labels-key", "label"],
    ),
    Case(
        "non-numeric continuous covariate",
        _obs("age", ["old", "young"] * 30),
        setup={"continuous_covariate_keys": ["age"]},
        words=("obs['age']", "not numeric"),
    ),
    Case(
        "continuous covariate with NaN",
        _obs("age", [np.nan] + [1.0] * 59),
        setup={"continuous_covariate_keys": ["age"]},
        words=("obs['age']", "NaN"),
    ),
    # model arguments
    Case("n_latent < 1", model={"n_latent": 0}, stage="model", words=("n_latent",), cli=["--n-latent", "0"]),
    Case("fractional n_latent", model={"n_latent": 2.5}, stage="model", words=("n_latent",)),
    Case("n_hidden < 1", model={"n_hidden": 0}, stage="model", words=("n_hidden",)),
    Case("n_layers < 1", model={"n_layers": 0}, stage="model", words=("n_layers",)),
    Case("dropout_rate = 1", model={"dropout_rate": 1.0}, stage="model", words=("dropout_rate", "[0, 1)")),
    Case("dropout_rate < 0", model={"dropout_rate": -0.1}, stage="model", words=("dropout_rate",)),
    Case("unknown dispersion", model={"dispersion": "gene-gene"}, stage="model", words=("dispersion", "'gene-gene'")),
    Case(
        "unknown gene_likelihood",
        model={"gene_likelihood": "gaussian"},
        stage="model",
        words=("gene_likelihood", "'gaussian'"),
    ),
    Case(
        "unknown latent_distribution",
        model={"latent_distribution": "lognormal"},
        stage="model",
        words=("latent_distribution",),
    ),
    Case(
        "gene-label without labels",
        model={"dispersion": "gene-label"},
        stage="model",
        words=("gene-label", "labels_key"),
        cli=["--dispersion", "gene-label"],
    ),
    # training arguments and tiny datasets
    Case("max_epochs = 0", train={"max_epochs": 0}, stage="train", words=("max_epochs",), cli=["--max-epochs", "0"]),
    Case(
        "batch_size = 1",
        train={"batch_size": 1},
        stage="train",
        words=("batch_size", "batch norm"),
        cli=["--batch-size", "1"],
    ),
    Case("train_size > 1", train={"train_size": 1.5}, stage="train", words=("train_size",)),
    Case(
        "train + validation > 1",
        train={"train_size": 0.8, "validation_size": 0.5},
        stage="train",
        words=("train_size + validation_size",),
    ),
    Case("gradient_clip_val <= 0", train={"gradient_clip_val": -1.0}, stage="train", words=("gradient_clip_val",)),
    Case("checkpoint_every = 0", train={"checkpoint_every": 0}, stage="train", words=("checkpoint_every",)),
    Case("two cells", lambda a: a[:2].copy(), stage="train", words=("training", "at least 2"), cli=[]),
    Case("one cell", lambda a: a[:1].copy(), stage="train", words=("training", "at least 2"), cli=[]),
    # new data at inference time
    Case("inference: missing genes", infer=lambda a: a[:, 3:].copy(), stage="infer", words=("missing", "gene_0")),
    Case(
        "inference: unseen batch",
        setup={"batch_key": "batch"},
        infer=_obs("batch", pd.Categorical(["batch_9"] * 60)),
        stage="infer",
        words=("obs['batch']", "never saw", "batch_9"),
    ),
    Case(
        "inference: unseen covariate category",
        setup={"categorical_covariate_keys": ["donor"]},
        infer=_obs("donor", pd.Categorical(["d3"] * 60)),
        stage="infer",
        words=("obs['donor']", "never saw"),
    ),
    Case(
        "inference: batch column gone",
        setup={"batch_key": "batch"},
        infer=lambda a: _drop(a, "batch"),
        stage="infer",
        words=("batch_key", "'batch'"),
    ),
    Case("inference: NaN counts", infer=lambda a: _with_value(a, np.nan), stage="infer", words=("adata.X", "NaN")),
    Case("inference: log-normalized", infer=_lognorm, stage="infer", words=("non-integer",)),
    Case("inference: zero cells", infer=lambda a: a[:0].copy(), stage="infer", words=("0 cells",)),
    Case(
        "inference: non-numeric covariate",
        setup={"continuous_covariate_keys": ["age"]},
        infer=_obs("age", ["old"] * 60),
        stage="infer",
        words=("obs['age']", "not numeric"),
    ),
    Case("not set up", setup=None, stage="setup", words=("setup_anndata",)),
    Case("X is None", lambda a: anndata.AnnData(obs=a.obs, var=a.var), words=("adata.X is None", "layer="), cli=[]),
    Case("inference: duplicated genes", infer=lambda a: _duplicate_genes(a), stage="infer", words=("duplicates",)),
]


def _drop(adata, column):
    del adata.obs[column]
    return adata


def _duplicate_genes(adata):
    adata = anndata.concat([adata, adata[:, :2]], axis=1, merge="first")
    return adata


def _attempt(case: Case, base: anndata.AnnData):
    """Run ``case`` through the Python API; return (exception, adata)."""
    adata = case.make(base.copy())
    model = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if case.setup is not None:
                LinearSCVI.setup_anndata(adata, **case.setup)
            model = LinearSCVI(adata, **{"n_latent": 2, "n_hidden": 8, **case.model})
            model.train(**{"max_epochs": 1, "progress_bar": False, **case.train})
            if case.infer is not None:
                model.get_latent_representation(case.infer(base.copy()))
    except Exception as err:  # noqa: BLE001 - we assert the type below
        return err, adata, model
    return None, adata, model


def test_bad_inputs_are_rejected_cleanly(base):
    """Every row of BAD_INPUTS raises the expected type at its stage, naming the problem."""
    rejected = []
    for case in BAD_INPUTS:
        err, adata, model = _attempt(case, base)
        assert err is not None, f"{case.name}: accepted"
        assert isinstance(err, case.error), f"{case.name}: {type(err).__name__}: {err}"
        message = str(err)
        for word in case.words:
            assert word in message, f"{case.name}: {word!r} not in {message!r}"
        assert "\n" not in message, f"{case.name}: multi-line message"
        # Nothing was written: a failed setup leaves no registry, a failed model/training no trained model.
        # It failed at its stage, and nothing was written: a failed setup leaves no registry, a failed
        # constructor no model, a failed train() an untrained model with no history.
        assert (SETUP_KEY in adata.uns) == (case.stage != "setup"), case.name
        assert (model is None) == (case.stage in ("setup", "model")), case.name
        if case.stage == "train":
            assert not model.is_trained_ and not model.history, case.name
        if case.stage == "infer":
            assert model.is_trained_, case.name
        rejected.append(case.name)
    assert len(rejected) == len(BAD_INPUTS)


CLI_CASES = [case for case in BAD_INPUTS if case.cli is not None]


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.name for c in CLI_CASES])
def test_cli_rejects_bad_input(case, base, tmp_path, capsys):
    path, out = tmp_path / "in.h5ad", tmp_path / "out.h5ad"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        case.make(base.copy()).write_h5ad(path)
    code = cli.main(["fit", str(path), "-o", str(out), "--max-epochs", "1", *case.cli])
    err = capsys.readouterr().err.strip()
    assert code == 2
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyro-ldvae: error:"), err
    for word in case.words:  # the CLI may name the option (--n-latent) rather than the argument
        assert word in err or word.replace("_", "-") in err, (word, err)
    assert not out.exists()


def test_cli_file_errors(base, tmp_path, capsys):
    out = tmp_path / "out.h5ad"
    assert cli.main(["fit", str(tmp_path / "absent.h5ad"), "-o", str(out)]) == 2
    assert "absent.h5ad" in capsys.readouterr().err
    garbage = tmp_path / "garbage.h5ad"
    garbage.write_bytes(b"not an hdf5 file" * 10)
    assert cli.main(["fit", str(garbage), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "garbage.h5ad" in err and len(err.splitlines()) == 1
    assert not out.exists()
    out.write_text("keep me")
    assert cli.main(["fit", str(garbage), "-o", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_text() == "keep me"


def test_readme_records_the_count():
    """The documentation of the test suite's guarantees quotes the size of the table."""
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "docs" / "guarantees.md").read_text()
    n = len(BAD_INPUTS)
    assert f"{n} bad inputs tried, {n} rejected cleanly" in readme


# ---------------------------------------------------------------------------------------------
# What must be accepted
# ---------------------------------------------------------------------------------------------
def _fit(adata, **setup):
    LinearSCVI.setup_anndata(adata, **setup)
    model = LinearSCVI(adata, n_latent=2, n_hidden=8, seed=3)
    model.train(max_epochs=1, batch_size=32, progress_bar=False)
    return model


FORMATS = {
    "dense float32": lambda x: x.toarray(),
    "dense int64": lambda x: x.toarray().astype(np.int64),
    "dense float64 Fortran": lambda x: np.asfortranarray(x.toarray().astype(np.float64)),
    "csr float64": lambda x: x.astype(np.float64),
    "csr int32": lambda x: x.astype(np.int32),
    "csc": lambda x: x.tocsc(),
    "csr_array": lambda x: sp.csr_array(x),
}


def _seeded_elbo(model: LinearSCVI) -> float:
    torch.manual_seed(0)  # get_elbo draws from torch's global stream, which training leaves alone
    return model.get_elbo()


def test_matrix_formats_give_the_canonical_result(base):
    reference = _fit(base.copy())
    ref_loadings, ref_elbo = reference.get_loadings().to_numpy(), _seeded_elbo(reference)
    for name, convert in FORMATS.items():
        adata = base.copy()
        adata.X = convert(adata.X)
        model = _fit(adata)
        np.testing.assert_array_equal(model.get_loadings().to_numpy(), ref_loadings, err_msg=name)
        assert _seeded_elbo(model) == ref_elbo, name
    # a view of a larger AnnData is the same as its copy
    bigger = anndata.concat([base, base[:10]], merge="first", index_unique="-")
    view = bigger[: base.n_obs]
    assert view.is_view
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _fit(view)
    np.testing.assert_array_equal(model.get_loadings().to_numpy(), ref_loadings)


def test_value_checks_on_backed_matrices(tmp_path):
    """On-disk (backed) sparse and dense matrices are read in row chunks, never whole."""
    from pyro_ldvae.data import validate

    dense = np.ones((40, 6), dtype=np.float32)
    dense[33, 2] = 0.25
    for name, matrix in (("sparse", sp.csr_matrix(dense)), ("dense", dense)):
        anndata.AnnData(matrix).write_h5ad(tmp_path / f"{name}.h5ad")
        backed = anndata.read_h5ad(tmp_path / f"{name}.h5ad", backed="r")
        with pytest.raises(ValueError, match="1 non-integer"):
            validate.check_count_values(backed.X)
        np.testing.assert_array_equal(validate.totals(backed.X)[0], dense.sum(1))
        backed.file.close()


def test_value_checks_on_every_matrix_type():
    """The checks read sparse matrices' stored values (COO too, which AnnData itself refuses in X)
    and dense ones in row chunks."""
    from pyro_ldvae.data import validate

    dense = np.zeros((50, 7), dtype=np.float64)
    dense[40, 3] = 0.5
    for matrix in (dense, sp.coo_matrix(dense), sp.csc_matrix(dense), sp.csr_array(dense)):
        with pytest.raises(ValueError, match="non-integer"):
            validate.check_count_values(matrix)
        validate.check_count_values(matrix, integers=False)
    old, validate.CHUNK_VALUES = validate.CHUNK_VALUES, 8  # many small chunks: the value in row 40 is still found
    try:
        with pytest.raises(ValueError, match="1 non-integer"):
            validate.check_count_values(dense)
    finally:
        validate.CHUNK_VALUES = old
    validate.check_count_values(dense.astype(np.int64) - 0)  # integers need no fraction check
    with pytest.raises(ValueError, match="negative"):
        validate.check_count_values(-np.ones((2, 2), dtype=np.int32))


def test_not_an_anndata():
    with pytest.raises(ValueError, match="must be an AnnData"):
        LinearSCVI.setup_anndata(np.ones((5, 3)))


def test_check_counts_opt_out(base):
    adata = _lognorm(base.copy())
    with pytest.raises(ValueError, match="check_counts=False"):
        LinearSCVI.setup_anndata(adata)
    model = _fit(adata, check_counts=False)
    assert np.isfinite(model.get_elbo())
    with pytest.raises(ValueError, match="negative"):  # the opt-out is only about integers
        LinearSCVI.setup_anndata(_with_value(adata, -1.0), check_counts=False)


def test_all_zero_genes_warn(base):
    adata = base.copy()
    dense = adata.X.toarray()
    dense[:, [2, 9]] = 0
    adata.X = sp.csr_matrix(dense)
    with pytest.warns(UserWarning, match="2 gene"):
        LinearSCVI.setup_anndata(adata)


def test_genes_are_matched_at_inference(base):
    model = _fit(base.copy())
    expected = model.get_latent_representation()
    reordered = base[:, base.var_names[::-1]].copy()
    np.testing.assert_allclose(model.get_latent_representation(reordered), expected, rtol=1e-6)
    extra = anndata.concat(
        [
            base,
            anndata.AnnData(
                sp.csr_matrix(np.ones((base.n_obs, 3), np.float32)),
                obs=base.obs[[]],
                var=pd.DataFrame(index=["x1", "x2", "x3"]),
            ),
        ],
        axis=1,
        merge="first",
    )
    np.testing.assert_allclose(model.get_latent_representation(extra[:, ::-1].copy()), expected, rtol=1e-6)


def test_tiny_datasets_train(base):
    """5 cells (one minibatch, batch norm on 5 cells), a last minibatch of one cell moved to
    validation, or dropped (``drop_last``)."""
    drop_last = {"batch_size": 4, "train_size": 1.0, "datasplitter_kwargs": {"drop_last": True}}
    for n_cells, kwargs in ((5, {}), (10, {"batch_size": 4}), (9, drop_last)):
        adata = base[:n_cells].copy()
        LinearSCVI.setup_anndata(adata)
        model = LinearSCVI(adata, n_latent=2, n_hidden=8)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.train(max_epochs=2, progress_bar=False, **kwargs)
        assert np.isfinite(model.history["elbo_train"].to_numpy()).all(), n_cells
        assert model.get_latent_representation(indices=[0]).shape == (1, 2)
        assert all(torch.isfinite(p).all() for p in model.module.parameters())


def test_successive_new_anndatas_are_not_confused(base, monkeypatch):
    """Inference on temporary AnnData objects: a freed object's id() is reused by the next one,
    which must not get the cached cells of the first (a silent wrong answer). Worst case made
    deterministic: every object has the same id()."""
    import pyro_ldvae.api.linear_scvi as model_mod

    model = _fit(base.copy())
    expected = model.get_latent_representation(base[30:].copy())
    monkeypatch.setattr(model_mod, "id", lambda obj: 0, raising=False)
    model.get_latent_representation(base[:30].copy())
    np.testing.assert_array_equal(model.get_latent_representation(base[30:].copy()), expected)

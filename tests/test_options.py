"""Training options are defined once (``TrainOptions``); the API, ``tl.ldvae`` and the CLI derive from it."""

from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import pytest
import torch

from pyro_ldvae import LinearSCVI, simulate, tl
from pyro_ldvae.api.cli import build_parser
from pyro_ldvae.data.cells import CellData, DeviceCells
from pyro_ldvae.data.registry import get_registry
from pyro_ldvae.data.sources import CutMinibatches, ResidentMinibatches, minibatch_source
from pyro_ldvae.infer import policy
from pyro_ldvae.infer.options import TrainOptions
from pyro_ldvae.infer.steps import STEPS


def test_linear_scvi_train_takes_exactly_the_options_with_their_defaults():
    params = dict(inspect.signature(LinearSCVI.train).parameters)
    params.pop("self")
    fields = {f.name: f.default for f in dataclasses.fields(TrainOptions)}
    assert list(params) == list(fields)
    # scvi-tools' **trainer_kwargs is the last option, a dict
    assert params.pop("trainer_kwargs").kind is inspect.Parameter.VAR_KEYWORD and fields.pop("trainer_kwargs") is None
    assert {name: p.default for name, p in params.items()} == fields


def test_unknown_options_name_the_known_ones():
    with pytest.raises(TypeError, match="unknown training option.*max_epochs"):
        TrainOptions().replace(max_epoch=3)
    adata = simulate(n_cells=60, n_genes=10, seed=0)
    with pytest.raises(TypeError, match="unknown training option"):
        tl.ldvae(adata, n_latent=2, max_epochs=1, train_kwargs={"learning_rate": 1e-2})
    assert "X_ldvae" not in adata.obsm  # refused before any work


def test_cli_training_flags_come_from_the_options():
    fit = build_parser()._subparsers._group_actions[0].choices["fit"]
    flags = {a.dest: a for a in fit._actions}
    for option in dataclasses.fields(TrainOptions):
        if option.metadata["cli"] is not None:
            assert option.name in flags and flags[option.name].default == option.default, option.name
    assert set(flags["accelerator"].choices) == {"auto", "cpu", "gpu", "cuda"}


@pytest.fixture(scope="module")
def cells():
    adata = simulate(n_cells=200, n_genes=20, seed=0)
    LinearSCVI.setup_anndata(adata)
    return LinearSCVI(adata, n_latent=2, seed=0), CellData(adata, get_registry(adata))


def test_the_policy_picks_one_step_and_its_minibatch_form(cells):
    model, _ = cells
    cpu, module = torch.device("cpu"), model.module
    many = policy.TRACED_STEP_MIN_STEPS
    assert policy.choose_step(None, None, module, cpu, None, False, many) == "traced"
    assert policy.choose_step(None, None, module, cpu, None, False, many - 1) == "eager"
    assert policy.choose_step(None, False, module, cpu, None, True, many) == "eager"
    assert policy.choose_step(None, None, module, torch.device("cuda"), None, True, many) == "cuda_graph"
    assert policy.choose_step(False, None, module, torch.device("cuda"), None, True, many) == "eager"
    with pytest.raises(ValueError, match="needs the counts resident"):
        policy.choose_step(True, None, module, torch.device("cuda"), None, False, many)
    assert {kind: step.form for kind, step in STEPS.items()} == {
        "eager": "csr",
        "traced": "sparse_counts",
        "cuda_graph": "positions",
    }


def test_each_source_is_built_in_the_form_it_yields(cells):
    _, data = cells
    train_idx = np.arange(150)
    generator = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    cut = minibatch_source(data, train_idx, 64, form="sparse_counts")
    assert isinstance(cut, CutMinibatches) and cut.form == "sparse_counts"
    positions = minibatch_source(data, train_idx, 64, form="positions", resident=DeviceCells(data, "cpu"))
    assert isinstance(positions, ResidentMinibatches)
    items = list(positions(generator()))
    assert [len(p) for p in items] == [64, 64, 22] and all(p.dtype == torch.int64 for p in items)
    eager = list(minibatch_source(data, train_idx, 64, data_on_device=True)(generator()))
    for p, mb in zip(items, eager):
        assert torch.equal(positions.minibatch(p).x, mb.x.to_dense())
    with pytest.raises(ValueError, match="positions only from counts resident"):
        CutMinibatches(data, train_idx, 64, torch.device("cpu"), form="positions")

"""The CUDA-graph training step: capturable on CPU by a scan, equal to eager on a GPU.

A CUDA graph cannot capture a host synchronisation, a host-to-device copy or a value-dependent
shape. CI has no GPU, so the first tests run the very step that training captures (the real
``train_svi`` with a stand-in for the graph that runs it eagerly) under a dispatch mode that
records every operation that would be one of those on a GPU. The tests marked ``cuda`` run on a
GPU machine: the captured step trains like the eager one.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import scipy.sparse as sp
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pyro_ldvae import LinearSCVI, priors, simulate
from pyro_ldvae.data.cells import CellData, DeviceCells
from pyro_ldvae.data.registry import get_registry
from pyro_ldvae.infer import policy
from pyro_ldvae.infer import steps as steps_mod
from pyro_ldvae.infer import train as train_mod
from pyro_ldvae.models import capture

# Operations that read a value back to the host (a sync), make a tensor from host data (on a
# GPU, a copy), or give a shape that depends on values.
HOST_SYNC = {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal"}
HOST_COPY = {"aten::lift_fresh", "aten::lift_fresh_copy"}
DYNAMIC_SHAPE = {"aten::nonzero", "aten::masked_select", "aten::unique", "aten::_unique2", "aten::repeat_interleave"}


class CaptureHazards(TorchDispatchMode):
    """Records the operations that a CUDA graph could not capture."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        empty_tensor = name in HOST_COPY and args and args[0].numel() == 0  # Pyro asks torch.tensor(()).device
        masked = name in ("aten::index", "aten::index_put", "aten::index_put_") and any(
            i is not None and i.dtype == torch.bool for i in args[1]
        )  # x[mask] gathers a value-dependent number of elements
        if (name in HOST_SYNC | HOST_COPY | DYNAMIC_SHAPE or masked) and not empty_tensor:
            self.found.append(f"{name} (boolean mask)" if masked else name)
        return func(*args, **(kwargs or {}))


class ScannedStep:
    """Stands in for ``GraphedTrainingStep`` on CPU: runs the step eagerly under the scan."""

    instances: list[ScannedStep] = []

    def __init__(self, step, batch_size, device):
        self.step, self.batch_size = step, batch_size
        self.positions = torch.zeros(batch_size, dtype=torch.int64)
        self.kl_weight = torch.zeros(())
        self.calls, self.hazards = 0, []
        ScannedStep.instances.append(self)

    def set_kl_weight(self, kl_weight):
        self.kl_weight.fill_(kl_weight)

    def __call__(self, positions):
        assert positions.shape == (self.batch_size,)
        self.positions.copy_(positions)
        with CaptureHazards() as scan:
            self.step(self.positions, self.kl_weight)
        self.hazards += scan.found
        self.calls += 1


@pytest.fixture(params=["dense", "csr"])
def graph_on_cpu(monkeypatch, request):
    """train_svi on CPU takes its CUDA-graph path, with resident counts (dense or CSR) and the scan."""
    ScannedStep.instances.clear()
    dense = request.param == "dense"
    monkeypatch.setattr(steps_mod, "GraphedTrainingStep", ScannedStep)
    monkeypatch.setattr(policy, "use_cuda_graphs", lambda *args: True)
    monkeypatch.setattr(train_mod, "resident_cells", lambda data, device, flag: DeviceCells(data, device, dense=dense))
    make_optimizer = train_mod.make_optimizer  # capturable Adam needs CUDA: the plain one here
    monkeypatch.setattr(train_mod, "make_optimizer", lambda module, plan, capturable: make_optimizer(module, plan))
    layouts = set()
    minibatch = DeviceCells.minibatch

    def recording_minibatch(self, *args, **kwargs):
        mb = minibatch(self, *args, **kwargs)
        layouts.add(mb.x.layout)
        return mb

    monkeypatch.setattr(DeviceCells, "minibatch", recording_minibatch)
    return ScannedStep.instances, layouts


@pytest.mark.parametrize(
    "model_kwargs",
    [
        {},
        {"gene_likelihood": "zinb", "dispersion": "gene-cell"},
        {"gene_likelihood": "poisson", "latent_distribution": "ln", "use_observed_lib_size": True},
        {"dispersion": "gene-batch", "gradient_clip_val": 1.0},
        {"loadings_prior": "horseshoe"},
        {"loadings_prior": "normal", "z_prior": priors.LearnedScaleNormal(3)},
        {"loadings_prior": "laplace"},
        {"loadings_prior": "ard", "z_prior": priors.GaussianMixture(3)},
        {
            "gene_programs": {"a": [f"gene_{g}" for g in range(8)], "b": [f"gene_{g}" for g in range(8, 16)]},
            "n_unannotated": 1,
        },
    ],
    ids=[
        "nb",
        "zinb-gene-cell",
        "poisson-ln-observed-library",
        "gene-batch-clipped",
        "horseshoe",
        "normal-learned-scale-z",
        "laplace",
        "ard-mixture-z",
        "gene-programs",
    ],
)
def test_the_training_step_has_nothing_a_cuda_graph_cannot_capture(graph_on_cpu, model_kwargs):
    adata = simulate(n_cells=300, n_genes=40, n_batch=2, seed=1)
    LinearSCVI.setup_anndata(adata, batch_key="batch")
    clip = model_kwargs.pop("gradient_clip_val", None)
    model = LinearSCVI(adata, n_latent=3, seed=0, **model_kwargs)
    cells = CellData(adata, get_registry(adata))
    train_idx, val_idx = np.arange(270), np.arange(270, 300)
    history = train_mod.train_svi(
        model.module, cells, train_idx, val_idx, max_epochs=2, batch_size=64, progress_bar=False, gradient_clip_val=clip
    )
    (step,), layouts = graph_on_cpu
    assert step.calls == 2 * (270 // 64)  # every full minibatch went through the graph path
    assert layouts == {torch.strided}  # dense minibatches, also from CSR
    assert step.hazards == []
    assert np.isfinite(history["elbo_validation"].to_numpy()).all()


def test_the_scan_finds_what_a_graph_cannot_capture():
    """The scan itself: a sync, a host copy and a value-dependent shape are each found."""
    x = torch.arange(6.0)
    with CaptureHazards() as scan:
        float(x.sum())
        torch.distributions.Normal(x, 1.0)  # the number 1.0 becomes a tensor: a host copy on a GPU
        x[x > 2]
        torch.repeat_interleave(torch.tensor([1, 2]).long()[:0])
    assert "aten::_local_scalar_dense" in scan.found
    assert "aten::lift_fresh" in scan.found
    assert "aten::index (boolean mask)" in scan.found
    assert "aten::repeat_interleave" in scan.found


def test_cuda_graphs_true_without_a_gpu_names_the_reason():
    adata = simulate(n_cells=100, n_genes=20, seed=0)
    LinearSCVI.setup_anndata(adata)
    model = LinearSCVI(adata, n_latent=2)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        model.train(max_epochs=1, accelerator="cpu", cuda_graphs=True, progress_bar=False)


def test_a_users_prior_is_scanned_for_the_capture_rules():
    """A user's prior that makes tensors from numbers is not captured in a CUDA graph; built-ins are."""

    def students_t(n_genes, n_latent):
        return pyro.sample("loadings", dist.StudentT(3.0, 0.0, 0.3).expand([n_genes, n_latent]).to_event(2))

    assert capture.capturable(None) and capture.capturable(priors.Horseshoe()) and capture.capturable(priors.ARD())
    assert capture.capturable(priors.GaussianMixture(3))
    assert not capture.capturable(students_t)
    assert not capture.capturable(type("MyHorseshoe", (priors.Horseshoe,), {})())  # a subclass may differ
    adata = simulate(n_cells=100, n_genes=20, seed=0)
    LinearSCVI.setup_anndata(adata)
    model = LinearSCVI(adata, n_latent=2, loadings_prior=students_t)
    # Its numbers would be host-to-device copies in a CUDA graph; on CPU they are recorded constants.
    (reason,) = capture.eager_reasons(model.module, "cuda")
    assert "from tensors, not from Python numbers" in reason and "aten::lift_fresh" in reason
    assert capture.eager_reasons(model.module, "cpu") == []


def test_tensor_half_cauchy_is_torchs_half_cauchy():
    scale = torch.rand(5) + 0.1
    ours, torchs = priors.TensorHalfCauchy(scale), dist.HalfCauchy(scale)
    value = torch.rand(5) * 4
    torch.testing.assert_close(ours.log_prob(value), torchs.log_prob(value), rtol=0, atol=0)
    assert ours.support == torchs.support
    torch.manual_seed(0)
    drawn = ours.sample((3,))
    torch.manual_seed(0)
    assert torch.equal(drawn, torchs.sample((3,)))
    assert ours.expand([2, 5]).log_prob(value).shape == (2, 5)


def test_fixed_shape_rows_from_csr_equal_the_dense_rows():
    """Duplicated cells, empty cells, the fullest cells (every slot filled) and a single cell."""
    generator = np.random.default_rng(0)
    counts = generator.poisson(0.4, size=(40, 30)).astype(np.float32)
    counts[[3, 17]] = 0  # cells without counts
    counts[5] = generator.poisson(5.0, size=30) + 1  # a full cell
    cells = SimpleNamespace(
        X=sp.csr_matrix(counts), n_obs=40, n_vars=30, batch=np.zeros(40, np.int64), labels=np.zeros(40, np.int64)
    )
    cells.cat_covs = cells.cont_covs = None
    resident = DeviceCells(cells, "cpu")
    fullest = np.argsort(-(counts > 0).sum(1))
    for idx in ([3, 3, 5, 0, 17, 39, 5], fullest[:6], [17], list(range(40))):
        idx = torch.as_tensor(np.asarray(idx, dtype=np.int64))
        rows = resident.fixed_shape_rows(idx)
        assert rows.layout == torch.strided
        torch.testing.assert_close(rows, torch.from_numpy(counts)[idx], rtol=0, atol=0)
        assert torch.equal(rows, resident.rows(idx).to_dense())
    assert resident.capacity(6) == int((counts[fullest[:6]] > 0).sum())


def test_dense_resident_counts_give_the_same_minibatches(monkeypatch):
    adata = simulate(n_cells=500, n_genes=60, n_batch=2, seed=2)
    LinearSCVI.setup_anndata(adata, batch_key="batch")
    cells = CellData(adata, get_registry(adata))
    monkeypatch.setattr(DeviceCells, "DENSIFY_ELEMENTS", 60 * 7)  # blocks of 7 rows, the last one short
    dense = DeviceCells(cells, "cpu", dense=True)
    csr = DeviceCells(cells, "cpu")
    idx = torch.tensor([499, 0, 7, 7, 250, 13])
    a, b = dense.minibatch(idx), csr.minibatch(idx)
    assert not dense.sparse and a.x.layout == torch.strided
    assert torch.equal(a.x, b.x.to_dense())
    assert torch.equal(a.batch, b.batch)
    np.testing.assert_array_equal(dense.X.numpy(), cells.X.toarray())


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("model_kwargs", [{}, {"loadings_prior": "horseshoe"}], ids=["point-loadings", "horseshoe"])
def test_captured_training_matches_eager_training_on_gpu(model_kwargs):
    adata = simulate(n_cells=3000, n_genes=200, n_latent=4, seed=5)
    LinearSCVI.setup_anndata(adata)
    results = {}
    for graphs in (False, True):
        model = LinearSCVI(adata, n_latent=4, seed=0, **model_kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a failed capture warns: make it fail here
            model.train(max_epochs=8, accelerator="gpu", cuda_graphs=graphs, progress_bar=False, seed=0)
        results[graphs] = model.history["elbo_validation"]["elbo_validation"].to_numpy()
    eager, graphed = results[False], results[True]
    assert np.isfinite(graphed).all()
    assert graphed[-1] < graphed[0]  # it learns
    assert abs(graphed[-1] - eager[-1]) / abs(eager[-1]) < 0.01


@cuda
def test_a_replayed_step_equals_an_eager_step():
    """From the same state and seed, an epoch whose last full step is a replay ends where an
    all-eager epoch ends: the graph computes the same step, random draws included."""
    adata = simulate(n_cells=600, n_genes=100, seed=8)
    LinearSCVI.setup_anndata(adata)
    cells = CellData(adata, get_registry(adata))
    train_idx, val_idx = np.arange(540), np.arange(540, 600)  # 4 full minibatches of 128, then 28 cells
    states = {}
    for graphs in (False, True):
        model = LinearSCVI(adata, n_latent=3, seed=0)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            train_mod.train_svi(
                model.module,
                cells,
                train_idx,
                val_idx,
                max_epochs=2,
                device="cuda",
                progress_bar=False,
                cuda_graphs=graphs,
            )
        states[graphs] = {k: v.detach().cpu() for k, v in model.module.state_dict().items()}
    for name, eager in states[False].items():
        torch.testing.assert_close(states[True][name], eager, rtol=1e-4, atol=1e-5, msg=name)


@cuda
def test_captured_training_from_csr_counts_on_gpu(monkeypatch):
    """Counts too large for a dense copy stay CSR on the GPU; the captured step gathers them."""
    fits = DeviceCells.fits
    monkeypatch.setattr(DeviceCells, "fits", staticmethod(lambda cells, device, fraction=0.5, dense=False: not dense))
    adata = simulate(n_cells=3000, n_genes=200, n_latent=4, seed=5)
    LinearSCVI.setup_anndata(adata)
    model = LinearSCVI(adata, n_latent=4, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        model.train(max_epochs=8, accelerator="gpu", cuda_graphs=True, progress_bar=False, seed=0)
    monkeypatch.setattr(DeviceCells, "fits", fits)
    eager = LinearSCVI(adata, n_latent=4, seed=0)
    eager.train(max_epochs=8, accelerator="gpu", cuda_graphs=False, progress_bar=False, seed=0)
    graphed_curve = model.history["elbo_validation"]["elbo_validation"].to_numpy()
    eager_curve = eager.history["elbo_validation"]["elbo_validation"].to_numpy()
    assert graphed_curve[-1] < graphed_curve[0]
    assert abs(graphed_curve[-1] - eager_curve[-1]) / abs(eager_curve[-1]) < 0.01


@cuda
def test_gpu_inference_equals_cpu_inference_for_the_same_parameters():
    adata = simulate(n_cells=400, n_genes=50, seed=6)
    LinearSCVI.setup_anndata(adata)
    model = LinearSCVI(adata, n_latent=3, seed=0)
    model.train(max_epochs=2, accelerator="cpu", progress_bar=False)
    on_cpu = model.get_latent_representation()
    model.module.to("cuda")
    np.testing.assert_allclose(model.get_latent_representation(), on_cpu, rtol=1e-4, atol=1e-5)
    # the count likelihood of sparse and dense minibatches on the GPU, with the same draws
    cells = CellData(adata, get_registry(adata))
    idx = np.arange(0, 400, 3)
    elbos = []
    for sparse in (True, False):
        torch.manual_seed(0)
        elbo, per_cell = model.module.elbo(cells.minibatch(idx, "cuda", sparse=sparse))
        elbos.append(per_cell.cpu())
    torch.testing.assert_close(elbos[0], elbos[1], rtol=1e-5, atol=1e-3)


@cuda
def test_sparse_products_and_transpose_on_gpu():
    from pyro_ldvae.kernels.linear import _csr_matmul, _csr_transpose

    generator = torch.Generator().manual_seed(0)
    dense = torch.rand(64, 300, generator=generator)
    dense[dense < 0.9] = 0
    x = dense.to_sparse_csr().cuda()
    weight = torch.randn(300, 16, generator=generator).cuda()
    torch.testing.assert_close(_csr_matmul(x, weight), dense.cuda() @ weight, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_csr_transpose(x).to_dense(), dense.t().cuda())

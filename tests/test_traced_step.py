"""The CPU training step replayed from a recorded graph: the eager step's results, bit for bit."""

from __future__ import annotations

import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import scipy.sparse as sp
import torch

from pyro_ldvae import LinearSCVI, priors, simulate
from pyro_ldvae.data.cells import CellData
from pyro_ldvae.data.registry import get_registry
from pyro_ldvae.infer import policy
from pyro_ldvae.infer import steps as steps_mod
from pyro_ldvae.infer import traced_step as traced_mod
from pyro_ldvae.infer import train as train_mod
from pyro_ldvae.infer.plan import TrainingPlan
from pyro_ldvae.kernels.sparse import SparseCounts

from .conftest import shared_dataset

N_CELLS, BATCH = 300, 64
N_TRAIN = 270


class CountingStep(traced_mod.TracedTrainingStep):
    """The real traced step, counting its replays and the numbers of non-zeros it saw."""

    instances: list[CountingStep] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.replayed, self.non_zeros = 0, set()
        CountingStep.instances.append(self)

    def __call__(self, mb, kl_weight):
        result = super().__call__(mb, kl_weight)
        if result is not None:
            self.replayed += 1
            values = mb.x.val if isinstance(mb.x, SparseCounts) else mb.x.values()
            self.non_zeros.add(int(values.shape[0]))
        return result


@pytest.fixture
def counting(monkeypatch):
    CountingStep.instances.clear()
    monkeypatch.setattr(steps_mod, "TracedTrainingStep", CountingStep)
    # Record every kind of step, however few: these short runs then replay all their steps.
    monkeypatch.setattr(CountingStep, "MIN_REPLAYS", 1)
    return CountingStep.instances


def _train(model_kwargs: dict, traced: bool, epochs: int = 3, batch_key: str | None = "batch"):
    adata = simulate(n_cells=N_CELLS, n_genes=40, n_batch=2, seed=1)
    adata.obs["site"] = np.where(np.arange(N_CELLS) % 3 == 0, "a", "b")
    adata.obs["depth"] = np.linspace(-1.0, 1.0, N_CELLS)
    model_kwargs = dict(model_kwargs)
    covariates = model_kwargs.pop("covariates", False)
    LinearSCVI.setup_anndata(
        adata,
        batch_key=batch_key,
        categorical_covariate_keys=["site"] if covariates else None,
        continuous_covariate_keys=["depth"] if covariates else None,
    )
    clip = model_kwargs.pop("gradient_clip_val", None)
    model = LinearSCVI(adata, n_latent=3, seed=0, **model_kwargs)
    cells = CellData(adata, get_registry(adata))
    # KL warm-up over 3 epochs: epoch 0 (weight 0, z terms masked out) and the later epochs
    # (weights 1/3 and 2/3, not exact in float32) replay graphs of their own
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a failed recording would fall back silently
        history = train_mod.train_svi(
            model.module,
            cells,
            np.arange(N_TRAIN),
            np.arange(N_TRAIN, N_CELLS),
            max_epochs=epochs,
            plan_kwargs={"n_epochs_kl_warmup": 3},
            batch_size=BATCH,
            progress_bar=False,
            gradient_clip_val=clip,
            traced_step=traced,
        )
    return model.module.state_dict(), history


def students_t(n_genes, n_latent):
    """A prior of the user's own that follows the CPU capture rules (numbers become recorded constants)."""
    return pyro.sample("loadings", dist.StudentT(3.0, 0.0, 0.3).expand([n_genes, n_latent]).to_event(2))


# Functions, so that each training gets its own prior objects (a prior module's weights train).
MODELS = {
    "user-prior": lambda: {"loadings_prior": students_t},
    "nb": lambda: {},
    "zinb-gene-cell": lambda: {"gene_likelihood": "zinb", "dispersion": "gene-cell"},
    "poisson-ln-observed-library": lambda: {
        "gene_likelihood": "poisson",
        "latent_distribution": "ln",
        "use_observed_lib_size": True,
    },
    "gene-batch-clipped-covariates": lambda: {"dispersion": "gene-batch", "gradient_clip_val": 1.0, "covariates": True},
    "horseshoe": lambda: {"loadings_prior": "horseshoe"},
    "normal-learned-scale-z": lambda: {"loadings_prior": "normal", "z_prior": priors.LearnedScaleNormal(3)},
    "ard-mixture-z": lambda: {"loadings_prior": "ard", "z_prior": priors.GaussianMixture(3)},
}


@pytest.mark.parametrize("model", sorted(MODELS))
def test_replayed_training_equals_eager_training_bit_for_bit(counting, model):
    _check_replay_equals_eager(counting, model, interpreter="torchscript")


def test_the_python_replay_also_equals_eager_training(counting, monkeypatch):
    """Where TorchScript cannot take a graph, generated Python code replays it, with the same results."""
    monkeypatch.setattr(traced_mod, "script_replay", lambda graph: None)
    _check_replay_equals_eager(counting, "gene-batch-clipped-covariates", interpreter="python")


def _check_replay_equals_eager(counting, model: str, interpreter: str) -> None:
    eager_state, eager_history = _train(MODELS[model](), traced=False)
    assert counting == []
    traced_state, traced_history = _train(MODELS[model](), traced=True)
    (step,) = counting
    # One graph per minibatch size (full, last) and KL weight (0 in epoch 0, positive after);
    # every step replays.
    assert step.failure is None
    full, last = N_TRAIN // BATCH, N_TRAIN % BATCH
    assert set(step.graphs) == {(BATCH, True), (last, True), (BATCH, False), (last, False)}
    assert {replay.interpreter for replay in step.replays.values()} == {interpreter}
    assert step.replayed == 3 * (full + 1)
    assert len(step.non_zeros) > 3  # one graph served minibatches with different numbers of non-zeros
    assert eager_state.keys() == traced_state.keys()
    for name, value in eager_state.items():
        assert torch.equal(value, traced_state[name]), name  # parameters and batch-norm statistics
    for key in ("elbo_train", "elbo_validation"):
        np.testing.assert_array_equal(eager_history[key].to_numpy(), traced_history[key].to_numpy())


def test_sparse_counts_hold_the_matrix_and_its_transpose():
    matrix = sp.random(7, 11, density=0.3, format="csr", dtype=np.float32, random_state=0)
    matrix.data = np.ceil(matrix.data * 5)
    counts = SparseCounts.from_scipy(matrix)
    dense = torch.from_numpy(matrix.toarray())
    assert torch.equal(counts.to_dense(), dense)
    transposed = matrix.T.tocsr()
    assert np.array_equal(counts.crow_t.numpy(), transposed.indptr)
    assert np.array_equal(counts.col_t.numpy(), transposed.indices)
    assert np.array_equal(counts.val_t.numpy(), transposed.data)
    logged = counts.map_values(torch.log1p)
    assert torch.equal(logged.val, torch.log1p(counts.val)) and torch.equal(logged.val_t, torch.log1p(counts.val_t))
    assert counts.row.dtype == counts.col_t.dtype == torch.int64
    from_torch = SparseCounts.from_torch_csr(torch.from_numpy(matrix.toarray()).to_sparse_csr())
    assert all(torch.equal(a, b) for a, b in zip(from_torch.tensors(), counts.tensors()))
    rows = np.array([6, 0, 6, 3])  # a repeated row; empty rows come with density 0.3 at this seed
    for cut in (matrix, sp.csr_matrix((matrix.data, matrix.indices.astype(np.int64), matrix.indptr), matrix.shape)):
        direct = SparseCounts.from_scipy_rows(cut, rows)
        assert all(torch.equal(a, b) for a, b in zip(direct.tensors(), SparseCounts.from_scipy(matrix[rows]).tensors()))
    assert (np.diff(matrix.indptr) == 0).any()


def test_the_encoder_and_likelihood_read_sparse_counts_as_dense_counts():
    """SparseCounts give the dense input's encoder output, weight gradient and NB log-density."""
    from pyro_ldvae.models.likelihoods import NegativeBinomial
    from pyro_ldvae.models.nn import InputLinear

    torch.manual_seed(0)
    matrix = sp.random(16, 30, density=0.2, format="csr", dtype=np.float32, random_state=1)
    matrix.data = np.ceil(matrix.data * 9)
    counts, dense = SparseCounts.from_scipy(matrix), torch.from_numpy(matrix.toarray())
    layer = InputLinear(30, 8)
    out_sparse = layer(counts)
    (grad_sparse,) = torch.autograd.grad(out_sparse.square().sum(), layer.weight_t)
    out_dense = layer(dense)
    (grad_dense,) = torch.autograd.grad(out_dense.square().sum(), layer.weight_t)
    torch.testing.assert_close(out_sparse, out_dense)
    torch.testing.assert_close(grad_sparse, grad_dense)
    mu, theta = torch.rand(16, 30) * 3 + 0.1, torch.rand(30) + 0.5
    nb = NegativeBinomial(mu, theta)
    torch.testing.assert_close(nb.log_prob(counts), nb.log_prob(dense))


def test_recording_refuses_a_step_that_depends_on_the_number_of_non_zeros():
    """A graph specialised to one minibatch's number of non-zeros would be wrong for the next one."""
    matrix = sp.random(6, 9, density=0.4, format="csr", dtype=np.float32, random_state=2)
    counts = SparseCounts.from_scipy(matrix)
    data = (counts.tensors(),)
    weight = torch.ones(9, requires_grad=True)

    def plain(params, buffers, data):
        col, val = data[0][2], data[0][3]
        return (params[0][col] * val).sum()

    def branching(params, buffers, data):
        val = data[0][3]
        scale = 2.0 if val.shape[0] > 10 else 1.0  # a condition on the shape: a guard
        return (params[0][data[0][2]] * val).sum() * scale

    graph = traced_mod.record(plain, [weight], [], data, counts)
    other = SparseCounts.from_scipy(sp.random(6, 9, density=0.7, format="csr", dtype=np.float32, random_state=3))
    assert other.val.shape != counts.val.shape
    torch.testing.assert_close(graph([weight], [], (other.tensors(),)), plain([weight], [], (other.tensors(),)))
    with pytest.raises(RuntimeError, match="depends on the shapes"):
        traced_mod.record(branching, [weight], [], data, counts)


def test_a_failed_recording_warns_and_training_goes_on_eagerly(monkeypatch, counting):
    def failing_record(*args, **kwargs):
        raise NotImplementedError("no graph today")

    monkeypatch.setattr(traced_mod, "record", failing_record)
    adata = simulate(n_cells=200, n_genes=30, seed=0)
    LinearSCVI.setup_anndata(adata)
    model = LinearSCVI(adata, n_latent=2, seed=0)
    with pytest.warns(RuntimeWarning, match="no graph today.*traced_step=False"):
        model.train(max_epochs=2, batch_size=32, traced_step=True, progress_bar=False)
    (step,) = counting
    assert step.replayed == 0 and step.failure is not None
    assert np.isfinite(model.history["elbo_validation"].to_numpy()).all()


def test_when_the_step_is_traced(counting):
    """By default for runs of TRACED_STEP_MIN_STEPS full minibatches; True that cannot be met names why."""
    adata = simulate(n_cells=200, n_genes=30, seed=0)
    LinearSCVI.setup_anndata(adata)
    model = LinearSCVI(adata, n_latent=2, seed=0)
    use = policy.use_traced_step
    cpu = torch.device("cpu")
    many, few = policy.TRACED_STEP_MIN_STEPS, policy.TRACED_STEP_MIN_STEPS - 1
    assert use(None, model.module, cpu, None, many) and not use(None, model.module, cpu, None, few)
    assert use(True, model.module, cpu, None, 1) and not use(False, model.module, cpu, None, many)
    assert not use(None, model.module, torch.device("cuda"), None, many)
    with pytest.raises(ValueError, match="distributed training runs eagerly"):
        use(True, model.module, cpu, object(), many)

    custom = LinearSCVI(adata, n_latent=2, loadings_prior=students_t)  # the user's prior, replayable on CPU
    assert use(None, custom.module, cpu, None, many)
    model.train(max_epochs=2, batch_size=32, progress_bar=False)  # 10 full steps: eager by default
    assert counting == []


def host_read_prior(n_genes, n_latent):
    scale = pyro.sample("scale", dist.HalfNormal(torch.ones(())))
    return pyro.sample("loadings", dist.Normal(0.0, float(scale.detach())).expand([n_genes, n_latent]).to_event(2))


def numpy_draw_prior(n_genes, n_latent):
    scale = torch.tensor(np.random.uniform(0.5, 1.0), dtype=torch.float32)  # frozen by a replay
    return pyro.sample("loadings", dist.Normal(torch.zeros(()), scale).expand([n_genes, n_latent]).to_event(2))


def masking_prior(n_genes, n_latent):
    loadings = pyro.sample(
        "loadings", dist.Laplace(torch.zeros(()), torch.ones(())).expand([n_genes, n_latent]).to_event(2)
    )
    return loadings[loadings.abs() > 0.1].sum() * 0 + loadings  # a value-dependent shape


@pytest.mark.parametrize(
    "prior, rule",
    [
        (host_read_prior, "read no value back"),
        (numpy_draw_prior, "do the same at every step"),
        (masking_prior, "no shape that depends on values"),
    ],
    ids=["host-read", "numpy-draw", "mask"],
)
def test_a_user_prior_that_breaks_a_capture_rule_trains_eagerly_and_the_warning_names_the_rule(counting, prior, rule):
    adata = simulate(n_cells=200, n_genes=30, seed=0)
    LinearSCVI.setup_anndata(adata)
    model = LinearSCVI(adata, n_latent=2, seed=0, loadings_prior=prior)
    cpu, many = torch.device("cpu"), policy.TRACED_STEP_MIN_STEPS
    state = torch.random.get_rng_state()
    with pytest.warns(RuntimeWarning, match=f"runs eagerly.*{rule}.*traced_step=False"):
        assert policy.choose_step(None, None, model.module, cpu, None, False, many) == "eager"
    assert torch.equal(torch.random.get_rng_state(), state)  # the scan leaves the user's random state alone
    with pytest.raises(ValueError, match=f"traced_step=True cannot be met.*{rule}"):
        model.train(max_epochs=1, traced_step=True, progress_bar=False)
    model.train(max_epochs=2, batch_size=32, progress_bar=False)  # by default: eager steps, no recording
    assert counting == [] and np.isfinite(model.history["elbo_validation"].to_numpy()).all()


def test_only_kinds_of_steps_that_repay_a_recording_are_recorded():
    """Steps are counted by (cells, KL weight 0) over the epochs to come; a kind is recorded only
    if it will take at least MIN_REPLAYS steps."""
    plan = TrainingPlan(n_epochs_kl_warmup=2)
    assert policy.planned_step_kinds(plan, 0, 3, N_TRAIN, BATCH) == {
        (64, True): 4,
        (14, True): 1,
        (64, False): 8,
        (14, False): 2,
    }
    assert policy.planned_step_kinds(plan, 1, 3, N_TRAIN + 1 - 14, BATCH) == {
        (64, False): 8
    }  # a last cell alone is dropped
    never_zero = TrainingPlan(n_epochs_kl_warmup=2, min_kl_weight=0.1)
    assert policy.planned_step_kinds(never_zero, 0, 2, 128, BATCH) == {(64, False): 4}

    adata = simulate(n_cells=N_CELLS, n_genes=40, seed=1)
    LinearSCVI.setup_anndata(adata)
    model = LinearSCVI(adata, n_latent=3, seed=0)
    cells = CellData(adata, get_registry(adata))
    mb = cells.minibatch(np.arange(BATCH), sparse=True)
    need = traced_mod.TracedTrainingStep.MIN_REPLAYS
    few = traced_mod.TracedTrainingStep(model.module, N_TRAIN, {(BATCH, False): need - 1})
    assert few.accepts(mb) and few(mb, 0.5) is None and few.graphs == {}
    enough = traced_mod.TracedTrainingStep(model.module, N_TRAIN, {(BATCH, False): need})
    assert enough(mb, 0.5) is not None and set(enough.graphs) == {(BATCH, False)}
    assert enough(mb, 0.0) is None and set(enough.graphs) == {(BATCH, False)}  # weight 0 is another kind


def test_steps_left_eager_take_the_traced_steps_counts_and_give_the_same_results(counting, monkeypatch):
    """With the traced step on, minibatches are cut as SparseCounts; kinds too rare to record
    step eagerly on them, with the results of eager steps on torch CSR counts."""
    monkeypatch.setattr(CountingStep, "MIN_REPLAYS", 5)  # the full minibatches' kind only, from epoch 1
    eager_state, eager_history = _train({}, traced=False)
    traced_state, traced_history = _train({}, traced=True)
    (step,) = counting
    assert set(step.graphs) == {(BATCH, False)}
    assert step.replayed == 2 * (N_TRAIN // BATCH)  # epoch 0 (weight 0) and the last minibatches: eager
    for name, value in eager_state.items():
        assert torch.equal(value, traced_state[name]), name
    for key in ("elbo_train", "elbo_validation"):
        np.testing.assert_array_equal(eager_history[key].to_numpy(), traced_history[key].to_numpy())


def test_replayed_training_on_disk_equals_eager_training(tmp_path, counting):
    """Counts read from an .h5ad opened with backed='r' (torch CSR minibatches) replay too."""
    import anndata

    adata = simulate(n_cells=N_CELLS, n_genes=40, n_batch=2, seed=1)
    adata.write_h5ad(tmp_path / "cells.h5ad")
    states = []
    for traced in (False, True):
        backed = anndata.read_h5ad(tmp_path / "cells.h5ad", backed="r")
        LinearSCVI.setup_anndata(backed, batch_key="batch")
        model = LinearSCVI(backed, n_latent=3, seed=0)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            model.train(max_epochs=3, batch_size=BATCH, traced_step=traced, progress_bar=False)
        states.append(model.module.state_dict())
        backed.file.close()
    (step,) = counting
    assert step.replayed > 0 and step.failure is None
    for name, value in states[0].items():
        assert torch.equal(value, states[1][name]), name


def test_replayed_training_on_real_counts_equals_eager_training(counting):
    """cbmc, 4 epochs. When the graph took the KL weight as a float32 tensor, the replay first
    differed from eager training at the 183rd step with a positive weight (epoch 3's last
    minibatch of 76 cells, weight 3/400), by 6e-8 in the z encoder's gradients. The weight
    now enters in float64, and training on these counts stays exact."""
    import anndata

    adata = anndata.read_h5ad(shared_dataset("cbmc_citeseq_8617.h5ad"))
    states = []
    for traced in (False, True):
        LinearSCVI.setup_anndata(adata)
        model = LinearSCVI(adata, n_latent=10, seed=0)
        model.train(max_epochs=4, traced_step=traced, progress_bar=False)
        states.append(model.module.state_dict())
    (step,) = counting
    assert step.replayed == 4 * 61 and step.failure is None  # 7,756 training cells: 60 full + 1 per epoch
    for name, value in states[0].items():
        assert torch.equal(value, states[1][name]), name


@pytest.mark.parametrize("new_factors", [0, 2], ids=["new-batches", "new-factors"])
def test_a_query_models_replayed_training_equals_eager_training(counting, new_factors):
    """A query model's frozen reference parameters enter the graph as fixed inputs; its new batch
    columns are a slice of each decoder weight, whose gradient the replay hands to Adam in the
    parameter's own layout (a strided gradient made the fused Adam step wrong)."""
    import anndata

    from pyro_ldvae.api.simulate_query import simulate_query

    reference_cells, query_cells = simulate_query(n_reference=240, n_query=160, n_genes=40, seed=0)
    LinearSCVI.setup_anndata(reference_cells, batch_key="batch")
    reference = LinearSCVI(reference_cells, n_latent=3, n_hidden=16, dispersion="gene-batch", seed=0)
    reference.train(max_epochs=2, batch_size=128, progress_bar=False)
    results = []
    for traced in (False, True):
        query = anndata.concat([reference_cells[:60].copy(), query_cells])  # known batches and a new one
        query.obs["batch"] = query.obs["batch"].astype(str)
        query.X = sp.csr_matrix(query.X)
        with torch.random.fork_rng():
            torch.manual_seed(1)  # the new factors' initial weights
            model = LinearSCVI.load_query_data(query, reference, n_new_factors=new_factors)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a failed recording would fall back silently
            model.train(max_epochs=3, batch_size=BATCH, traced_step=traced, progress_bar=False)
        results.append((model.module.state_dict(), model.history["elbo_train"].to_numpy()))
    (step,) = counting
    assert step.failure is None and step.replayed > 0
    (eager_state, eager_elbo), (traced_state, traced_elbo) = results
    for name, value in eager_state.items():
        assert torch.equal(value, traced_state[name]), name
    np.testing.assert_array_equal(eager_elbo, traced_elbo)

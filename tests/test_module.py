"""The Pyro module: trace shapes, the ELBO against Pyro's own estimator, and parity with scvi-tools."""

from __future__ import annotations

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import TraceMeanField_ELBO

from pyro_ldvae.data.minibatch import Minibatch
from pyro_ldvae.models.ldvae import LDVAE


def _minibatch(n_cells: int, n_genes: int, n_batch: int, seed: int = 0) -> Minibatch:
    g = torch.Generator().manual_seed(seed)
    x = torch.poisson(torch.rand(n_cells, n_genes, generator=g) * 4)
    x[:, 0] += 1  # no empty cells
    batch = torch.arange(n_cells) % max(n_batch, 1)
    return Minibatch(x=x, batch=batch, labels=torch.arange(n_cells) % 3)


def _ldvae(n_genes: int, n_batch: int = 2, **kwargs) -> LDVAE:
    n = max(n_batch, 1)
    kwargs = {"n_latent": 4, **kwargs}
    return LDVAE(
        n_genes,
        n_batch=n_batch,
        n_labels=3,
        library_log_means=np.full(n, 3.0),
        library_log_vars=np.full(n, 0.5),
        **kwargs,
    )


def test_trace_shapes_model_and_guide():
    module = _ldvae(30, gene_likelihood="zinb")
    mb = _minibatch(16, 30, 2)
    guide_trace = poutine.trace(module.guide).get_trace(mb, 100)
    model_trace = poutine.trace(poutine.replay(module.model, trace=guide_trace)).get_trace(mb, 100)
    guide_trace.compute_log_prob()
    model_trace.compute_log_prob()
    assert model_trace.nodes["z"]["value"].shape == (16, 4)
    assert model_trace.nodes["z"]["fn"].event_shape == (4,)
    assert model_trace.nodes["library"]["value"].shape == (16,)
    assert model_trace.nodes["x"]["fn"].event_shape == (30,)
    assert model_trace.nodes["x"]["log_prob"].shape == (16,)
    assert model_trace.nodes["rho"]["value"].shape == (16, 30)
    assert torch.allclose(model_trace.nodes["rho"]["value"].sum(-1), torch.ones(16))
    assert guide_trace.nodes["z"]["log_prob"].shape == (16,)
    # the cells plate scales local sites by n_obs / cells
    assert model_trace.nodes["x"]["scale"] == pytest.approx(100 / 16)
    params = {name for name, site in model_trace.nodes.items() if site["type"] == "param"}
    assert {"decoder.factor_regressor.linear.weight", "theta"} <= params


def test_elbo_matches_pyro_trace_mean_field_elbo():
    module = _ldvae(25).eval()
    mb = _minibatch(12, 25, 2)
    torch.manual_seed(1)
    pyro_loss = TraceMeanField_ELBO().differentiable_loss(module.model, module.guide, mb, 50, 0.3)
    torch.manual_seed(1)
    elbo, per_cell = module.elbo(mb, 50, 0.3)
    assert torch.allclose(-elbo, pyro_loss, rtol=1e-6)
    assert per_cell.shape == (12,)


def test_kl_weight_zero_masks_the_z_term():
    module = _ldvae(25).eval()
    mb = _minibatch(12, 25, 2)
    torch.manual_seed(2)
    elbo_zero, per_cell = module.elbo(mb, kl_weight=0.0)
    torch.manual_seed(2)
    elbo_one, _ = module.elbo(mb, kl_weight=1.0)
    q = module.encode(mb.x)
    kl_z = 0.5 * (q["z_var"] + q["z_loc"] ** 2 - 1 - q["z_var"].log()).sum()
    assert torch.allclose(elbo_zero - elbo_one, kl_z, rtol=1e-4)
    # the per-cell ELBO is always unweighted
    assert torch.allclose(per_cell.sum(), elbo_one, rtol=1e-5)


def test_two_modules_do_not_share_parameters():
    a, b = _ldvae(10), _ldvae(10)
    with torch.no_grad():
        a.decoder.factor_regressor.linear.weight.fill_(1.0)
    mb = _minibatch(4, 10, 2)
    trace = poutine.trace(b.model).get_trace(mb)
    assert not torch.equal(
        trace.nodes["decoder.factor_regressor.linear.weight"]["value"], a.decoder.factor_regressor.linear.weight
    )
    assert len(pyro.get_param_store()) == 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_latent": 0}, "n_latent"),
        ({"dropout_rate": 1.0}, "dropout_rate"),
        ({"dispersion": "gene-gene"}, "dispersion"),
        ({"gene_likelihood": "gaussian"}, "gene_likelihood"),
        ({"latent_distribution": "lognormal"}, "latent_distribution"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _ldvae(10, **kwargs)


def test_gene_label_dispersion_needs_labels():
    with pytest.raises(ValueError, match="gene-label"):
        LDVAE(10, n_labels=0, dispersion="gene-label", use_observed_lib_size=True)


def test_importance_log_weights_are_log_p_minus_log_q_of_the_traces():
    """The trace walker's importance weight: Pyro's own per-site log-densities, model minus guide."""
    from pyro_ldvae.models.trace import log_weight, mean_field_elbo, replayed_traces, site_terms
    from pyro_ldvae.tasks.posterior import log_weights

    module = _ldvae(25, gene_likelihood="zinb").eval()
    mb = _minibatch(12, 25, 2)
    torch.manual_seed(3)
    guide_trace, model_trace = replayed_traces(module.model, module.guide, (mb,))
    model_trace.compute_log_prob()
    guide_trace.compute_log_prob()
    expected = sum(model_trace.nodes[name]["log_prob"] for name in ("z", "library", "x")) - sum(
        guide_trace.nodes[name]["log_prob"] for name in ("z", "library")
    )
    torch.testing.assert_close(log_weight(model_trace, guide_trace), expected)
    # neither the plate's subsample site nor the deterministic 'rho' carries a term
    assert [site["name"] for site, _ in site_terms(model_trace, guide_trace, analytic_kl=False)] == [
        "z",
        "library",
        "x",
    ]
    # with analytic KL, the per-cell ELBO is at most the sampled weight's expectation; here: its terms
    elbo, per_cell = mean_field_elbo(model_trace, guide_trace)
    assert per_cell.shape == (12,) and torch.allclose(per_cell.sum(), elbo)
    torch.manual_seed(3)
    torch.testing.assert_close(log_weights(module, mb, 1), expected.reshape(1, 12))


def test_factor_variance_of_a_prior_model_uses_its_posterior_loadings():
    """With a loadings prior the decoder's factor columns are W's posterior, not the unused point weights:
    each factor's variance is Var(z_k) times the squared norm of ``get_loadings()``'s column k."""
    from pyro_ldvae import LinearSCVI, simulate
    from pyro_ldvae.tasks.posterior import factor_variance_explained

    adata = simulate(n_cells=60, n_genes=20, seed=0)
    LinearSCVI.setup_anndata(adata)
    model = LinearSCVI(adata, n_latent=3, loadings_prior="normal")
    model.train(max_epochs=1, batch_size=30, train_size=1.0, progress_bar=False)
    module = model.module.eval()
    with torch.no_grad():  # the point weights' factor columns play no part in a prior model
        module.decoder.factor_regressor.linear.weight[:, :3] = 1e3
    cells = model._cells(None)
    frame = factor_variance_explained(module, cells, np.arange(adata.n_obs))
    z = torch.as_tensor(model.get_latent_representation(), dtype=torch.float64)
    expected = z.var(0, unbiased=False) * (torch.as_tensor(module.get_loadings(), dtype=torch.float64) ** 2).sum(0)
    np.testing.assert_allclose(frame["variance"].to_numpy(), expected.numpy(), rtol=1e-4)
    assert ((frame["fraction"] > 0) & (frame["fraction"] <= 1)).all()


def test_tasks_leave_pyro_global_param_store_empty():
    """Posterior tasks read the decoder's params module-locally: the user's global store stays as it was."""
    import pyro

    import pyro_ldvae

    pyro.clear_param_store()
    adata = pyro_ldvae.simulate(n_cells=80, n_genes=15, n_latent=2, seed=4)
    pyro_ldvae.LinearSCVI.setup_anndata(adata)
    model = pyro_ldvae.LinearSCVI(adata, n_latent=2, n_hidden=8)
    model.train(max_epochs=1, progress_bar=False)
    model.get_factor_variance_explained()
    model.to_adata(adata)
    model.get_likelihood_parameters()
    assert len(pyro.get_param_store()) == 0

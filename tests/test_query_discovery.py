"""New factors of a query model: off in a query with nothing new, one on for a program the reference lacks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from pyro_ldvae import LinearSCVI
from pyro_ldvae.api.simulate_query import simulate_query
from pyro_ldvae.infer.plan import TrainingPlan, make_optimizer

N_GENES, N_REFERENCE, N_QUERY = 60, 800, 400


def _reference(seed: int = 0):
    reference, _ = simulate_query(seed=seed, novel=False, n_genes=N_GENES, n_reference=N_REFERENCE, n_query=N_QUERY)
    LinearSCVI.setup_anndata(reference, batch_key="batch")
    model = LinearSCVI(reference, n_latent=3, n_hidden=32, seed=0)
    model.train(max_epochs=EPOCHS, batch_size=128, progress_bar=False, plan_kwargs=PLAN)
    return model


EPOCHS, PLAN = 150, {"lr": 1e-2, "n_epochs_kl_warmup": 75}


@pytest.fixture(scope="module")
def converged_reference():
    torch.set_num_threads(1)
    return _reference()


def _query(novel: bool, seed: int = 0):
    _, query = simulate_query(seed=seed, novel=novel, n_genes=N_GENES, n_reference=N_REFERENCE, n_query=N_QUERY)
    return query


def test_library_encoder_and_batch_columns_adapt_reference_untouched(converged_reference):
    model = converged_reference
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    qm = LinearSCVI.load_query_data(_query(False), model, n_new_factors=2)
    module = qm.module
    assert all(p.requires_grad for p in module.l_encoder.parameters())
    module.train()
    assert module.l_encoder.training and not module.z_encoder.reference.training  # the reference's z encoder stays
    optimizer = make_optimizer(module, TrainingPlan(lr=1e-3, global_lr=3e-2))
    fast = {id(p) for group in optimizer.param_groups if group["lr"] == 3e-2 for p in group["params"]}
    assert id(module.decoder.factor_regressor.linear.new) in fast
    assert all(id(p) in fast for p in module.global_guide.parameters())
    assert not any(id(p) in fast for p in module.l_encoder.parameters())
    qm.train(max_epochs=2, batch_size=128, progress_bar=False)
    after = model.module.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # the reference model is not modified


@pytest.mark.slow
def test_null_query_keeps_new_factors_off_and_a_novel_program_turns_one_on(converged_reference):
    model = converged_reference
    null = LinearSCVI.load_query_data(_query(False), model, n_new_factors=3)
    null.train(max_epochs=60, batch_size=128, progress_bar=False, plan_kwargs={"lr": 1e-2})
    assert not null.get_new_factor_activity()["active"].any()

    query = _query(True)
    novel = LinearSCVI.load_query_data(query, model, n_new_factors=3)
    novel.train(max_epochs=60, batch_size=128, progress_bar=False, plan_kwargs={"lr": 1e-2})
    activity = novel.get_new_factor_activity()
    assert activity["active"].sum() == 1
    found = novel.get_loadings()[activity["relative"].idxmax()].abs()
    assert average_precision_score(query.var["program"], found) >= 0.9
    assert roc_auc_score(query.obs["novel"], novel.get_novelty()) >= 0.95
    per_factor = novel.get_novelty(per_factor=True)
    assert np.all(per_factor.to_numpy() >= 0)

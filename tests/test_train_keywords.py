"""scvi-tools' ``train()`` keywords: each changes behaviour as in scvi-tools, or warns that it has no effect."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pyro_ldvae import LinearSCVI, simulate
from pyro_ldvae.data.sources import minibatch_indices
from pyro_ldvae.infer import policy
from pyro_ldvae.infer import train as train_mod
from pyro_ldvae.infer.evaluate import evaluate_elbo, evaluate_terms
from pyro_ldvae.infer.options import TrainOptions
from pyro_ldvae.infer.plan import TrainingPlan, split_cells

QUIET = {"progress_bar": False, "batch_size": 32}


@pytest.fixture(scope="module")
def adata():
    data = simulate(n_cells=100, n_genes=15, n_latent=2, seed=3)
    LinearSCVI.setup_anndata(data)
    return data


def _model(adata):
    return LinearSCVI(adata, n_latent=2, n_hidden=8, seed=1)


def test_external_indexing_gives_exactly_those_cells(adata):
    train, val, test = np.arange(10, 74), np.arange(74, 90), np.arange(0, 10)
    model = _model(adata)
    model.train(max_epochs=1, datasplitter_kwargs={"external_indexing": [train, val, test]}, **QUIET)
    for got, want in zip((model.train_indices, model.validation_indices, model.test_indices), (train, val, test)):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="overlap"):
        split_cells(100, external_indexing=[np.arange(10), np.arange(5, 20)])


def test_test_indices_are_the_cells_of_neither_set():
    train, val, test = split_cells(100, train_size=0.64, validation_size=0.2, batch_size=32)
    assert (len(train), len(val), len(test)) == (64, 20, 16)
    assert len(np.unique(np.concatenate([train, val, test]))) == 100


def test_drop_last_drops_the_last_partial_minibatch():
    generator = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert [len(p) for p in minibatch_indices(np.arange(70), 32, generator())] == [32, 32, 6]
    assert [len(p) for p in minibatch_indices(np.arange(70), 32, generator(), drop_last=True)] == [32, 32]


def test_drop_last_in_training(adata):
    model = _model(adata)
    model.train(max_epochs=2, train_size=0.9, datasplitter_kwargs={"drop_last": True}, **QUIET)
    assert len(model.train_indices) == 90
    steps = model.history["train_loss_step"]
    assert len(steps) == 2 * (90 // 32)  # two full minibatches per epoch, the 26 cells dropped


def test_a_last_minibatch_of_one_cell_is_an_error_unless_dropped(adata):
    model = _model(adata)
    with pytest.raises(ValueError, match="exactly 1 .*drop_last.*batch_size"):
        model.train(max_epochs=1, train_size=0.65, **QUIET)  # 65 cells = 2 x 32 + 1
    with pytest.raises(ValueError, match="exactly 1"):
        split_cells(100, batch_size=32, external_indexing=[np.arange(65)])
    model.train(max_epochs=1, train_size=0.65, datasplitter_kwargs={"drop_last": True}, **QUIET)
    with pytest.warns(UserWarning, match="only 2 cells"):
        split_cells(100, train_size=0.66, batch_size=32)


def test_early_stopping_without_validation_cells_is_an_error(adata):
    with pytest.raises(ValueError, match="no validation cells"):
        _model(adata).train(max_epochs=2, train_size=1.0, early_stopping=True, **QUIET)
    with pytest.raises(ValueError, match="no validation cells"):
        _model(adata).train(max_epochs=2, train_size=1.0, plan_kwargs={"reduce_lr_on_plateau": True}, **QUIET)


def test_early_stopping_mode_monitor_and_warmup(adata, monkeypatch):
    calls = []

    def falling(module, data, indices):  # validation negative ELBO 100, 99, 98, ... (all reconstruction)
        calls.append(1)
        return torch.tensor([(101.0 - len(calls)) * len(indices), 0.0, 0.0, float(len(indices))])

    monkeypatch.setattr(train_mod, "validation_sums", falling)
    es = {"max_epochs": 10, "early_stopping": True, "early_stopping_patience": 2, **QUIET}
    model = _model(adata)
    model.train(**es)  # 'min': every validation improves
    assert model.stop_reason_ == "completed" and len(model.history["elbo_train"]) == 10
    calls.clear()
    model = _model(adata)
    model.train(early_stopping_mode="max", **es)  # higher is better: none after the first
    assert model.stop_reason_ == "early_stopping" and len(model.history["elbo_train"]) == 3
    calls.clear()
    model = _model(adata)
    model.train(early_stopping_mode="max", early_stopping_warmup_epochs=3, **es)  # first 3 not judged
    assert model.stop_reason_ == "early_stopping" and len(model.history["elbo_train"]) == 6
    with pytest.raises(ValueError, match="supported: \\['elbo_validation', 'reconstruction_loss_validation'"):
        _model(adata).train(max_epochs=1, early_stopping=True, early_stopping_monitor="kl_global_validation", **QUIET)
    with pytest.raises(ValueError, match="'min' or 'max'"):
        _model(adata).train(max_epochs=1, early_stopping_mode="lowest", **QUIET)


def test_reduce_lr_on_plateau_lowers_lr_after_patience(adata):
    model = _model(adata)
    plan = {"reduce_lr_on_plateau": True, "lr_patience": 1, "lr_factor": 0.5, "lr_threshold": 1e9, "lr_min": 2e-4}
    model.train(max_epochs=8, plan_kwargs=plan, **QUIET)
    lr = model.history["lr"]["lr"].tolist()  # the rate each epoch trained with
    # an improvement must exceed 1e9: none does after the first validation sets the best; after
    # more than lr_patience bad epochs the rate halves, not below lr_min
    assert lr == pytest.approx([1e-3, 1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4, 2.5e-4, 2e-4])


def test_kl_warmup_by_step():
    plan = TrainingPlan(n_epochs_kl_warmup=None, n_steps_kl_warmup=10, min_kl_weight=0.0, max_kl_weight=1.0)
    assert [plan.kl_weight(epoch=5, step=s) for s in (0, 5, 10, 50)] == [0.0, 0.5, 1.0, 1.0]
    assert plan.by_step
    assert not TrainingPlan(n_steps_kl_warmup=10).by_step  # the default n_epochs_kl_warmup=400 wins
    with pytest.warns(UserWarning, match="overrides n_steps_kl_warmup"):
        resolved = TrainOptions(plan_kwargs={"n_steps_kl_warmup": 10}).resolved()
    assert resolved.plan_kwargs is None and resolved.resolved() == resolved
    planned = policy.planned_step_kinds(plan, 0, 2, 70, 32)
    assert planned == {(32, True): 1, (32, False): 3, (6, False): 2}


def test_kl_warmup_by_step_in_training(adata, monkeypatch):
    seen = []
    original = train_mod.STEPS["eager"].take

    def take(self, mb, kl_weight):
        seen.append(float(kl_weight))
        return original(self, mb, kl_weight)

    monkeypatch.setattr(train_mod.STEPS["eager"], "take", take)
    plan = {"n_epochs_kl_warmup": None, "n_steps_kl_warmup": 4, "max_kl_weight": 0.8, "min_kl_weight": 0.2}
    _model(adata).train(max_epochs=2, train_size=0.9, plan_kwargs=plan, traced_step=False, **QUIET)
    # 90 cells: 3 steps per epoch; weight min + (max - min) * min(1, step / 4)
    assert seen == pytest.approx([0.2, 0.35, 0.5, 0.65, 0.8, 0.8])


def test_optimizers(adata, monkeypatch):
    made = []
    original = train_mod.make_optimizer
    monkeypatch.setattr(train_mod, "make_optimizer", lambda *a, **k: made.append(original(*a, **k)) or made[-1])
    for name, cls in (("AdamW", torch.optim.AdamW), ("SGD", torch.optim.SGD)):
        model = _model(adata)
        model.train(max_epochs=1, plan_kwargs={"optimizer": name, "lr": 1e-6, "weight_decay": 0.1}, **QUIET)
        assert type(made[-1]) is cls and made[-1].param_groups[0]["weight_decay"] == 0.1
        assert np.isfinite(model.history["elbo_train"].to_numpy()).all()
    assert "Adam" not in TrainingPlan(optimizer="SGD").graph_reasons()[0].split("=")[0]
    with pytest.raises(ValueError, match="optimizer must be one of"):
        TrainingPlan(optimizer="LBFGS")


def test_train_loss_step_and_epoch(adata):
    model = _model(adata)
    model.train(max_epochs=2, train_size=0.9, **QUIET)
    steps = model.history["train_loss_step"]["train_loss_step"].to_numpy()
    epochs = model.history["train_loss_epoch"]["train_loss_epoch"].to_numpy()
    assert len(steps) == 6  # 90 training cells: 3 minibatches per epoch
    np.testing.assert_allclose(epochs, steps.reshape(2, 3).mean(axis=1), rtol=1e-5)
    model.train(max_epochs=1, train_size=0.9, **QUIET)  # a second call continues the step numbering
    assert model.history["train_loss_step"].index.tolist() == list(range(9))
    assert model.history["elbo_train"].index.tolist() == [0, 1, 2]


def test_on_step_and_on_epoch_give_scvi_tools_history_names(adata):
    model = _model(adata)
    model.train(
        max_epochs=4,
        train_size=0.5,
        check_val_every_n_epoch=2,
        plan_kwargs={"on_step": True, "on_epoch": True},
        **QUIET,
    )
    history = model.history
    assert len(history["elbo_train_epoch"]) == 4
    for key in ("train_loss_step", "train_loss_epoch", "validation_loss_step", "validation_loss_epoch"):
        assert key in history, key
    np.testing.assert_array_equal(history["elbo_train_epoch"].to_numpy(), history["elbo_train"].to_numpy())
    assert history["validation_loss_step"].columns.tolist() == ["validation_loss_step"]
    assert "train_time_epoch" not in history and "train_loss_epoch_epoch" not in history
    plain = _model(adata)
    plain.train(max_epochs=1, **QUIET)
    assert "elbo_train_epoch" not in plain.history  # only with both on_step and on_epoch, as Lightning names them


def test_lightning_keywords_warn_and_train(adata):
    model = _model(adata)
    with pytest.warns(UserWarning) as record:
        model.train(
            max_epochs=1,
            log_every_n_steps=5,
            logger=False,
            enable_checkpointing=True,
            enable_progress_bar=False,
            load_sparse_tensor=True,
            datasplitter_kwargs={"num_workers": 2},
            plan_kwargs={"compile": True, "lr_scheduler_metric_typo": 1},
            batch_size=32,
        )
    text = "\n".join(str(w.message) for w in record)
    for key in ("log_every_n_steps", "logger", "enable_checkpointing", "load_sparse_tensor", "num_workers"):
        assert repr(key) in text and "no effect" in text, key
    assert "plan_kwargs['compile']" in text and "lr_scheduler_metric_typo" in text
    assert "enable_progress_bar" not in text  # mapped to progress_bar
    assert model.is_trained


def test_callbacks_stop_and_lightning_callbacks_warn(adata):
    calls = []

    class StopAfterTwo:
        def on_epoch_end(self, module, epoch, history):
            calls.append((epoch, history[-1]["epoch"]))
            return epoch == 1

    model = _model(adata)
    model.train(max_epochs=5, callbacks=[StopAfterTwo()], **QUIET)
    assert calls == [(0, 0), (1, 1)] and model.stop_reason_ == "callback"

    lightning = pytest.importorskip("lightning.pytorch")
    with pytest.warns(UserWarning, match="Lightning callback"):
        _model(adata).train(max_epochs=1, callbacks=[lightning.callbacks.Callback()], **QUIET)
    # scvi-tools users' common Lightning callbacks: accepted, and the warning says what to use instead
    from pyro_ldvae.infer import callbacks as cb

    for made, instead in (
        (lambda: lightning.callbacks.LearningRateMonitor(), "reduce_lr_on_plateau"),
        (lambda: lightning.callbacks.EarlyStopping(monitor="elbo_validation"), "early_stopping=True"),
        (lambda: lightning.callbacks.ModelCheckpoint(), "checkpoint_dir"),
        (lambda: lightning.callbacks.Callback(), "on_epoch_end"),
    ):
        with pytest.warns(UserWarning, match=instead):
            assert cb.usable([made(), StopAfterTwo()]) != []  # ours kept, Lightning's dropped


def test_options_carry_the_new_keywords():
    options = TrainOptions(trainer_kwargs={"enable_progress_bar": False, "early_stopping_patience": 3})
    resolved = options.resolved()
    assert resolved.progress_bar is False and resolved.early_stopping_patience == 3
    assert resolved.trainer_kwargs is None and resolved.resolved() == resolved
    assert TrainOptions(trainer_kwargs={"devices": [1]}).resolved().device == 1  # scvi-tools' name


def test_validation_figures_split_the_elbo_and_each_can_be_monitored(adata):
    model = _model(adata)
    model.train(max_epochs=2, **QUIET)
    h = model.history
    for key in ("reconstruction_loss_validation", "kl_local_validation"):
        assert len(h[key]) == 2
    total = h["reconstruction_loss_validation"].values + h["kl_local_validation"].values
    np.testing.assert_allclose(total, h["elbo_validation"].values, rtol=1e-5)
    assert (h["kl_local_validation"].values > 0).all()  # a KL between distinct Normals
    cells, val = model.get_cells(), model.validation_indices
    torch.manual_seed(0)  # the same guide draws for both
    elbo = evaluate_elbo(model.module, cells, val)
    torch.manual_seed(0)
    terms = evaluate_terms(model.module, cells, val)
    np.testing.assert_allclose(-terms.sum(1).numpy(), elbo.numpy(), rtol=1e-5)
    # scvi-tools' validation_loss: the KL of z weighed by the epoch's KL weight (0 in the first epoch)
    loss, rec, elbo = (
        h[k].values.ravel() for k in ("validation_loss", "reconstruction_loss_validation", "elbo_validation")
    )
    assert ((rec <= loss + 1e-6) & (loss <= elbo + 1e-6)).all()
    assert h["kl_weight"].values[0, 0] == 0 and loss[0] < elbo[0]  # the KL of z does not count yet
    for monitor in ("reconstruction_loss_validation", "kl_local_validation"):
        m = _model(adata)
        m.train(max_epochs=3, early_stopping=True, early_stopping_monitor=monitor, early_stopping_patience=1, **QUIET)
        assert m.stop_reason_ in ("completed", "early_stopping") and monitor in m.history

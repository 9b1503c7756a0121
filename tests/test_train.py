"""Numerical faults, interruption and resumption of training."""

from __future__ import annotations

import os
import platform
import resource
import signal

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from pyro_ldvae import LinearSCVI, simulate
from pyro_ldvae.infer import allocator
from pyro_ldvae.infer import checkpoint as ckpt
from pyro_ldvae.infer import train as train_mod
from pyro_ldvae.kernels.count_terms import THETA_MAX, THETA_MIN, log_nb, log_poisson, log_zinb

EPOCH_KW = {"batch_size": 64, "progress_bar": False}  # 200 cells: 180 train (3 steps), 20 validation


@pytest.fixture(scope="module")
def adata():
    data = simulate(n_cells=200, n_genes=30, n_latent=2, n_batch=2, seed=4)
    LinearSCVI.setup_anndata(data, batch_key="batch")
    return data


def _model(adata, **kwargs):
    return LinearSCVI(adata, n_latent=2, n_hidden=16, seed=7, **kwargs)


def _state(model):
    return {k: v.clone() for k, v in model.module.state_dict().items()}


def _assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _fault_at(model, training_call: int, make):
    """Make the module's ``training_call``-th training-mode ELBO evaluation go wrong via ``make``."""
    original, calls = model.module.elbo, {"n": 0}

    def elbo(*args, **kwargs):
        if model.module.training:
            calls["n"] += 1
            if calls["n"] == training_call:
                return make(*original(*args, **kwargs))
        return original(*args, **kwargs)

    model.module.elbo = elbo
    return calls


@pytest.fixture(scope="module")
def two_epochs(adata):
    """Reference: 2 epochs, uninterrupted."""
    model = _model(adata)
    model.train(max_epochs=2, **EPOCH_KW)
    return _state(model), model.history["elbo_train"].to_numpy().ravel()


@pytest.fixture(scope="module")
def four_epochs(adata):
    """Reference: 4 epochs, uninterrupted."""
    model = _model(adata)
    model.train(max_epochs=4, **EPOCH_KW)
    return _state(model), model.history["elbo_train"].to_numpy().ravel()


# ---------------------------------------------------------------------------------------------
# Numerical faults
# ---------------------------------------------------------------------------------------------
def test_likelihoods_finite_at_extremes():
    x = torch.tensor([0.0, 1.0, 7.0, 1e6])
    for mu_value in (0.0, 1e-30, 1.0, 1e6, 1e12):
        for theta_value in (0.0, 1e-30, 1e-8, 1.0, 1e8, 1e30, float("inf")):
            mu = torch.full_like(x, mu_value, requires_grad=True)
            theta = torch.tensor(theta_value, requires_grad=True)
            gate = torch.full_like(x, -2.0, requires_grad=True)
            values = [log_nb(x, mu, theta), log_zinb(x, mu, theta, gate), log_poisson(x, mu)]
            sum(v.sum() for v in values).backward()
            for name, t in zip(
                ("nb", "zinb", "poisson", "d mu", "d theta", "d gate"), [*values, mu.grad, theta.grad, gate.grad]
            ):
                assert torch.isfinite(t).all(), (name, mu_value, theta_value)


def test_theta_bound_leaves_normal_values_unchanged():
    """The clamp changes nothing at fitted values: same numbers as the unbounded formula (scvi-tools')."""
    torch.manual_seed(0)
    x = torch.poisson(torch.full((50, 40), 3.0))
    mu = torch.rand(50, 40) * 10
    theta = torch.exp(torch.randn(40) * 2)  # about 0.02 to 50
    assert THETA_MIN < theta.min() and theta.max() < THETA_MAX
    eps = 1e-8
    log_theta_mu = torch.log(theta + mu + eps)
    expected = (
        theta * (torch.log(theta + eps) - log_theta_mu)
        + x * (torch.log(mu + eps) - log_theta_mu)
        + torch.lgamma(x + theta)
        - torch.lgamma(theta)
        - torch.lgamma(x + 1)
    )
    assert torch.equal(log_nb(x, mu, theta), expected)
    assert torch.equal(log_poisson(x, mu), torch.xlogy(x, mu) - mu - torch.lgamma(x + 1))


@pytest.mark.parametrize("gene_likelihood", ["nb", "zinb", "poisson"])
def test_training_with_huge_counts_stays_finite(adata, gene_likelihood):
    data = adata.copy()
    dense = data.X.toarray()
    dense[0, 5] = 1e6  # one cell with a million counts in one gene
    data.X = sp.csr_matrix(dense)
    model = _model(data, gene_likelihood=gene_likelihood)
    model.train(max_epochs=2, **EPOCH_KW)
    assert np.isfinite(model.history["elbo_train"].to_numpy()).all()
    assert all(torch.isfinite(p).all() for p in model.module.parameters())
    assert np.isfinite(model.get_elbo())


@pytest.mark.parametrize("call", [8, 9], ids=["mid-epoch", "last step"])
def test_nan_loss_stops_and_restores_last_good_epoch(adata, two_epochs, call):
    """NaN in epoch 2 (3 steps per epoch): in step 2 the NaN parameters break step 3 from inside; in
    step 3 the end-of-epoch check finds them. Either way: the error names epoch 2, epoch 1 is kept."""
    model = _model(adata)
    _fault_at(model, training_call=call, make=lambda elbo, per_cell: (elbo * np.nan, per_cell))
    with pytest.raises(FloatingPointError, match="epoch 2") as info:
        model.train(max_epochs=4, **EPOCH_KW)
    assert "learning rate" in str(info.value) and "gradient_clip_val" in str(info.value)
    _assert_same_state(_state(model), two_epochs[0])  # parameters of the last good epoch, bit for bit
    np.testing.assert_array_equal(model.history["elbo_train"].to_numpy().ravel(), two_epochs[1])
    assert np.isfinite(model.get_elbo())  # and usable


def test_nan_in_first_epoch_restores_initial_parameters(adata, monkeypatch):
    model = _model(adata)
    initial = _state(model)
    monkeypatch.setattr(train_mod, "FAULT_CHECK_EVERY", 1)  # the running flag is read every step
    calls = _fault_at(model, training_call=1, make=lambda elbo, per_cell: (elbo, per_cell * np.inf))
    with pytest.raises(FloatingPointError, match="epoch 0"):
        model.train(max_epochs=3, **EPOCH_KW)
    assert calls["n"] == 1  # stopped at the first check, not at the end of the epoch
    _assert_same_state(_state(model), initial)
    assert not model.history


def test_genuine_errors_are_not_taken_for_faults(adata):
    def boom(elbo, per_cell):
        raise ValueError("boom")

    model = _model(adata)
    _fault_at(model, training_call=5, make=boom)
    with pytest.raises(ValueError, match="boom"):
        model.train(max_epochs=3, **EPOCH_KW)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_gradient_clipping_is_applied(adata):
    initial = {k: v.detach().clone() for k, v in _model(adata).module.named_parameters()}
    moved = {}
    for clip in (None, 1e-9):
        model = _model(adata)
        model.train(max_epochs=1, gradient_clip_val=clip, **EPOCH_KW)
        moved[clip] = max((p - initial[k]).abs().max().item() for k, p in model.module.named_parameters())
    # Adam's eps (0.01) makes a step proportional to a tiny clipped gradient: parameters barely move.
    assert moved[None] > 1e-3 and moved[1e-9] < 1e-4, moved


# ---------------------------------------------------------------------------------------------
# Interruption
# ---------------------------------------------------------------------------------------------
def _raise_interrupt(elbo, per_cell):
    raise KeyboardInterrupt


def test_keyboard_interrupt_keeps_last_completed_epoch(adata, two_epochs, caplog):
    model = _model(adata)
    _fault_at(model, training_call=8, make=_raise_interrupt)  # inside epoch 2
    with caplog.at_level("WARNING"):
        model.train(max_epochs=4, **EPOCH_KW)  # returns, no exception
    assert model.stop_reason_ == "interrupted"
    assert "interrupted in epoch 2" in caplog.text and "last completed epoch (1)" in caplog.text
    _assert_same_state(_state(model), two_epochs[0])
    assert len(model.history["elbo_train"]) == 2
    assert model.get_latent_representation().shape == (adata.n_obs, 2)  # usable


def test_ctrl_c_signal_stops_after_the_current_step(adata, two_epochs):
    model = _model(adata)
    calls = _fault_at(model, training_call=7, make=lambda *out: (signal.raise_signal(signal.SIGINT), out)[1])
    model.train(max_epochs=4, **EPOCH_KW)
    assert calls["n"] == 7  # the step in flight finished, no further step ran
    assert model.stop_reason_ == "interrupted"
    _assert_same_state(_state(model), two_epochs[0])
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler put back


@pytest.mark.parametrize("interrupt_call, written", [(8, True), (2, False)])
def test_cli_ctrl_c(adata, tmp_path, capsys, monkeypatch, interrupt_call, written):
    """`pyro-ldvae fit` + Ctrl-C: writes the last completed epoch's results (exit 130), or nothing
    when no epoch was completed."""
    import anndata

    from pyro_ldvae.api import cli
    from pyro_ldvae.models.ldvae import LDVAE

    path, out = tmp_path / "in.h5ad", tmp_path / "out.h5ad"
    adata.write_h5ad(path)
    original, calls = LDVAE.elbo, {"n": 0}

    def elbo(self, *args, **kwargs):
        if self.training:
            calls["n"] += 1
            if calls["n"] == interrupt_call:
                raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LDVAE, "elbo", elbo)
    code = cli.main(["fit", str(path), "-o", str(out), "--max-epochs", "4", "--batch-size", "64", "--n-latent", "2"])
    err = capsys.readouterr().err
    assert code == 130 and "interrupted" in err
    assert out.exists() == written
    if written:
        assert anndata.read_h5ad(out).obsm["X_ldvae"].shape == (adata.n_obs, 2)


# ---------------------------------------------------------------------------------------------
# Checkpoints and resumption
# ---------------------------------------------------------------------------------------------
def test_resume_is_bit_identical(adata, four_epochs, tmp_path):
    first = _model(adata)
    first.train(max_epochs=2, checkpoint_dir=tmp_path, checkpoint_every=1, **EPOCH_KW)
    assert (tmp_path / ckpt.CHECKPOINT_NAME).exists()
    # no temporary file left; the checkpoint before the last is kept as the fallback
    assert sorted(p.name for p in tmp_path.iterdir()) == [ckpt.CHECKPOINT_NAME, ckpt.PREVIOUS_NAME]
    assert ckpt.load(tmp_path / ckpt.PREVIOUS_NAME)["epoch"] == 1
    resumed = _model(adata)  # a new model object, as after a crash
    resumed.train(max_epochs=4, resume_from=tmp_path, **EPOCH_KW)
    _assert_same_state(_state(resumed), four_epochs[0])
    np.testing.assert_array_equal(resumed.history["elbo_train"].to_numpy().ravel(), four_epochs[1])


def test_interrupted_then_resumed_is_bit_identical(adata, four_epochs, tmp_path):
    model = _model(adata)
    _fault_at(model, training_call=9, make=_raise_interrupt)  # last step of epoch 2
    model.train(max_epochs=4, checkpoint_dir=tmp_path, checkpoint_every=5, **EPOCH_KW)
    state = ckpt.load(tmp_path)  # written on interruption although checkpoint_every was not reached
    assert state["epoch"] == 2
    resumed = _model(adata)
    resumed.train(max_epochs=4, resume_from=tmp_path / ckpt.CHECKPOINT_NAME, **EPOCH_KW)
    assert resumed.stop_reason_ == "completed"
    _assert_same_state(_state(resumed), four_epochs[0])


def test_checkpoint_write_is_atomic(adata, tmp_path, monkeypatch):
    model = _model(adata)
    model.train(max_epochs=1, checkpoint_dir=tmp_path, **EPOCH_KW)
    before = (tmp_path / ckpt.CHECKPOINT_NAME).read_bytes()

    def crash(obj, handle, *args, **kwargs):
        handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save(ckpt.load(tmp_path), tmp_path)
    assert (tmp_path / ckpt.CHECKPOINT_NAME).read_bytes() == before  # old checkpoint intact
    assert [p.name for p in tmp_path.iterdir()] == [ckpt.CHECKPOINT_NAME]


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_bad_checkpoints_give_clear_errors(adata, tmp_path):
    model = _model(adata)
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
        model.train(max_epochs=2, resume_from=tmp_path / "nothing", **EPOCH_KW)
    model.train(max_epochs=1, checkpoint_dir=tmp_path / "good", **EPOCH_KW)
    good = tmp_path / "good" / ckpt.CHECKPOINT_NAME
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError, match="truncated.ckpt"):
        _model(adata).train(max_epochs=2, resume_from=truncated, **EPOCH_KW)
    # A file crafted to run code when unpickled: refused, and the code does not run.
    evil, marker = tmp_path / "evil.ckpt", tmp_path / "pwned"
    payload = _RunsCode()
    payload.marker = marker
    torch.save({"format": ckpt.CHECKPOINT_FORMAT, "version": 1, "x": payload}, evil)
    with pytest.raises(ValueError, match="evil.ckpt"):
        _model(adata).train(max_epochs=2, resume_from=evil, **EPOCH_KW)
    assert not marker.exists()
    # A checkpoint of another model (different n_latent) or another split.
    with pytest.raises(ValueError, match="does not fit this model"):
        LinearSCVI(adata, n_latent=3, n_hidden=16, seed=7).train(max_epochs=2, resume_from=good, **EPOCH_KW)
    with pytest.raises(ValueError, match="different train/validation split"):
        _model(adata).train(max_epochs=2, resume_from=good, seed=99, **EPOCH_KW)


def test_interrupt_guard_second_ctrl_c_raises():
    with ckpt.InterruptGuard() as guard:
        signal.raise_signal(signal.SIGINT)
        assert guard.requested
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_resume_keeps_early_stopping_state(adata, tmp_path):
    """best / epochs-since-best travel in the checkpoint: the resumed run stops where the straight one did."""
    stop = {"early_stopping": True, "early_stopping_patience": 3, "early_stopping_min_delta": 1e9}
    straight = _model(adata)
    straight.train(max_epochs=8, **stop, **EPOCH_KW)
    assert straight.stop_reason_ == "early_stopping" and len(straight.history["elbo_train"]) == 4
    first = _model(adata)
    first.train(max_epochs=2, checkpoint_dir=tmp_path, **stop, **EPOCH_KW)
    resumed = _model(adata)
    resumed.train(max_epochs=8, resume_from=tmp_path, **stop, **EPOCH_KW)
    assert resumed.stop_reason_ == "early_stopping" and len(resumed.history["elbo_train"]) == 4
    _assert_same_state(_state(resumed), _state(straight))


@pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc" or any(k.startswith("MALLOC_") for k in os.environ),
    reason="tunes glibc's allocator, and only when the environment sets no MALLOC_ tunable",
)
def test_training_reuses_freed_buffers_without_page_faults():
    """After training's allocator setting (infer/allocator.py), a step's worth of (cells, genes)
    buffers, allocated together and freed, come back without fresh pages: with glibc's defaults this
    loop takes about 3,000 page faults per round (measured), each a zero-filled page from the kernel."""
    allocator.keep_freed_memory()  # False when an earlier test's training already did it
    assert allocator._allocator_tuned
    base = torch.ones(128, 2000)

    def one_step_of_buffers():
        live = [base * k for k in range(12)]  # 1 MB each, alive together as in a step
        return sum(float(t[0, 0]) for t in live)

    for _ in range(5):
        one_step_of_buffers()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        one_step_of_buffers()
    faults_per_round = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20
    assert faults_per_round < 50


def test_training_leaves_the_users_global_random_streams_alone():
    """train() seeds generators of its own: numpy's, Python's and torch's global streams go on as before."""
    import random

    adata = simulate(n_cells=200, n_genes=20, seed=0)
    LinearSCVI.setup_anndata(adata)
    model = LinearSCVI(adata, n_latent=2, seed=0)
    np.random.seed(7), random.seed(7), torch.manual_seed(7)
    expected = (np.random.rand(3), [random.random() for _ in range(3)], torch.rand(3))
    np.random.seed(7), random.seed(7), torch.manual_seed(7)
    model.train(max_epochs=2, **EPOCH_KW)
    seen = (np.random.rand(3), [random.random() for _ in range(3)], torch.rand(3))
    np.testing.assert_array_equal(seen[0], expected[0])
    assert seen[1] == expected[1]
    assert torch.equal(seen[2], expected[2])


def test_training_is_repeatable_whatever_the_global_streams_hold():
    adata = simulate(n_cells=200, n_genes=20, seed=0)
    LinearSCVI.setup_anndata(adata)
    trained = []
    for global_seed in (1, 2):
        torch.manual_seed(0)  # the same initial weights
        model = LinearSCVI(adata, n_latent=2, seed=0)
        torch.manual_seed(global_seed)
        model.train(max_epochs=2, **EPOCH_KW)
        trained.append(model.module.state_dict())
    for name, value in trained[0].items():
        assert torch.equal(value, trained[1][name]), name

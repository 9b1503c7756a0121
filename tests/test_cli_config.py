"""`pyro-ldvae fit`: the model and training options reach the model, also from a `--config` TOML file."""

from __future__ import annotations

import pytest

import pyro_ldvae
from pyro_ldvae.api.cli import main


@pytest.fixture(scope="module")
def counts_file(tmp_path_factory):
    adata = pyro_ldvae.simulate(n_cells=150, n_genes=20, n_latent=2, seed=1)
    path = tmp_path_factory.mktemp("data") / "counts.h5ad"
    adata.write_h5ad(path)
    return path


@pytest.fixture
def recorded(monkeypatch):
    """The arguments `fit` gives LinearSCVI's constructor and train()."""
    seen: dict = {}
    init, train = pyro_ldvae.LinearSCVI.__init__, pyro_ldvae.LinearSCVI.train

    def recording_init(self, adata, **kwargs):
        seen["model"] = kwargs
        init(self, adata, **kwargs)

    def recording_train(self, **kwargs):
        seen["train"] = kwargs
        return train(self, **kwargs)

    monkeypatch.setattr(pyro_ldvae.LinearSCVI, "__init__", recording_init)
    monkeypatch.setattr(pyro_ldvae.LinearSCVI, "train", recording_train)
    return seen


def test_prior_split_checkpoint_and_clip_flags_reach_the_model(counts_file, tmp_path, recorded):
    ckpt = tmp_path / "ckpt"
    argv = ["fit", str(counts_file), "-o", str(tmp_path / "out.h5ad"), "--max-epochs", "2", "--accelerator", "cpu",
            "--n-latent", "2", "--loadings-prior", "horseshoe", "--train-size", "0.8", "--checkpoint-dir", str(ckpt),
            "--early-stopping-patience", "7", "--gradient-clip-val", "2.5"]  # fmt: skip
    assert main(argv) == 0
    assert recorded["model"]["loadings_prior"] == "horseshoe"
    train = recorded["train"]
    assert train["train_size"] == 0.8 and train["checkpoint_dir"] == str(ckpt)
    assert train["early_stopping_patience"] == 7 and train["gradient_clip_val"] == 2.5
    assert (ckpt / "last.ckpt").exists()


def test_config_file_sets_options_and_the_command_line_wins(counts_file, tmp_path, recorded):
    config = tmp_path / "run.toml"
    config.write_text('n_latent = 3\nmax-epochs = 2\naccelerator = "cpu"\nbatch_size = 64\nloadings_prior = "ard"\n')
    argv = ["fit", str(counts_file), "-o", str(tmp_path / "out.h5ad"), "--config", str(config), "--batch-size", "32"]
    assert main(argv) == 0
    assert recorded["model"]["n_latent"] == 3 and recorded["model"]["loadings_prior"] == "ard"
    assert recorded["train"]["max_epochs"] == 2 and recorded["train"]["batch_size"] == 32


def test_config_file_with_an_unknown_option_is_one_line_error(counts_file, tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text("n_latnet = 3\n")
    out = tmp_path / "out.h5ad"
    assert main(["fit", str(counts_file), "-o", str(out), "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "n_latnet" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()

"""The pyro-ldvae command end to end: fit (with and without INPUT), transform, help, errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import anndata
import numpy as np
import pytest

import pyro_ldvae
from pyro_ldvae.api.cli import main

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def counts_file(tmp_path_factory):
    adata = pyro_ldvae.simulate(n_cells=200, n_genes=30, n_latent=3, n_batch=2, seed=0)
    path = tmp_path_factory.mktemp("data") / "counts.h5ad"
    adata.write_h5ad(path)
    return path


def _one_line(text: str) -> bool:
    return len(text.strip().splitlines()) == 1 and "Traceback" not in text


def test_help_is_complete(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "fit" in text and "transform" in text and "examples" in text
    assert main(["fit", "--help"]) == 0
    text = capsys.readouterr().out
    for option in ("--output", "--layer", "--batch-key", "--labels-key", "--n-latent", "--gene-likelihood",
                   "--dispersion", "--max-epochs", "--batch-size", "--accelerator", "--no-cuda-graphs", "--no-traced-step",
                   "--seed", "--save-model",
                   "--overwrite"):  # fmt: skip
        assert option in text, option
    assert main(["transform", "--help"]) == 0
    assert "MODEL_DIR" in capsys.readouterr().out


@pytest.mark.parametrize("flags", [[], ["--no-traced-step", "--no-cuda-graphs"]], ids=["default", "off"])
def test_fit_passes_the_step_options_to_train(counts_file, tmp_path, monkeypatch, flags):
    seen = {}
    train = pyro_ldvae.LinearSCVI.train

    def recording_train(self, **kwargs):
        seen.update(kwargs)
        return train(self, **kwargs)

    monkeypatch.setattr(pyro_ldvae.LinearSCVI, "train", recording_train)
    argv = ["fit", str(counts_file), "-o", str(tmp_path / "out.h5ad"), "--max-epochs", "1", "--accelerator", "cpu"]
    assert main(argv + flags) == 0
    expected = False if flags else None  # None: train() decides
    assert seen["traced_step"] is expected and seen["cuda_graphs"] is expected


def test_fit_save_model_and_transform(counts_file, tmp_path, capsys):
    out, model_dir = tmp_path / "out.h5ad", tmp_path / "model"
    argv = ["fit", str(counts_file), "-o", str(out), "--batch-key", "batch", "--n-latent", "3", "--n-hidden", "16",
            "--max-epochs", "2", "--accelerator", "cpu", "--save-model", str(model_dir)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "200 cells x 30 genes, 2 epochs" in printed and "Z_0" in printed and f"wrote {out}" in printed
    result = anndata.read_h5ad(out)
    assert result.obsm["X_ldvae"].shape == (200, 3) and result.varm["ldvae_loadings"].shape == (30, 3)
    assert len(result.uns["ldvae"]["history"]["elbo_train"]) == 2
    assert sorted(os.listdir(model_dir)) == ["model.json", "model.pt"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary files left

    # embed some of the same cells, genes in another order: same factors as the fit wrote
    new = anndata.read_h5ad(counts_file)[:50]
    new = new[:, new.var_names[::-1]].copy()
    new_path, embedded = tmp_path / "new.h5ad", tmp_path / "embedded.h5ad"
    new.write_h5ad(new_path)
    assert main(["transform", str(model_dir), str(new_path), "-o", str(embedded), "--accelerator", "cpu"]) == 0
    again = anndata.read_h5ad(embedded)
    assert np.allclose(again.obsm["X_ldvae"], result.obsm["X_ldvae"][:50], atol=1e-5)


def test_fit_without_input_uses_bundled_pbmc(tmp_path, capsys):
    out = tmp_path / "pbmc.h5ad"
    assert main(["fit", "-o", str(out), "--max-epochs", "1", "--n-latent", "2", "--n-hidden", "16"]) == 0
    assert "700 cells x 765 genes" in capsys.readouterr().out
    assert anndata.read_h5ad(out).obsm["X_ldvae"].shape == (700, 2)


def test_user_errors_are_one_line_and_write_nothing(counts_file, tmp_path, capsys):
    out = tmp_path / "out.h5ad"
    assert main(["fit", str(counts_file), "-o", str(out), "--n-latent", "0"]) == 2  # argparse: bad value
    assert _one_line(capsys.readouterr().err)
    cases = [
        ["fit", str(tmp_path / "missing.h5ad"), "-o", str(out)],
        ["fit", str(counts_file), "-o", str(out), "--batch-key", "nope", "--max-epochs", "1"],
        ["fit", str(counts_file), "-o", str(tmp_path / "no_dir" / "out.h5ad")],
        ["transform", str(tmp_path / "no_model"), str(counts_file), "-o", str(out)],
    ]
    for argv in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert _one_line(err) and err.startswith("pyro-ldvae: error:"), err
    assert os.listdir(tmp_path) == []


def test_never_overwrites_without_flag(counts_file, tmp_path, capsys):
    out = tmp_path / "out.h5ad"
    out.write_text("precious")
    argv = ["fit", str(counts_file), "-o", str(out), "--max-epochs", "1", "--n-latent", "2", "--n-hidden", "8"]
    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_text() == "precious"
    assert main([*argv, "--overwrite"]) == 0
    assert anndata.read_h5ad(out).obsm["X_ldvae"].shape == (200, 2)


def test_transform_rejects_other_genes(counts_file, tmp_path, capsys):
    model_dir = tmp_path / "model"
    fit = ["fit", str(counts_file), "-o", str(tmp_path / "fit.h5ad"), "--max-epochs", "1", "--n-latent", "2",
           "--n-hidden", "8", "--batch-key", "batch", "--save-model", str(model_dir)]  # fmt: skip
    assert main(fit) == 0
    capsys.readouterr()
    fewer = anndata.read_h5ad(counts_file)[:, :20].copy()
    fewer.write_h5ad(tmp_path / "fewer.h5ad")
    assert main(["transform", str(model_dir), str(tmp_path / "fewer.h5ad"), "-o", str(tmp_path / "x.h5ad")]) == 2
    err = capsys.readouterr().err
    assert _one_line(err) and "lacks 10 of the 30 genes" in err
    assert not (tmp_path / "x.h5ad").exists()


def test_console_entry_reports_errors_without_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(
        [sys.executable, "-m", "pyro_ldvae", "fit", str(tmp_path / "absent.h5ad"), "-o", str(tmp_path / "o.h5ad")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 2 and _one_line(done.stderr) and "absent.h5ad does not exist" in done.stderr
    assert not (tmp_path / "o.h5ad").exists()

"""Checkpoints that verify their hash, fall back to the one before, and resume after a torchrun restart."""

from __future__ import annotations

import hashlib
import logging

import pytest
import torch
import torch.distributed as dist

from pyro_ldvae import LinearSCVI, simulate
from pyro_ldvae.infer import checkpoint as ckpt
from pyro_ldvae.infer import distributed, elastic

KW = {"batch_size": 64, "progress_bar": False, "accelerator": "cpu"}  # 200 cells: 180 train (3 steps)


@pytest.fixture(scope="module")
def adata():
    data = simulate(n_cells=200, n_genes=30, n_latent=2, seed=5)
    LinearSCVI.setup_anndata(data)
    return data


def _model(adata):
    return LinearSCVI(adata, n_latent=2, n_hidden=16, seed=11)


def _state(epoch: int) -> dict:
    return {
        "format": ckpt.CHECKPOINT_FORMAT,
        "version": ckpt.CHECKPOINT_VERSION,
        "epoch": epoch,
        "w": torch.arange(5.0),
    }


def _corrupt(file):
    data = bytearray(file.read_bytes())
    record = torch.load(file, weights_only=True)
    payload = record["state"].numpy().tobytes()
    at = bytes(data).index(payload) + len(payload) // 2  # a byte inside the serialised state
    data[at] ^= 0xFF
    file.write_bytes(bytes(data))


def test_checkpoint_records_the_hash_of_its_state_and_keeps_the_one_before(tmp_path):
    ckpt.save(_state(1), tmp_path)
    ckpt.save(_state(2), tmp_path)
    record = torch.load(tmp_path / ckpt.CHECKPOINT_NAME, weights_only=True)
    assert record["epoch"] == 2
    assert record["sha256"] == hashlib.sha256(record["state"].numpy().tobytes()).hexdigest()
    assert ckpt.load(tmp_path)["epoch"] == 2
    assert ckpt.load(tmp_path / ckpt.PREVIOUS_NAME)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [ckpt.CHECKPOINT_NAME, ckpt.PREVIOUS_NAME]


def test_corrupted_checkpoint_is_refused_and_the_directory_falls_back(tmp_path, caplog):
    ckpt.save(_state(1), tmp_path)
    ckpt.save(_state(2), tmp_path)
    last = tmp_path / ckpt.CHECKPOINT_NAME
    _corrupt(last)
    with pytest.raises(ValueError, match="last.ckpt is corrupted: the SHA-256"):
        ckpt.load(last)
    with caplog.at_level(logging.WARNING, logger="pyro_ldvae.infer.checkpoint"):
        assert ckpt.load(tmp_path)["epoch"] == 1  # previous.ckpt, with a warning naming last.ckpt
    assert "last.ckpt is corrupted" in caplog.text and "Falling back" in caplog.text
    _corrupt(tmp_path / ckpt.PREVIOUS_NAME)
    with pytest.raises(ValueError, match="No intact checkpoint is left"):
        ckpt.load(tmp_path)
    last.unlink()  # a crash between the two renames of a save leaves previous.ckpt only
    ckpt.save(_state(3), tmp_path / "other")
    (tmp_path / "other" / ckpt.CHECKPOINT_NAME).rename(tmp_path / "other" / ckpt.PREVIOUS_NAME)
    assert ckpt.load(tmp_path / "other")["epoch"] == 3


def test_restart_resumes_from_the_checkpoint_dir_bit_identically(adata, tmp_path, monkeypatch):
    plain = _model(adata).train(max_epochs=4, **KW)
    monkeypatch.setenv(elastic.RESTART_COUNT, "0")  # the first attempt starts afresh, whatever the directory holds
    _model(adata).train(max_epochs=2, checkpoint_dir=str(tmp_path), **KW)
    monkeypatch.setenv(elastic.RESTART_COUNT, "1")  # torchrun restarted the process: it resumes by itself
    resumed = _model(adata).train(max_epochs=4, checkpoint_dir=str(tmp_path), **KW)
    for name, value in plain.module.state_dict().items():
        assert torch.equal(resumed.module.state_dict()[name], value), name
    assert resumed.history["elbo_train"].equals(plain.history["elbo_train"])
    assert ckpt.load(tmp_path)["epoch"] == 4


def test_restart_refuses_a_checkpoint_of_another_run(adata, tmp_path, monkeypatch):
    _model(adata).train(max_epochs=1, checkpoint_dir=str(tmp_path), **KW)
    monkeypatch.setenv(elastic.RESTART_COUNT, "1")
    with pytest.raises(ValueError, match="different run.*batch_size '64' there, '32' here.*checkpoint_dir of its own"):
        _model(adata).train(max_epochs=2, checkpoint_dir=str(tmp_path), **{**KW, "batch_size": 32})
    with pytest.raises(ValueError, match="1 completed epochs, more than max_epochs=0"):
        elastic.starting_state(None, tmp_path, ckpt.load(tmp_path)["run"], 0, None)


def test_explicit_resume_from_another_run_warns(adata, tmp_path, caplog):
    _model(adata).train(max_epochs=1, checkpoint_dir=str(tmp_path), **KW)
    with caplog.at_level(logging.WARNING, logger="pyro_ldvae.infer.elastic"):
        _model(adata).train(max_epochs=2, resume_from=str(tmp_path), **{**KW, "plan_kwargs": {"lr": 5e-3}})
    assert "written by a run with other settings: plan" in caplog.text


def test_restarted_group_gets_a_store_of_its_own(monkeypatch):
    server = dist.TCPStore("127.0.0.1", 0, 1, is_master=True)
    env = {"TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_MAX_RESTARTS": "2", "GROUP_WORLD_SIZE": "1"}
    env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(server.port), "WORLD_SIZE": "1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv(elastic.RESTART_COUNT, "1")
    distributed._attempt_store().set("rank_0", "address")
    assert server.get("pyro_ldvae/attempt_1/rank_0") == b"address"  # the last attempt's keys are not seen
    assert not server.check(["rank_0"])
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")  # several nodes: torchrun must give each attempt its own store
    with pytest.raises(RuntimeError, match="TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"):
        distributed._attempt_store()
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "0")
    assert distributed._attempt_store() is None

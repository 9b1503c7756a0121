# Set-up and entry points. `make run` and `make test` work on a fresh machine with only Python:
# they create .venv, install torch when it is missing (pinned to 2.13.0, whose CPU wheel is on
# this project's build machines; elsewhere pip takes the matching wheel from PyPI), then the package.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0

.PHONY: install install-test run test test-fast lint layout notebooks docs clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

install: $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e .

install-test: install
	$(PY) -m pip install --quiet -e ".[test]"

run: install
	$(VENV)/bin/pyro-ldvae fit -o pbmc68k_ldvae.h5ad --overwrite

# The whole suite (what CI runs, .ci/run).
test: install-test
	$(PY) -m pytest -q

# A representative subset, under 90 s on 2 idle cores: the unit-level tests of every layer, one or
# a few cases of each parametrized family (parity with scvi-tools, the CUDA-graph scan, the replayed
# CPU step, model options), input checks, faults, io and docs. Everything runs in `make test`.
FAST_TESTS := tests/test_docs.py tests/test_layers.py tests/test_nn.py tests/test_distributions.py \
	tests/test_module.py tests/test_priors.py tests/test_validate.py tests/test_io.py tests/test_pl.py \
	tests/test_train.py tests/test_model.py tests/test_parity_scvi.py tests/test_cuda_graph.py \
	tests/test_traced_step.py tests/test_data.py \
	tests/test_model_tasks.py::test_running_moments_equal_variance_of_all_rows \
	tests/test_de.py::test_bayes_factors_known_answers tests/test_de.py::test_fdr_prediction_known_answer \
	tests/test_de.py::test_importance_weights_match_scvi_tools
FAST_K := not (every_option and not normal-True) \
	and not (match_scvi and not (False-1-nb or True-3-zinb)) \
	and not (from_scvi_parity and not nb-gene-1) \
	and not (cannot_capture and not csr-zinb) \
	and not (bit_for_bit and not [nb]) \
	and not (importance_weights_match and zinb) \
	and not backed_memory_per_cell and not device_resident_training and not cli_ctrl_c \
	and not test_recovers_true_loadings and not real_counts_equals_eager and not on_disk_equals_eager \
	and not python_replay_also and not steps_left_eager and not failed_recording_warns \
	and not narrow_linear_matches and not history_split and not same_seed_same_loadings \
	and not resume_keeps_early_stopping
test-fast: install-test
	$(PY) -m pytest -q -m "not slow and not shared_data" -k "$(FAST_K)" $(FAST_TESTS)

# Rewrite docs/layout.md's table of modules from the package tree (tests/test_docs.py checks it).
layout: install
	$(PY) tools/layout_table.py

# Re-execute notebooks/*.ipynb in place, refreshing their stored outputs.
notebooks: install-test
	$(PY) notebooks/run_all.py

lint: install-test
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

# Build the documentation site into docs/_build/html; warnings are errors. The docs extras go
# into $(DOCS_VENV) (default: .venv), created and given torch and the package when missing.
DOCS_VENV ?= $(VENV)
DOCS_PY := $(DOCS_VENV)/bin/python
docs:
	test -x $(DOCS_PY) || $(PYTHON) -m venv $(DOCS_VENV)
	$(DOCS_PY) -c "import torch" 2>/dev/null || $(DOCS_PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(DOCS_PY) -c "import sphinx, myst_nb, pyro_ldvae" 2>/dev/null || $(DOCS_PY) -m pip install --quiet -e ".[docs]"
	$(DOCS_PY) -m sphinx -W --keep-going -b html docs docs/_build/html

clean:
	rm -rf $(VENV) build *.egg-info

# Set-up and entry points. `make run` and `make test` work on a fresh machine with only Python:
# they create .venv, install torch when it is missing (pinned to 2.13.0, whose CPU wheel is on
# this project's build machines; elsewhere pip takes the matching wheel from PyPI), then the package.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0

.PHONY: install install-test run test test-fast lint layout notebooks clean

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

# A representative subset, under 90 s on 2 cores: every unit-level test, without the tests marked
# slow or shared_data and without the heaviest trainings below (all of them still run in `make test`).
FAST_DESELECT := \
	tests/test_model.py::test_recovers_true_loadings \
	tests/test_model_tasks.py::test_posterior_predictive_check_on_held_out_cells \
	tests/test_notebooks.py \
	tests/test_distributed.py \
	tests/test_real_data.py \
	tests/test_saved_release.py
test-fast: install-test
	$(PY) -m pytest -q -m "not slow and not shared_data" $(addprefix --deselect ,$(FAST_DESELECT))

# Rewrite README.md's layout table from the package tree (tests/test_docs.py checks it).
layout: install
	$(PY) tools/layout_table.py

# Re-execute notebooks/*.ipynb in place, refreshing their stored outputs.
notebooks: install-test
	$(PY) notebooks/run_all.py

lint: install-test
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) build *.egg-info

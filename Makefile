# Set-up and entry points. `make run` and `make test` work on a fresh machine with only Python:
# they create .venv, install torch when it is missing (pinned to 2.13.0, whose CPU wheel is on
# this project's build machines; elsewhere pip takes the matching wheel from PyPI), then the package.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0

.PHONY: install install-test run test lint notebooks docs clean

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

test: install-test
	$(PY) -m pytest -q

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

"""Sphinx configuration of the pyro_ldvae documentation site (``make docs``)."""

from __future__ import annotations

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS.parent))  # document the working tree, installed or not

import pyro_ldvae  # noqa: E402

project = "pyro_ldvae"
author = "pyro_ldvae contributors"
copyright = "pyro_ldvae contributors"
release = pyro_ldvae.__version__
version = release

extensions = [
    "myst_nb",  # Markdown pages (MyST) and notebooks, rendered from their stored outputs
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",  # numpy-style docstrings
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

# The notebooks live in ../notebooks (docs/notebooks is a symbolic link to it); they are never
# executed at build time: what is shown is what `make notebooks` stored in them.
nb_execution_mode = "off"
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3
source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb", ".rst": "restructuredtext"}

exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints", "notebooks/run_all.py"]

# Autodoc: the public names of the package, their docstrings in numpy style.
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": False}
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
nitpicky = False

# Warnings are errors (`sphinx-build -W`); no warning is silenced.
suppress_warnings: list[str] = []

html_theme = "alabaster"
html_title = f"pyro_ldvae {release}"
html_static_path: list[str] = []
html_theme_options = {"description": "LDVAE for single-cell counts, as a Pyro program", "fixed_sidebar": True}


def _design_page(app, docname, source):
    """Keep ``design`` in the landing page's toctree only when docs/design.md exists."""
    if docname == "index" and not (DOCS / "design.md").exists():
        source[0] = "\n".join(line for line in source[0].splitlines() if line.strip() != "design")


def setup(app):
    app.connect("source-read", _design_page)

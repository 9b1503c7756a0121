"""The documentation site builds with warnings as errors, and its API page names every public name."""

from __future__ import annotations

import importlib.util
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

needs_sphinx = pytest.mark.skipif(
    importlib.util.find_spec("sphinx") is None or importlib.util.find_spec("myst_nb") is None,
    reason="sphinx and myst-nb are not installed (pip install -e '.[docs]')",
)


def _public_names() -> list[str]:
    """pyro_ldvae.__all__, and the public classes and functions of its public modules."""
    import pyro_ldvae

    names = []
    for name in pyro_ldvae.__all__:
        obj = getattr(pyro_ldvae, name)
        names.append(f"pyro_ldvae.{name}")
        if inspect.ismodule(obj):
            for member, value in vars(obj).items():
                if member.startswith("_") or not (inspect.isclass(value) or inspect.isfunction(value)):
                    continue
                if getattr(value, "__module__", None) == obj.__name__:
                    names.append(f"pyro_ldvae.{name}.{member}")
    return names


def test_api_page_lists_every_public_name():
    text = (DOCS / "api.rst").read_text()
    missing = [name for name in _public_names() if name not in text]
    assert not missing, f"docs/api.rst does not document: {missing}"


def test_plotting_gallery_images_exist_and_stay_small():
    import re

    images = re.findall(r"\]\((_static/[^)]+\.png)\)", (DOCS / "plotting.md").read_text())
    assert len(images) >= 4
    for image in images:
        path = DOCS / image
        assert path.exists() and path.stat().st_size < 60_000, image


@needs_sphinx
@pytest.mark.slow
def test_docs_build_without_warnings(tmp_path):
    cmd = [
        sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
        "-d", str(tmp_path / "doctrees"), str(DOCS), str(tmp_path / "html"),
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"sphinx-build failed:\n{result.stdout[-5000:]}\n{result.stderr[-10000:]}"
    html = tmp_path / "html"
    for page in [
        "index",
        "installation",
        "quickstart",
        "api",
        "benchmarks",
        "scvi_differences",
        "guide/scale",
        "plotting",
    ]:
        assert (html / f"{page}.html").exists(), page
    for notebook in (ROOT / "notebooks").glob("*.ipynb"):
        assert (html / "notebooks" / f"{notebook.stem}.html").exists(), notebook.name
    api = (html / "api.html").read_text()
    assert "pyro_ldvae.LinearSCVI" in api and "get_latent_representation" in api

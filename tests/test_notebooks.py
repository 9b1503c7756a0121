"""The notebooks execute end to end without error (into a temporary copy; the stored ones are untouched)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
SHARED_DATA = NOTEBOOKS.parents[1] / "shared" / "data"
NEEDS_SHARED_DATA = {"04_gene_programs"}  # read ../shared/data, which only a checkout beside it has


def _run_all():
    spec = importlib.util.spec_from_file_location("run_all", NOTEBOOKS / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_all"] = module
    spec.loader.exec_module(module)
    return module


run_all = _run_all()


@pytest.mark.slow
@pytest.mark.parametrize("path", run_all.notebooks(), ids=lambda p: p.stem)
def test_notebook_executes(path, tmp_path):
    if path.stem in NEEDS_SHARED_DATA and not SHARED_DATA.exists():
        pytest.skip(f"{path.name} reads {SHARED_DATA}, which is absent")
    out = tmp_path / path.name
    seconds = run_all.execute(path, out)  # raises CellExecutionError on the first failing cell
    assert out.exists()
    print(f"{path.name}: {seconds:.0f} s")

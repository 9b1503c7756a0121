"""Re-execute the notebooks in place, refreshing their stored outputs.

Usage (from the repository root)::

    python notebooks/run_all.py                 # all notebooks
    python notebooks/run_all.py 02 03           # those whose names start with 02 or 03

Each notebook runs in a fresh kernel with the repository on ``PYTHONPATH`` and its own folder as
the working directory, and is written back with its outputs. Needs the ``test`` extra
(``nbclient``, ``nbformat``, ``ipykernel``). ``make notebooks`` does the same.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TIMEOUT_S = 600  # per cell


def notebooks(prefixes: list[str] | None = None) -> list[Path]:
    """The notebooks of this folder in order, optionally those whose names start with ``prefixes``."""
    paths = sorted(HERE.glob("[0-9][0-9]_*.ipynb"))
    return [p for p in paths if not prefixes or any(p.name.startswith(q) for q in prefixes)]


def execute(path: Path, out: Path | None = None) -> float:
    """Run the notebook at ``path`` and write it (with outputs) to ``out`` (default: in place); seconds taken."""
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    NotebookClient(
        nb, timeout=TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    ).execute()
    elapsed = time.perf_counter() - start
    nbformat.write(nb, out or path)
    return elapsed


def main(argv: list[str]) -> None:
    for path in notebooks(argv):
        print(f"{path.name}: running ...", flush=True)
        print(f"{path.name}: done in {execute(path):.0f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

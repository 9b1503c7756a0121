"""Write the layout table of docs/layout.md from the package tree: one row per module, grouped by layer.

Each row is a module's path and the first sentence of its module docstring. The table replaces
the text between ``<!-- layout:start -->`` and ``<!-- layout:end -->``; ``tests/test_docs.py``
fails when docs/layout.md differs from what this script would write.

Examples
--------
python tools/layout_table.py           # rewrite docs/layout.md
python tools/layout_table.py --check   # exit 1 if docs/layout.md is out of date
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "pyro_ldvae"
# Layers from the bottom up: imports only go downward (tests/test_layers.py).
LAYERS = ("kernels", "data", "models", "infer", "tasks", "api")
START, END = "<!-- layout:start -->", "<!-- layout:end -->"


def summary(path: Path) -> str:
    """The first sentence of a module's docstring (its first paragraph, unwrapped), or ''."""
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    paragraph = " ".join(doc.strip().split("\n\n", 1)[0].split())
    sentence = re.split(r"(?<=\.)\s+(?=[A-Z`(])", paragraph, maxsplit=1)[0]
    return sentence.replace("``", "`").replace("|", "\\|")


def layer_of(path: Path) -> str:
    parts = path.relative_to(ROOT / PACKAGE).parts
    return parts[0] if len(parts) > 1 else "(package)"


def table(root: Path = ROOT) -> str:
    """The layout table as Markdown: layers in import order, the package's top-level files first."""
    order = {"(package)": -1, **{name: i for i, name in enumerate(LAYERS)}}
    modules = sorted(
        (root / PACKAGE).rglob("*.py"),
        key=lambda p: (order.get(layer_of(p), len(LAYERS)), p.name != "__init__.py", str(p)),
    )
    rows = ["| layer | module | what it holds |", "|---|---|---|"]
    for path in modules:
        if "__pycache__" in path.parts:
            continue
        rows.append(f"| {layer_of(path)} | `{path.relative_to(root).as_posix()}` | {summary(path)} |")
    return "\n".join(rows)


def render(readme: str, root: Path = ROOT) -> str:
    """``readme`` with the text between the markers replaced by the current table."""
    head, sep, rest = readme.partition(START)
    _, sep2, tail = rest.partition(END)
    if not (sep and sep2):
        raise ValueError(f"The layout page lacks the markers {START} ... {END}")
    return f"{head}{START}\n{table(root)}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/layout.md is out of date")
    parser.add_argument("--readme", type=Path, default=ROOT / "docs" / "layout.md", help="the page to rewrite")
    args = parser.parse_args(argv)
    old = args.readme.read_text(encoding="utf-8")
    new = render(old)
    if args.check:
        if new != old:
            print(f"{args.readme}: layout table out of date; run `make layout`", file=sys.stderr)
            return 1
        return 0
    if new != old:
        args.readme.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

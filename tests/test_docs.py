"""The documentation states the present tree: docs/layout.md's table is generated from it."""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import layout_table  # noqa: E402


def test_layout_table_matches_the_package_tree():
    page = (ROOT / "docs" / "layout.md").read_text(encoding="utf-8")
    assert layout_table.render(page) == page, "docs/layout.md's table is out of date: run `make layout`"


def test_layout_table_has_one_row_per_module():
    table = layout_table.table()
    modules = [p for p in (ROOT / "pyro_ldvae").rglob("*.py") if "__pycache__" not in p.parts]
    for path in modules:
        assert f"`{path.relative_to(ROOT).as_posix()}`" in table
    assert len(table.splitlines()) == len(modules) + 2


def test_readme_keeps_the_two_commands_first():
    head = "\n".join((ROOT / "README.md").read_text(encoding="utf-8").splitlines()[:6])
    assert "make run" in head and "make test" in head


def test_user_docs_do_not_narrate_development_sessions():
    pattern = re.compile(
        r"\b(first|second|third|fourth|fifth|sixth|seventh|eighth|this|previous|next|earlier|later|last|founding)"
        r" session|\bsession [0-9]",
        re.IGNORECASE,
    )
    for name in ("README.md", "benchmarks/README.md", "CHANGELOG.md"):
        text = (ROOT / name).read_text(encoding="utf-8")
        assert not pattern.search(text), f"{name}: {pattern.search(text).group(0)!r}"

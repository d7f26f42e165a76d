"""The README keeps the promises of the core issue: it opens with exactly two commands, and its solver
table names every registered solver and nothing else."""

from __future__ import annotations

import re
from pathlib import Path

import fastsde

README = Path(__file__).resolve().parents[1] / "README.md"


def _solver_rows(text: str) -> list[str]:
    section = text.split("### Solvers", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `([a-z0-9_]+)` \|", section, flags=re.MULTILINE)


def test_readme_opens_with_exactly_two_commands():
    text = README.read_text(encoding="utf-8")
    first_block = re.search(r"```(?:sh|bash)?\n(.*?)```", text, flags=re.DOTALL)
    assert first_block is not None and text.index("```") < text.index("## Use")
    commands = [line.split("#", 1)[0].strip() for line in first_block.group(1).splitlines() if line.strip()]
    assert commands == ["make sample", "make test"]


def test_solver_table_lists_every_registered_solver():
    rows = _solver_rows(README.read_text(encoding="utf-8"))
    assert len(rows) == len(set(rows)), f"duplicate rows: {rows}"
    unknown = sorted(set(rows) - set(fastsde.SOLVERS))
    assert not unknown, f"README rows for solvers that are not registered: {unknown}"
    missing = sorted(set(fastsde.SOLVERS) - set(rows))
    assert not missing, f"registered solvers without a README row: {missing}"

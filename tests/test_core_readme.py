"""The README keeps the promises of the core issue: it opens with exactly two commands, and its solver
table names every registered solver and nothing else."""

from __future__ import annotations

import math
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


def _parse_readme_default(text: str) -> tuple[bool, object]:
    """(checkable, value) for one '(default)' of the README's options column."""
    text = text.strip()
    if "|" in text:  # a list of choices: the default is written first
        text = text.split("|", 1)[0].rstrip(" \\")
    if text.startswith("`") and text.endswith("`"):
        return True, text.strip("`")
    if text in ("True", "False"):
        return True, text == "True"
    if text == "∞":
        return True, math.inf
    number = re.match(r"^-?[0-9.]+(?:e-?[0-9]+)?", text)
    return (True, float(number.group(0))) if number else (False, None)


def test_solver_table_defaults_match_the_code():
    """Every default the README's solver table states is the registered option's default (on VP):
    the table repeats them for readers, so this keeps the two from drifting apart."""
    section = README.read_text(encoding="utf-8").split("### Solvers", 1)[1].split("\n## ", 1)[0]
    sde = fastsde.VPSDE()
    checked = []
    for row in re.findall(r"^\| `([a-z0-9_]+)` \|(.*)$", section, flags=re.MULTILINE):
        name, cells = row[0], [c.strip() for c in row[1].split(" | ")]
        options_cell = cells[2]
        spec = fastsde.SOLVERS[name]
        for opt, stated in re.findall(r"([a-z_]+)(?: [A-Z])? \(([^()]*)\)", options_cell):
            ok, value = _parse_readme_default(stated)
            if not ok:
                continue
            assert opt in spec.options, f"README lists option {opt!r} for {name}, which it does not have"
            actual = spec.options[opt].default_for(sde)
            if isinstance(value, float):
                assert not isinstance(actual, (bool, str)) and float(actual) == value, (
                    f"README says {name}.{opt} defaults to {stated!r}, the code to {actual!r}"
                )
            else:
                assert actual == value, f"README says {name}.{opt} defaults to {stated!r}, the code to {actual!r}"
            checked.append(f"{name}.{opt}")
    assert len(checked) >= 30, f"only {len(checked)} README defaults could be read: {checked}"

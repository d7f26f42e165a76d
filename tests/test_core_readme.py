"""The README keeps its promises: it opens with exactly two commands; and the solver reference of the
docs site is generated from the registry, so that it names every registered solver and option, with the
code's defaults (it cannot drift: this checks the generator)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import fastsde

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "_hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_opens_with_exactly_two_commands():
    text = README.read_text(encoding="utf-8")
    first_block = re.search(r"```(?:sh|bash)?\n(.*?)```", text, flags=re.DOTALL)
    assert first_block is not None and text.index("```") < text.index("## In ten lines")
    commands = [line.split("#", 1)[0].strip() for line in first_block.group(1).splitlines() if line.strip()]
    assert commands == ["make sample", "make test"]


def test_generated_solver_table_lists_every_registered_solver():
    rows = re.findall(r"^\| \[`([a-z0-9_]+)`\]", _hooks().solver_table(), flags=re.MULTILINE)
    assert rows == list(fastsde.SOLVERS)


def test_generated_solver_options_state_the_code_defaults():
    text = _hooks().solver_options()
    sections = dict(re.findall(r"^### `([a-z0-9_]+)` \{#[a-z0-9_]+\}\n(.*?)(?=^### |\Z)", text, re.DOTALL | re.M))
    assert list(sections) == list(fastsde.SOLVERS)
    for name, body in sections.items():
        stated = dict(re.findall(r"^\| `([a-z_0-9]+)` \| (.*?) \|", body, flags=re.MULTILINE))
        spec = fastsde.SOLVERS[name]
        assert list(stated) == list(spec.options), name
        for opt_name, opt in spec.options.items():
            want = "depends on the process" if callable(opt.default) else f"`{opt.default!r}`"
            assert stated[opt_name] == want.replace("|", "\\|"), (name, opt_name)
        declared = re.search(r"^Declared: (.*)$", body, flags=re.MULTILINE).group(1)
        assert ("adaptive step size" in declared) == spec.adaptive
        assert ("stochastic" in declared) == spec.stochastic


def test_generated_cli_reference_covers_every_command_and_flag():
    from fastsde.cli import build_parser

    text = _hooks().cli_reference()
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, p in sub.choices.items():
        section = text.split(f"## `fastsde {name}`\n", 1)[1].split("\n## ", 1)[0]
        for action in p._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert f"`{flag}`" in section, (name, flag)

"""mkdocs hooks: the reference pages that come from the code itself, not from copies of it.

A page holding one of these markers gets the marker replaced at build time:

- ``<!-- generated: solver-table -->``: one row per registered solver (``fastsde.SOLVERS``), from the
  solver's own declarations (adaptive or fixed grid, stochastic, order, NFE per step, coordinate);
- ``<!-- generated: solver-options -->``: each solver's summary and options (default and doc string);
- ``<!-- generated: cli -->``: every ``fastsde`` subcommand from its argparse definition.
"""

from __future__ import annotations

import argparse
import html
from typing import Any


def _cell(text: Any) -> str:
    return html.escape(str(text), quote=False).replace("|", "\\|").replace("\n", " ")


def _default(value: Any) -> str:
    if callable(value):
        return "depends on the process"
    return f"`{value!r}`"


def _order(value: float) -> str:
    return f"{value:g}"


def solver_table() -> str:
    from fastsde import SOLVERS

    rows = ["| solver | what it is | kind | order | NFE / step |", "|---|---|---|---|---|"]
    for name, spec in SOLVERS.items():
        artifact = f" Takes a fitted `{spec.artifact[1].__name__}`." if spec.artifact else ""
        kind = (
            f"{'adaptive' if spec.adaptive else 'fixed grid'}, {'stochastic' if spec.stochastic else 'deterministic'}"
        )
        nfe = "" if spec.nfe_per_step is None else spec.nfe_per_step
        rows.append(
            f"| [`{name}`](#{name}) | {_cell(spec.summary)}{artifact} | {kind} | {_order(spec.order)} | {nfe} |"
        )
    return "\n".join(rows)


def solver_options() -> str:
    from fastsde import SOLVERS

    out = []
    for name, spec in SOLVERS.items():
        out.append(f"### `{name}` {{#{name}}}\n")
        out.append(_cell(spec.summary) + "\n")
        facts = [
            "adaptive step size" if spec.adaptive else "fixed grid",
            "stochastic" if spec.stochastic else "deterministic",
            f"order {_order(spec.order)}",
            f"coordinate {spec.coordinate}",
        ]
        if spec.tolerance:
            facts.append(f"tolerance option `{spec.tolerance}`")
        out.append("Declared: " + ", ".join(facts) + ".\n")
        if spec.options:
            out.append("| option | default | meaning |\n|---|---|---|")
            for opt_name, opt in spec.options.items():
                out.append(f"| `{opt_name}` | {_cell(_default(opt.default))} | {_cell(opt.doc)} |")
            out.append("")
    return "\n".join(out)


def _flags(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.metavar or action.dest}`"
    return ", ".join(f"`{s}`" for s in action.option_strings)


def cli_reference() -> str:
    from fastsde.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {choice.dest: choice.help for choice in sub._choices_actions}
    out = []
    for name, p in sub.choices.items():
        out.append(f"## `fastsde {name}`\n")
        out.append(_cell(p.description or helps.get(name) or "") + "\n")
        out.append("| argument | default | meaning |\n|---|---|---|")
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            default = "" if action.default in (None, False, argparse.SUPPRESS) else f"`{action.default}`"
            choices = f" (one of {', '.join(map(str, action.choices))})" if action.choices else ""
            out.append(f"| {_flags(action)} | {_cell(default)} | {_cell((action.help or '') + choices)} |")
        out.append("")
    return "\n".join(out)


GENERATORS = {
    "<!-- generated: solver-table -->": solver_table,
    "<!-- generated: solver-options -->": solver_options,
    "<!-- generated: cli -->": cli_reference,
}


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001 - the mkdocs hook signature
    for marker, make in GENERATORS.items():
        if marker in markdown:
            markdown = markdown.replace(marker, make())
    return markdown

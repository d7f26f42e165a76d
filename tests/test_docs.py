"""The documentation cannot drift from the code: the site builds under ``mkdocs build --strict`` (broken
links and missing references fail), and every code block of the README and of docs/ runs.

How a page's code blocks run (one test per page):

- ```` ```python ```` blocks run in order in one namespace per page, in a fresh temporary folder, with
  one torch thread; a block may use what an earlier block of its page defined.
- ```` ```sh ```` / ```` ```bash ```` blocks: every line is a ``fastsde ...`` command, run in-process
  through ``fastsde.cli.main`` (exit status 0 required); ``#`` comments and blank lines are skipped.
- Setup the reader does not need to see goes in an HTML comment just before a block:
  ``<!-- docs-test-setup: CODE -->`` runs CODE (one line, or several lines up to ``-->``) in the page's
  namespace first; ``docs_fixtures`` (tests/docs_fixtures.py) offers offline stand-ins such as
  ``offline_hub()`` (``from_pretrained`` builds a tiny local model; nothing is downloaded).
- ``<!-- docs-test: skip REASON -->`` just before a block skips it; REASON is required and the skipped
  blocks are listed by ``test_skipped_blocks_say_why`` (install commands, hours-long reproductions of
  a measured table, torchrun launches).
- ``text`` / ``console`` / unlabelled blocks are output and are not run.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted([ROOT / "README.md", *(p for p in DOCS.rglob("*.md") if "bench" not in p.relative_to(DOCS).parts[:1])])
RUN_LANGS = {"python", "sh", "bash"}

FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[^\n]*\n(?P<code>.*?)^(?P=indent)```[ \t]*$", re.DOTALL | re.MULTILINE
)
SKIP = re.compile(r"<!--\s*docs-test:\s*skip\s*(?P<reason>.*?)\s*-->\s*$", re.DOTALL)
SETUP = re.compile(r"<!--\s*docs-test-setup:\s*(?P<code>.*?)-->\s*$", re.DOTALL)


@dataclass
class Block:
    page: Path
    line: int
    lang: str
    code: str
    setup: str | None
    skip: str | None

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a page, each with the setup / skip comment written just before it."""
    text = page.read_text(encoding="utf-8")
    found = []
    for m in FENCE.finditer(text):
        before = text[: m.start()].rstrip()
        tail = before[before.rfind("<!--") :] if before.endswith("-->") else ""
        skip, setup = SKIP.search(tail), SETUP.search(tail)
        found.append(
            Block(
                page=page,
                line=text.count("\n", 0, m.start()) + 1,
                lang=m.group("lang").lower(),
                code=textwrap.dedent(m.group("code")),
                setup=setup.group("code").strip() if setup else None,
                skip=skip.group("reason") if skip else None,
            )
        )
    return found


def _run_shell(block: Block) -> None:
    from fastsde.cli import main

    for raw in block.code.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        argv = shlex.split(line, comments=True)
        assert argv[0] == "fastsde", (
            f"{block.where}: a shell block runs fastsde commands only; mark other commands "
            f"<!-- docs-test: skip REASON --> (got {line!r})"
        )
        code = main(argv[1:])
        assert code == 0, f"{block.where}: {line!r} exited with status {code}"


def run_page(page: Path, tmp_path: Path) -> int:
    """Run every runnable block of a page; returns how many ran."""
    namespace: dict = {"__name__": "__docs__"}
    ran = 0
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for block in blocks(page):
            if block.lang not in RUN_LANGS or block.skip is not None:
                continue
            if block.setup:
                exec(compile(block.setup, f"{block.where} (setup)", "exec"), namespace)  # noqa: S102
            if block.lang == "python":
                exec(compile(block.code, block.where, "exec"), namespace)  # noqa: S102
            else:
                _run_shell(block)
            ran += 1
    finally:
        os.chdir(cwd)
    return ran


def _page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_code_blocks_run(page: Path, tmp_path: Path, monkeypatch) -> None:
    torch.set_num_threads(1)
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent))  # docs_fixtures
    monkeypatch.setenv("MPLBACKEND", "Agg")
    import docs_fixtures

    try:
        run_page(page, tmp_path)
    finally:
        docs_fixtures.restore()


def test_skipped_blocks_say_why() -> None:
    for page in PAGES:
        for block in blocks(page):
            if block.skip is not None:
                assert len(block.skip) >= 10, f"{block.where}: a skipped block needs its reason"


def test_readme_fits_on_a_page() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines (at most 150)"
    longest = max(lines, key=len)
    assert len(longest) <= 120, f"README.md's longest line has {len(longest)} characters: {longest[:60]!r}..."


def test_no_work_item_numbers_in_the_docs() -> None:
    """Pages are organised by the reader's question; internal work items mean nothing to a user."""
    for page in PAGES:
        for i, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            assert not re.search(r"\b[Ii]ssues? #?\d+\b", line), f"{page.relative_to(ROOT)}:{i}: {line[:80]!r}"


def test_site_builds_strict(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    warnings = [line for line in proc.stderr.splitlines() if "WARNING" in line]
    assert not warnings, "\n".join(warnings)
    assert (tmp_path / "site" / "reference" / "api" / "index.html").is_file()


def test_api_reference_covers_every_public_name() -> None:
    """Every name of ``fastsde.__all__`` has its entry in the generated API reference."""
    import fastsde

    text = (DOCS / "reference" / "api.md").read_text(encoding="utf-8")
    listed = set(re.findall(r"^::: fastsde\.([A-Za-z_]\w*)\s*$", text, flags=re.MULTILINE))
    missing = sorted(set(fastsde.__all__) - listed)
    assert not missing, f"docs/reference/api.md lacks {missing}"

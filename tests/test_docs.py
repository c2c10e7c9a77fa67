"""The documentation: the MkDocs site builds without a warning and the README's links resolve.

A moved or renamed page breaks links silently on GitHub; `mkdocs build --strict` turns every
broken link, missing anchor and page left out of the navigation into a failure.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

# [text](target) and ![alt](target); the target ends at whitespace or the closing parenthesis
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)


def relative_links(markdown: str) -> list[str]:
    """Link targets of a Markdown text that point into the repository (no URL, no bare #anchor),
    ignoring fenced code blocks."""
    text = _FENCE.sub("", markdown)
    targets = [m.group(1) for m in _LINK.finditer(text)]
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]


def test_relative_links_finds_only_repository_links() -> None:
    text = (
        '[a](docs/a.md) ![b](img/b.png "title") [c](https://x.org) [d](#top) [e](mailto:x@y)\n'
        "```\n[f](in/code.md)\n```\n[g](docs/g.md#part)"
    )
    assert relative_links(text) == ["docs/a.md", "img/b.png", "docs/g.md#part"]


def test_every_relative_link_in_the_readme_points_at_a_file() -> None:
    readme = ROOT / "README.md"
    links = relative_links(readme.read_text())
    assert any(t.startswith("docs/") for t in links), "the README should link into docs/"
    missing = [t for t in links if not (readme.parent / t.split("#", 1)[0]).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    for module in ("mkdocs", "material"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed: pip install -e '.[dev]' installs MkDocs")
    site = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", "mkdocs.yml", "-d", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for page in sorted((ROOT / "docs").glob("*.md")):
        built = site / ("index.html" if page.stem == "index" else f"{page.stem}/index.html")
        assert built.is_file(), f"docs/{page.name} was not built into {built}"


def readme_python_block() -> str:
    """The fenced Python block of the README's "Python in ten lines" section."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Python in ten lines", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the README's Python section has no ```python block"
    return match.group(1)


def test_the_readme_python_example_runs(tmp_path: Path) -> None:
    """Run as written, in a fresh process, from a directory holding the repository's conf/."""
    code = readme_python_block()
    assert len([line for line in code.splitlines() if line.strip()]) <= 12
    (tmp_path / "conf").symlink_to(ROOT / "conf")
    (tmp_path / "example.py").write_text(code)
    done = subprocess.run(
        [sys.executable, "example.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "two_stage" in done.stdout  # the lists came from the two-stage recommender
    assert (tmp_path / "my-model" / "manifest.json").is_file()


def test_the_notebook_style_walkthrough_runs(tmp_path: Path) -> None:
    """docs/examples/quickstart.py: fits the two-stage recommender in memory, saves, loads in
    a fresh process and asserts the same lists."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "examples" / "quickstart.py"), str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "same lists after save -> load in a fresh process" in done.stdout

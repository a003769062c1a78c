"""docs/guarantees.md names the tests that hold each promise: every name must exist.

The test modules are parsed with ``ast``, never imported. The document cites a
test in one of these backticked forms:

- ``tests/test_x.py::test_name``: a test defined in that file;
- ``Class::test_name``: a method of that class (or of one of its bases);
- ``test_name``: a test defined anywhere in ``tests/`` or in the suites
  ``stampede/testing`` ships (``conformance.py``, ``leases.py``);
- ``test_prefix_...``: at least one such test whose name starts with the prefix.

A backticked file path (``tests/test_x.py``, or a bare ``test_x.py`` taken
to be in ``tests/``) must name an existing file.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "guarantees.md"
SOURCES = [
    *sorted((ROOT / "tests").rglob("test_*.py")),
    ROOT / "stampede" / "testing" / "conformance.py",
    ROOT / "stampede" / "testing" / "leases.py",
]

_BACKTICKED = re.compile(r"`([^`\n]+)`")
_CITATION = re.compile(
    r"(?:(?P<file>[\w./-]+\.py)::)?(?:(?P<cls>[A-Za-z_]\w*)::)?(?P<name>test_\w*)(?P<more>\.\.\.|…)?"
)
_PATH = re.compile(r"(?:tests|stampede)/[\w./-]*|[\w./-]+\.py")


@dataclass
class Index:
    """Test functions and methods found in the sources, by file and by class."""

    functions: dict[str, set[str]] = field(default_factory=dict)  # file -> names
    classes: dict[str, list[tuple[str, set[str], list[str]]]] = field(
        default_factory=dict
    )  # class name -> [(file, test methods, base names)]

    def add(self, path: Path) -> None:
        rel = path.relative_to(ROOT).as_posix()
        names = self.functions.setdefault(rel, set())
        for node in ast.parse(path.read_text(encoding="utf-8"), str(path)).body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                if node.name.startswith("test_"):
                    names.add(node.name)
            elif isinstance(node, ast.ClassDef):
                methods = {
                    n.name
                    for n in node.body
                    if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
                    and n.name.startswith("test_")
                }
                bases = [b.id if isinstance(b, ast.Name) else ast.unparse(b) for b in node.bases]
                self.classes.setdefault(node.name, []).append((rel, methods, bases))
                names.update(methods)

    def methods_of(self, cls: str, seen: frozenset[str] = frozenset()) -> set[str]:
        found: set[str] = set()
        for _, methods, bases in self.classes.get(cls, []):
            found |= methods
            for base in bases:
                if base not in seen:
                    found |= self.methods_of(base.rsplit(".", 1)[-1], seen | {cls})
        return found

    def everywhere(self) -> set[str]:
        return set().union(*self.functions.values())


def build_index() -> Index:
    index = Index()
    for path in SOURCES:
        index.add(path)
    return index


def citations(text: str) -> list[tuple[str, re.Match[str]]]:
    """Every backticked test citation in ``text``: (the backticked text, its match)."""
    found = []
    for span in _BACKTICKED.findall(text):
        match = _CITATION.fullmatch(span.strip())
        if match:
            found.append((span, match))
    return found


def cited_paths(text: str) -> list[str]:
    return [s for s in _BACKTICKED.findall(text) if _PATH.fullmatch(s.strip())]


def problem(index: Index, match: re.Match[str]) -> str | None:
    """Why the citation does not name an existing test, or None if it does."""
    file, cls, name, more = match["file"], match["cls"], match["name"], match["more"]
    if cls is not None:
        if cls not in index.classes:
            return f"no class {cls}"
        pool, where = index.methods_of(cls), f"class {cls}"
    elif file is not None:
        if file not in index.functions:
            return f"no test file {file}"
        pool, where = index.functions[file], file
    else:
        pool, where = index.everywhere(), "tests/ or stampede/testing's suites"
    if more is not None:
        if not any(n.startswith(name) for n in pool):
            return f"no test in {where} starts with {name}"
    elif name not in pool:
        return f"not defined in {where}"
    return None


def test_every_test_guarantees_md_cites_exists() -> None:
    text = DOC.read_text(encoding="utf-8")
    found = citations(text)
    # Guard against a parser that silently finds nothing: the document cites ~60.
    assert len(found) >= 40, f"only {len(found)} test citations found in {DOC}: parser broken?"
    index = build_index()
    missing = [f"`{span}`: {why}" for span, m in found if (why := problem(index, m))]
    missing += [
        f"`{p}`: no such file"
        for p in cited_paths(text)
        if not ((ROOT / p.strip()).exists() or (ROOT / "tests" / p.strip()).exists())
    ]
    assert not missing, (
        f"{DOC.relative_to(ROOT)} cites {len(missing)} test(s) or file(s) that do not exist "
        "(renamed or moved? update the document):\n  " + "\n  ".join(missing)
    )

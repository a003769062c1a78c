"""Every Python example in the docs runs, so the docs cannot rot.

Each page's ```python blocks (docs/**/*.md and README.md) run in order as one
script in a fresh interpreter, the way a reader would paste them one after
another. Conventions, written as HTML comments so the rendered page does not
show them:

- ``<!-- docs-test: skip REASON -->`` on the line before a block: not run
  (kept for code that needs what the test machine lacks, e.g. a peer library
  in a migration guide's "before" column). The reason is required.
- ``<!-- docs-test: setup`` ... ``-->``: hidden code run at that point (stand-ins
  for the reader's own database or origin).
- ``redis://localhost:6379`` in a block means the test's private Redis server:
  the text is rewritten to its URL, so no example touches a shared server.
- ``postgresql://localhost/app`` likewise means a fresh database on the test's
  private PostgreSQL server.

A page whose examples use Redis gets a private server emptied for it; one whose
examples use PostgreSQL, a database of its own.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [*sorted((ROOT / "docs").rglob("*.md")), ROOT / "README.md"]
REDIS_PLACEHOLDER = "redis://localhost:6379"
POSTGRES_PLACEHOLDER = "postgresql://localhost/app"

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)(?P<rest>.*)$")
_SKIP = re.compile(r"<!--\s*docs-test:\s*skip\s+(?P<reason>\S.*?)\s*-->")
_SETUP_OPEN = re.compile(r"^\s*<!--\s*docs-test:\s*setup\s*$")


@dataclass
class Page:
    path: Path
    blocks: list[tuple[int, str]] = field(default_factory=list)  # (first line, code)
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (line, reason)

    @property
    def uses_redis(self) -> bool:
        return any(REDIS_PLACEHOLDER in code for _, code in self.blocks)

    @property
    def uses_postgres(self) -> bool:
        return any(POSTGRES_PLACEHOLDER in code for _, code in self.blocks)

    def script(self, redis_url: str | None, pg_url: str | None = None) -> str:
        parts = []
        for line, code in self.blocks:
            if redis_url is not None:
                parts_ = urlsplit(redis_url)
                code = code.replace(REDIS_PLACEHOLDER, f"{parts_.scheme}://{parts_.netloc}")
            if pg_url is not None:
                code = code.replace(POSTGRES_PLACEHOLDER, pg_url)
            parts.append(f"# --- {self.path.relative_to(ROOT)}:{line}\n{code}")
        return "\n".join(parts)


def parse(path: Path) -> Page:
    """The runnable blocks of a page, with their line numbers."""
    page = Page(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    skip_reason: str | None = None
    while i < len(lines):
        line = lines[i]
        if _SETUP_OPEN.match(line):
            start = i + 1
            i += 1
            body = []
            while i < len(lines) and lines[i].strip() != "-->":
                body.append(lines[i])
                i += 1
            if i == len(lines):
                raise AssertionError(f"{path}:{start}: docs-test setup comment is not closed")
            page.blocks.append((start + 1, "\n".join(body)))
            i += 1
            continue
        skip = _SKIP.search(line)
        if skip:
            skip_reason = skip.group("reason")
            i += 1
            continue
        fence = _FENCE.match(line)
        if fence:
            marker, indent = fence.group("fence"), fence.group("indent")
            lang = fence.group("lang").lower()
            start = i + 1
            i += 1
            body = []
            while i < len(lines) and not lines[i].strip().startswith(marker):
                body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
                i += 1
            i += 1
            if lang in ("python", "py"):
                if skip_reason is not None:
                    page.skipped.append((start, skip_reason))
                else:
                    page.blocks.append((start + 1, "\n".join(body)))
            skip_reason = None
            continue
        if line.strip():
            skip_reason = None  # a skip marker covers the very next block only
        i += 1
    return page


PARSED = [parse(p) for p in PAGES if p.exists()]
RUNNABLE = [p for p in PARSED if p.blocks]


def test_docs_have_examples() -> None:
    """The harness finds the examples (a broken parser must not pass silently)."""
    assert sum(len(p.blocks) for p in PARSED) >= 10, [str(p.path) for p in PARSED]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("page", RUNNABLE, ids=[str(p.path.relative_to(ROOT)) for p in RUNNABLE])
def test_page_examples_run(page: Page, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    redis_url = pg_url = None
    if page.uses_redis:
        redis_url = request.getfixturevalue("redis_url")
    if page.uses_postgres:
        pg_url = request.getfixturevalue("pg_url")
    script = tmp_path / (page.path.stem + "_examples.py")
    script.write_text(page.script(redis_url, pg_url), encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONDONTWRITEBYTECODE="1")
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=150,
    )
    if done.returncode != 0:
        numbered = "\n".join(
            f"{n:4} {text}" for n, text in enumerate(script.read_text().splitlines(), 1)
        )
        pytest.fail(
            f"examples of {page.path.relative_to(ROOT)} failed (exit {done.returncode})\n"
            f"--- stderr\n{done.stderr[-4000:]}\n--- stdout\n{done.stdout[-2000:]}\n"
            f"--- script\n{numbered}"
        )


def test_skips_carry_reasons() -> None:
    """Skipped examples are few and each says why."""
    skipped = [(p.path.name, line, why) for p in PARSED for line, why in p.skipped]
    for name, line, why in skipped:
        assert len(why) >= 10, f"{name}:{line}: say why the example is not run"
    runnable = sum(len(p.blocks) for p in PARSED)
    assert len(skipped) <= max(8, runnable // 4), skipped

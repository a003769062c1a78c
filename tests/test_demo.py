"""`python -m stampede demo`: runs, prints its tables, and stampede wins."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import pytest

from stampede import _demo

SMALL = [
    *("--callers", "30", "--workers", "4", "--duration", "0.8"),
    *("--origin-ms", "40", "--ttl", "0.3"),  # two expiries or so during the hot-key run
]


def rows(text: str, section: str) -> dict[str, list[str]]:
    part = text.split(section, 1)[1].split("\n## ", 1)[0]
    out = {}
    for line in part.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == len(_demo.HEADER) and cells[0] in _demo.STRATEGIES:
            out[cells[0]] = cells
    return out


def test_demo_prints_both_tables_and_stampede_loads_once() -> None:
    out = io.StringIO()
    assert _demo.main(SMALL, out=out) == 0
    text = out.getvalue()
    burst = rows(text, "## Burst")
    hot = rows(text, "## Hot key")
    assert set(burst) == set(hot) == set(_demo.STRATEGIES)
    calls = _demo.HEADER.index("origin calls")
    assert burst["stampede"][calls] == "1"
    assert burst["no cache"][calls] == "30"
    waited = _demo.HEADER.index("waited for origin")

    def number(row: list[str], column: int) -> int:
        return int(row[column].replace(",", ""))

    # The TTL cache makes its readers wait at every expiry; stampede refreshes
    # before (a loaded machine may still delay one refresh: no exact zero here).
    assert number(hot["TTL cache (cachetools)"], waited) >= 4
    assert number(hot["stampede"], waited) < number(hot["TTL cache (cachetools)"], waited)
    assert int(hot["no cache"][calls].replace(",", "")) > int(hot["stampede"][calls])


def test_module_entry_point_quick_run() -> None:
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    done = subprocess.run(
        [sys.executable, "-m", "stampede", "demo", "--quick", *SMALL],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert "## Burst" in done.stdout and "## Hot key" in done.stdout
    assert re.search(r"\[6/6\] hot key", done.stderr)  # progress goes to stderr


def test_help_and_bad_commands() -> None:
    assert _demo.cli(["--help"]) == 0
    assert _demo.cli([]) == 2
    assert _demo.cli(["nope"]) == 2
    with pytest.raises(SystemExit) as exc:
        _demo.main(["--help"])
    assert exc.value.code == 0
    with pytest.raises(SystemExit):
        _demo.main(["--ttl", "0"])


def test_plot_needs_matplotlib_or_draws(tmp_path: pytest.TempPathFactory) -> None:
    target = os.path.join(str(tmp_path), "calls.png")
    args = [*SMALL, "--plot", target]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(SystemExit, match="matplotlib"):
            _demo.main(args, out=io.StringIO())
    else:
        assert _demo.main(args, out=io.StringIO()) == 0
        assert os.path.getsize(target) > 1000


@pytest.mark.timeout(180)
def test_demo_across_processes_on_redis(redis_url: str) -> None:
    out = io.StringIO()
    # A 300 ms origin: both processes surely miss before either has loaded.
    args = [*SMALL, "--backend", redis_url, "--processes", "2", "--callers", "20"]
    args += ["--origin-ms", "300", "--duration", "0.5"]
    assert _demo.main(args, out=out) == 0
    text = out.getvalue()
    part = text.split("## Burst", 1)[1].split("\n## ", 1)[0]
    calls = _demo.HEADER.index("origin calls")
    found = {}
    for line in part.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == len(_demo.HEADER) and cells[0].startswith("stampede"):
            found[cells[0]] = int(cells[calls])
    assert found["stampede, distributed"] == 1  # one load for both processes
    assert found["stampede, per process"] == 2

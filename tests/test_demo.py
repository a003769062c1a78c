"""`python -m stampede demo`: runs, prints its tables, and says what they show.

The text under the tables is a pure function of the results (``burst_note``,
``summary``): fed crafted numbers here, it must claim only what they show.
"""

from __future__ import annotations

import io
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from stampede import _demo
from stampede._demo import NO_CACHE, TTL_CACHE, Result

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

    # The closing text repeats the numbers of the tables, whatever they were.
    closing = text.split("## What this run shows", 1)[1]
    for table, name in ((burst, "Burst"), (hot, "Hot key")):
        listed = "; ".join(f"{s} {table[s][calls]}" for s in _demo.STRATEGIES)
        assert f"Origin calls: {listed}." in closing, name
    listed = "; ".join(f"{s} {hot[s][waited]}" for s in _demo.STRATEGIES)
    assert f"Requests that waited for the origin: {listed}." in closing
    if number(hot["stampede"], waited) > 0:  # a loaded machine: no claim that nobody waited
        assert "no request waited" not in closing
    # The burst's note is there exactly when stampede's p99 is above no cache's.
    p99 = _demo.HEADER.index("p99 ms")
    ours, base = float(burst["stampede"][p99]), float(burst["no cache"][p99])
    if ours > base:
        assert "Why is stampede's p99 above no cache's" in text
    elif ours < base:
        assert "Why is stampede's p99" not in text


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
    assert "; 1 process;" in done.stderr and "process(es)" not in done.stderr
    assert "## What this run shows" in done.stdout


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


# -- the text under the tables, from crafted numbers ------------------------------


def result(
    strategy: str,
    calls: int,
    requests: int,
    waited: int = 0,
    p99_ms: float = 100.0,
    scenario: str = "burst",
) -> Result:
    latencies = [p99_ms / 1000] * requests
    return Result(scenario, strategy, calls, requests, latencies, waited, [])


def hot(strategy: str, calls: int, waited: int, requests: int = 5000) -> Result:
    return result(strategy, calls, requests, waited, 0.1, "hot key")


BURST_WON = [
    result(NO_CACHE, 100, 100),
    result(TTL_CACHE, 100, 100),
    result("stampede", 1, 100),
]


def test_summary_states_the_numbers_and_what_stampede_won() -> None:
    text = _demo.summary(
        BURST_WON,
        [hot(NO_CACHE, 150, 150, 150), hot(TTL_CACHE, 10, 10), hot("stampede", 2, 0)],
        expiries=3,
        latency=0.1,
    )
    assert "Burst: 100 callers missed one key at once." in text
    assert "Origin calls: no cache 100; TTL cache (cachetools) 100; stampede 1." in text
    assert "stampede made one origin call for all 100 callers." in text
    assert "The TTL cache let every caller call the origin" in text
    assert "the key expires about 3 times" in text
    assert "Origin calls: no cache 150; TTL cache (cachetools) 10; stampede 2." in text
    assert "waited for the origin: no cache 150; TTL cache (cachetools) 10; stampede 0." in text
    assert "stampede refreshed the key in the background before it expired (XFetch): " in text
    assert "no request waited for the origin, against 10 with the TTL cache." in text
    assert "It called the origin 2 times, the TTL cache 10 times." in text
    assert "(50.0 ms)" in text
    assert "lease" not in text  # one process: nothing to say about the fleet


def test_summary_claims_nothing_stampede_did_not_win() -> None:
    # What an unreachable store gave (issue 14): every run failed open.
    text = _demo.summary(
        [result(NO_CACHE, 100, 100), result(TTL_CACHE, 100, 100), result("stampede", 100, 100)],
        [hot(NO_CACHE, 150, 150, 150), hot(TTL_CACHE, 10, 10), hot("stampede", 15, 150, 150)],
        expiries=1,
        latency=0.1,
    )
    for claim in ("refreshed", "no request waited", "nobody waits", "one origin call for all"):
        assert claim not in text.lower(), claim
    assert "stampede saved no origin calls in this burst (100, against 100 with no cache)" in text
    assert "the key expires about once" in text
    assert (
        "stampede did not spare requests the wait at expiry in this run: 150 waited, "
        "against 10 with the TTL cache." in text
    )
    assert "It called the origin more often than the TTL cache (15 against 10)" in text


def test_summary_of_a_partial_win_says_so() -> None:
    text = _demo.summary(
        BURST_WON,
        [hot(NO_CACHE, 150, 150, 150), hot(TTL_CACHE, 10, 10), hot("stampede", 10, 3)],
        expiries=0,
        latency=0.1,
    )
    assert "the key does not expire during the run" in text
    assert "fewer requests wait for the origin than the TTL cache (3 against 10), but not none" in (
        text
    )
    assert "no request waited" not in text
    assert "It called the origin as often as the TTL cache (10)." in text


def test_summary_when_nobody_waited_anywhere() -> None:
    text = _demo.summary(
        BURST_WON,
        [hot(NO_CACHE, 150, 150, 150), hot(TTL_CACHE, 0, 0), hot("stampede", 0, 0)],
        expiries=0,
        latency=0.1,
    )
    assert "No request waited for the origin with stampede or the TTL cache." in text
    assert "refreshed" not in text


def test_summary_across_processes_compares_the_lease_with_per_process() -> None:
    burst = [
        result(NO_CACHE, 200, 200),
        result(TTL_CACHE, 200, 200),
        result("stampede, per process", 4, 200),
        result("stampede, distributed", 1, 200),
    ]
    hot_key = [
        hot(NO_CACHE, 300, 300, 300),
        hot(TTL_CACHE, 20, 20),
        hot("stampede, per process", 6, 0),
        hot("stampede, distributed", 6, 0),
    ]
    text = _demo.summary(burst, hot_key, expiries=5, latency=0.1, processes=4)
    assert "stampede, per process made 4 origin calls for 200 callers." in text
    assert "stampede, distributed made one origin call for all 200 callers." in text
    assert (
        "Across 4 processes, the lease in the store saved 3 origin calls in the burst "
        "(1 distributed, 4 per process)." in text
    )
    assert (
        "The lease in the store saved no origin calls on the hot key over coalescing in each "
        "process (6 distributed, 6 per process)." in text
    )


def test_burst_note_only_when_stampede_is_slower_than_no_cache() -> None:
    slower = [
        result(NO_CACHE, 200, 200, p99_ms=119.0),
        result(TTL_CACHE, 200, 200, p99_ms=121.0),
        result("stampede", 1, 200, p99_ms=155.0),
    ]
    note = _demo.burst_note(slower, 2)
    assert note is not None
    assert "above no cache's (119.0 ms)" in note and "stampede 155.0 ms" in note
    assert "on 2 CPU cores" in note
    assert "1 call (stampede) instead of 200" in note
    assert "on 1 CPU core " in (_demo.burst_note(slower, 1) or "")
    assert "this machine's CPU cores" in (_demo.burst_note(slower, None) or "")
    faster = [
        result(NO_CACHE, 200, 200, p99_ms=119.0),
        result(TTL_CACHE, 200, 200, p99_ms=121.0),  # the TTL cache's p99 is no concern here
        result("stampede", 1, 200, p99_ms=110.0),
    ]
    assert _demo.burst_note(faster, 2) is None


def test_plural() -> None:
    assert _demo.plural(1, "process", "processes") == "1 process"
    assert _demo.plural(4, "process", "processes") == "4 processes"
    assert _demo.plural(1, "caller") == "1 caller"
    assert _demo.plural(1200, "caller") == "1,200 callers"


# -- a store that cannot be used stops the demo before any scenario -----------------


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A loopback port held by this test and not listening: connecting is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def test_an_unreachable_redis_fails_fast_and_says_what_to_do(
    refused_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"redis://127.0.0.1:{refused_port}/0"
    out = io.StringIO()
    assert _demo.main([*SMALL, "--backend", url], out=out) == 1
    err = capsys.readouterr().err
    assert out.getvalue() == ""  # no table
    assert "[1/" not in err  # no scenario ran
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert f"cannot reach Redis at {url}" in lines[0]
    assert "Start a Redis server there" in lines[0]


def test_the_module_exits_non_zero_on_an_unreachable_redis(refused_port: int) -> None:
    url = f"redis://:secret@127.0.0.1:{refused_port}/0"
    done = subprocess.run(
        [sys.executable, "-m", "stampede", "demo", "--quick", "--backend", url],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    assert done.returncode == 1
    assert done.stdout == ""
    assert f"redis://:***@127.0.0.1:{refused_port}/0" in done.stderr
    assert "secret" not in done.stderr  # the password is not printed


def test_a_disk_folder_that_cannot_be_made_fails_fast(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    url = f"disk://{blocker}/cache"
    assert _demo.main([*SMALL, "--backend", url], out=io.StringIO()) == 1
    err = capsys.readouterr().err
    assert f"cannot use {url} as the demo's store" in err
    assert "[1/" not in err


def test_preflight_passes_for_stores_that_answer(redis_url: str, tmp_path: Path) -> None:
    assert _demo.preflight(redis_url) is None
    assert _demo.preflight(f"disk://{tmp_path}/cache") is None
    assert "unsupported backend URL" in (_demo.preflight("http://example.invalid/") or "")

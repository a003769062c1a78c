"""Smoke run of ``benchmarks/bench_fastapi.py``: it runs end to end and prints its tables.

The script, as a user runs it, in ``--quick`` mode on stampede's app alone
(cashews and aiocache are not in the test extra) with the shortest durations:
it starts its own private Redis and origin, and uvicorn with 4 workers twice.
Checked: the tables are printed, and the cold burst made exactly 1 origin call
(counted by the origin; stampede's fleet-wide single flight, which does not
depend on timing). No speed is asserted: the numbers are the script's business.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.redis_fixtures import server_binary_or_skip

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "bench_fastapi.py"

if not SCRIPT.is_file() or not (ROOT / "examples" / "service").is_dir():
    pytest.skip("benchmarks/ or examples/ is not here (an sdist)", allow_module_level=True)
for _module in ("fastapi", "uvicorn", "httpx"):
    pytest.importorskip(_module, reason=f"the benchmark needs {_module} (pip install -e '.[test]')")


@pytest.mark.timeout(120)
def test_quick_run_prints_the_tables_and_one_origin_call_per_cold_burst() -> None:
    server_binary_or_skip()  # the script finds the same binary the suite does
    args = ["--quick", "--only", "stampede", "--hot-s", "1", "--warm-s", "0.2"]
    args += ["--expiry-s", "1.5", "--bursts", "1", "--burst", "100"]
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    for heading in ("### Hot key", "### Cold bursts and expiry", "### Target"):
        assert heading in out, out
    hot = re.search(r"^\| stampede [^|]* \| ([\d,]+) \(", out, re.MULTILINE)  # req/s measured
    assert hot is not None, out
    burst = re.search(r"^\| 1 origin call per cold burst \| (\S+) \|", out, re.MULTILINE)
    assert burst is not None, out
    assert burst.group(1) == "1", out

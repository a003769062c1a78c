"""Freshness across processes whose wall clocks disagree (contract item 14).

A child process's ``time.time`` is skewed by an hour (tests/_skewed_clock.py);
stampede's clock, ``time.monotonic``, is not. On Redis, no reader compares
its clock with a writer's: the entry's remaining lifetime comes from Redis
(``PTTL``), so a skewed writer or reader sees an entry fresh for ``ttl``, then
stale. A diskcache folder serves the processes of one host, whose wall clock
they share: lifetimes there are on that clock by design (docs/distributed.md,
"Clocks"), so a writer whose wall clock is off moves them by as much.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ._skewed_clock import make_cache, watch

WORKER = Path(__file__).with_name("_skewed_clock.py")
ROOT = Path(__file__).parent.parent
TTL = 2.0
HOUR = 3600.0


class Skewed:
    """A child process with a skewed wall clock, spoken to line by line."""

    def __init__(self, skew: float, role: str, url: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), str(skew), role, url, str(TTL)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        its_time = float(self.line())
        assert abs(its_time - time.time() - skew) < 60, "the child's clock is not skewed"

    def line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            _, err = self.proc.communicate(timeout=30)
            raise AssertionError(f"the child ended early: {err}")
        return line.strip()

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=30)


@pytest.fixture
def children() -> Iterator[list[Skewed]]:
    started: list[Skewed] = []
    yield started
    for child in started:
        child.close()


def skewed_writer(
    children: list[Skewed], skew: float, url: str, limit: float = TTL + 10.0
) -> dict[str, Any]:
    """A child with a skewed clock stores "k"; this process (a true clock) watches it."""
    child = Skewed(skew, "write", url)
    children.append(child)
    assert child.line() == "written"
    return watch(make_cache(url, TTL), "k", limit)


def skewed_reader(children: list[Skewed], skew: float, url: str) -> dict[str, Any]:
    """This process stores "k"; a child with a skewed clock watches it."""
    child = Skewed(skew, "read", url)
    children.append(child)
    assert child.line() == "ready"
    make_cache(url, TTL).get_or_load("k", lambda: "from-true")
    child.send("go")
    seen: dict[str, Any] = json.loads(child.line())
    return seen


def assert_fresh_for_the_ttl(seen: dict[str, Any], value: str) -> None:
    assert seen["fresh_at_first"], "a fresh entry was not read as fresh"
    assert seen["fresh_for"] is not None, "fresh for far longer than its ttl"
    # The watch starts a pipe's round trip after the write: bounds of a second
    # each way stand for "fresh for ttl", against an error of an hour.
    assert TTL - 1.0 < seen["fresh_for"] < TTL + 1.0, seen
    assert seen["then"] == value  # then stale (served from the stale window), not gone


@pytest.mark.timeout(60)
@pytest.mark.parametrize("skew", [HOUR, -HOUR], ids=["ahead", "behind"])
def test_a_writer_with_a_skewed_wall_clock_moves_no_redis_freshness(
    children: list[Skewed], redis_url: str, skew: float
) -> None:
    assert_fresh_for_the_ttl(skewed_writer(children, skew, redis_url), "from-skewed")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("skew", [HOUR, -HOUR], ids=["ahead", "behind"])
def test_a_reader_with_a_skewed_wall_clock_sees_redis_freshness_as_it_is(
    children: list[Skewed], redis_url: str, skew: float
) -> None:
    assert_fresh_for_the_ttl(skewed_reader(children, skew, redis_url), "from-true")


@pytest.mark.timeout(60)
def test_processes_sharing_a_wall_clock_see_disk_freshness_as_it_is(
    children: list[Skewed], tmp_path: Path
) -> None:
    """The documented case on disk: the processes of one host share its wall clock."""
    folder = tmp_path / "c"
    folder.mkdir(mode=0o700)
    url = f"disk://{folder}"
    assert_fresh_for_the_ttl(skewed_writer(children, 0.0, url), "from-skewed")


@pytest.mark.timeout(60)
def test_disk_lifetimes_are_on_the_host_wall_clock(children: list[Skewed], tmp_path: Path) -> None:
    """What docs/distributed.md says of a wall clock step on diskcache: it shifts
    the remaining lifetime of every entry by the step. A writer an hour ahead
    leaves an entry that lives an hour longer; one an hour behind, an entry
    already gone. (One host's processes cannot disagree on its clock: this
    stands for a step of the host's clock between the write and the read.)"""
    folder = tmp_path / "c"
    folder.mkdir(mode=0o700)
    url = f"disk://{folder}"
    behind = skewed_writer(children, -HOUR, url)
    assert behind["fresh_at_first"] is False and behind["then"] is None  # expired already
    ahead = skewed_writer(children, HOUR, url, limit=TTL + 2.0)
    assert ahead["fresh_at_first"]
    assert ahead["fresh_for"] is None  # still fresh 2 s past its ttl

"""Helpers shared by the benchmark sections: config, formatting, counting, cleanup.

Not a script: ``bench_core.py`` puts this folder and the checkout on ``sys.path``
and imports the section modules (``_hit``, ``_cold``, ``_hot``), which import this.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

KEY = "bench-key"

# Callables to run when a section is done (temporary directories, open caches).
CLEANUP = contextlib.ExitStack()


class Unavailable(Exception):
    """A variant that cannot be measured here (not installed, not implemented yet)."""


@dataclasses.dataclass(frozen=True)
class Config:
    quick: bool
    rounds: int  # timed rounds over all hit rows; each row's minimum is reported
    repeat_s: float  # seconds one timed repeat of one row should last
    threads: int  # callers of the cold-key thread test
    tasks: int  # callers of the cold-key asyncio test
    thread_trials: int  # cold-key trials per variant (threads are noisy: more of them)
    task_trials: int
    cap_s: float  # wall-clock cap for all the trials of one asyncio variant
    join_s: float  # how long a thread trial may run before it counts as hung
    hot_s: float  # hot-key section: seconds each variant is read under load
    hot_workers: int  # hot-key section: threads (or tasks) reading the key
    think_s: float  # hot-key section: each worker's sleep between two reads

    @classmethod
    def make(cls, quick: bool, think_s: float = 0.001) -> Config:
        if quick:
            return cls(True, 3, 0.01, 200, 2_000, 1, 1, 5.0, 10.0, 1.2, 10, think_s)
        return cls(False, 7, 0.1, 1_000, 10_000, 5, 3, 10.0, 30.0, 5.0, 20, think_s)


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def reason(exc: BaseException) -> str:
    """Why a row could not be measured, for its note column."""
    if isinstance(exc, ModuleNotFoundError):
        return f"n/a (not installed: {exc.name})"
    if isinstance(exc, Unavailable):
        return str(exc)
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def ns(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e9:,.0f}"


def ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:+.1f}"


def ratio(value: float | None, reference: float | None) -> str:
    if value is None or not reference:
        return "n/a"
    return f"{value / reference:.2f}x"


def counting(fn: Callable[..., Any]) -> tuple[Callable[..., Any], list[int]]:
    """``fn`` wrapped to count its calls in the returned one-item list."""
    calls = [0]

    @functools.wraps(fn)
    def wrapper(*args: Any) -> Any:
        calls[0] += 1
        return fn(*args)

    return wrapper, calls


def acounting(fn: Callable[..., Awaitable[Any]]) -> tuple[Callable[..., Any], list[int]]:
    calls = [0]

    @functools.wraps(fn)
    async def wrapper(*args: Any) -> Any:
        calls[0] += 1
        return await fn(*args)

    return wrapper, calls


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending sequence."""
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


@contextlib.contextmanager
def disk_cache() -> Iterator[Any]:
    """A ``diskcache.Cache`` in a temporary directory, closed and removed on exit."""
    import diskcache

    with tempfile.TemporaryDirectory(prefix="stampede-bench-") as path:
        cache = diskcache.Cache(path)
        try:
            yield cache
        finally:
            cache.close()


@dataclasses.dataclass
class Target:
    """One row of the final table: a DESIGN.md target and what this run measured."""

    what: str
    target: str
    measured: str
    ok: bool | None  # None: not measured

    def row(self) -> list[str]:
        verdict = "n/a" if self.ok is None else "PASS" if self.ok else "MISS"
        return [self.what, self.target, self.measured, verdict]


def find(results: Sequence[Any], label: str) -> Any:
    return next(r for r in results if r.label == label)

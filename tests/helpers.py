"""Helpers shared by the tests: threads, forked children, a private diskcache store."""

from __future__ import annotations

import os
import signal
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import diskcache


def run_threads(n: int, target: Callable[[], Any]) -> list[threading.Thread]:
    threads = [threading.Thread(target=target, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    return threads


def join_all(threads: list[threading.Thread], deadline: float = 10.0) -> None:
    for t in threads:
        t.join(deadline)
        assert not t.is_alive(), "a caller hung"


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Start ``fn`` on a daemon thread; the list gets its result or its exception."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def wait_child(pid: int, deadline: float, hung: str) -> int:
    """The exit code of the forked child ``pid``; kill it and fail with ``hung``
    if it has not exited within ``deadline`` seconds."""
    end = time.monotonic() + deadline
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > end:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(hung)
        time.sleep(0.01)


def disk_store(tmp_path: Path) -> diskcache.Cache:
    """A diskcache store in a fresh owner-only folder (stampede refuses looser ones)."""
    folder = tmp_path / "c"
    folder.mkdir(mode=0o700)
    return diskcache.Cache(str(folder))


def fork() -> int:
    """``os.fork()`` while other threads run, without Python 3.12's warning about it
    (the tests that fork check what a child may do then)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return os.fork()

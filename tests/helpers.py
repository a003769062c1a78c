"""Helpers shared by the tests: threads, and a private diskcache store."""

from __future__ import annotations

import threading
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


def disk_store(tmp_path: Path) -> diskcache.Cache:
    """A diskcache store in a fresh owner-only folder (stampede refuses looser ones)."""
    folder = tmp_path / "c"
    folder.mkdir(mode=0o700)
    return diskcache.Cache(str(folder))

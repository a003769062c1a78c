"""Thread helpers shared by the tests."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


def run_threads(n: int, target: Callable[[], Any]) -> list[threading.Thread]:
    threads = [threading.Thread(target=target, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    return threads


def join_all(threads: list[threading.Thread], deadline: float = 10.0) -> None:
    for t in threads:
        t.join(deadline)
        assert not t.is_alive(), "a caller hung"

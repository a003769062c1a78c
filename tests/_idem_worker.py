"""A process for tests/test_idempotency.py (run as a script).

argv: store (a redis or postgresql URL, or a disk folder), key, callers, workdir, lease_ttl, mode

Modes:
- ``fleet``: once ``go`` exists in workdir, ``callers`` threads call ``do(key)``;
  the work appends a line to ``runs`` in workdir, then waits for ``release``.
  Prints one JSON line: the values the callers got and how many replayed.
- ``owner``: one call whose work writes ``running-<pid>`` with its fence, then
  waits for ``release`` (the test kills or stops this process meanwhile); the
  work's value is its fence. Prints the JSON line when it ends.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import stampede
import stampede.idempotency


def wait_for(path: Path, deadline: float = 60.0) -> None:
    end = time.monotonic() + deadline
    while not path.exists():
        if time.monotonic() > end:
            raise SystemExit(f"gave up waiting for {path}")
        time.sleep(0.002)


def store_of(where: str) -> Any:
    if where.startswith("postgresql://"):
        return where  # the store makes its own pool
    if where.startswith("redis://"):
        import redis

        return redis.Redis.from_url(where)
    import diskcache

    return diskcache.Cache(where)


def main() -> None:
    where, key, callers, workdir, lease_ttl, mode = sys.argv[1:7]
    work = Path(workdir)
    idem = stampede.Idempotency(store_of(where), lease_ttl=float(lease_ttl), wait_timeout=60)
    got: list[Any] = []
    lock = threading.Lock()

    def run() -> Any:
        claim = stampede.idempotency.current()
        assert claim is not None
        with lock, open(work / "runs", "a") as runs:
            runs.write(f"{os.getpid()} {claim.fence}\n")
        if mode == "owner":
            (work / f"running-{os.getpid()}").write_text(str(claim.fence))
        wait_for(work / "release")
        return {"pid": os.getpid(), "fence": claim.fence}

    def call() -> None:
        value, replayed = idem.do(key, run, fingerprint="same")
        with lock:
            got.append((value, replayed))

    (work / f"ready-{os.getpid()}").touch()
    if mode == "fleet":
        wait_for(work / "go")
    threads = [threading.Thread(target=call) for _ in range(int(callers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    stats = idem.stats()
    print(
        json.dumps(
            {
                "values": [value for value, _ in got],
                "replayed": sum(1 for _, replayed in got if replayed),
                "fenced": stats.fenced,
                "takeovers": stats.takeovers,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()

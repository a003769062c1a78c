"""distributed=True: one load per key across real processes, on Redis and diskcache.

Each process is tests/_distributed_worker.py; files in a temporary folder
coordinate the test and the processes (ready, go, loads, release), and the
loads are counted as files, where every process and the test see them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import diskcache
import pytest
import redis

from stampede import CoalescingCache
from stampede.testing import wait_until

WORKER = Path(__file__).with_name("_distributed_worker.py")
ROOT = Path(__file__).parent.parent


class Fleet:
    """Worker processes sharing one store, and the files they coordinate with."""

    def __init__(self, kind: str, where: str, work: Path) -> None:
        self.kind, self.where, self.work = kind, where, work
        for sub in ("ready", "loads"):
            (work / sub).mkdir()
        self.procs: list[subprocess.Popen[str]] = []

    def start(
        self, threads: int = 1, lease_ttl: float = 10.0, key: str = "k", tasks: bool = False
    ) -> Any:
        proc = subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                self.kind,
                self.where,
                key,
                str(threads),
                str(self.work),
                str(lease_ttl),
                *(["async"] if tasks else []),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        self.procs.append(proc)
        return proc

    def ready(self, n: int) -> None:
        wait_until(lambda: len(list((self.work / "ready").iterdir())) >= n, deadline=60)

    def go(self) -> None:
        (self.work / "go").touch()

    def release(self) -> None:
        (self.work / "release").touch()

    def loads(self) -> list[str]:
        return sorted(p.name for p in (self.work / "loads").iterdir())

    def result(self, proc: subprocess.Popen[str]) -> dict[str, Any]:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=10)


@pytest.fixture(params=["redis", "disk"])
def fleet(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Fleet]:
    if request.param == "redis":
        where = request.getfixturevalue("redis_url")
    else:
        folder = tmp_path / "store"
        folder.mkdir(mode=0o700)
        where = str(folder)
    work = tmp_path / "work"
    work.mkdir()
    f = Fleet(request.param, where, work)
    yield f
    f.close()


def store_cache(fleet: Fleet) -> CoalescingCache[str]:
    if fleet.kind == "redis":
        backend: Any = redis.Redis.from_url(fleet.where)
    else:
        backend = diskcache.Cache(fleet.where)
    return CoalescingCache(backend, ttl=60, distributed=True)


def lease_keys(fleet: Fleet) -> list[str]:
    if fleet.kind == "redis":
        return [k.decode() for k in redis.Redis.from_url(fleet.where).keys("*:lease")]
    with diskcache.Cache(fleet.where) as c:
        return [k for k in c.iterkeys() if isinstance(k, str) and k.endswith(":lease")]


@pytest.mark.timeout(120)
def test_cold_key_many_processes_and_threads_load_once(fleet: Fleet) -> None:
    procs = [fleet.start(threads=25) for _ in range(8)]
    fleet.ready(8)
    fleet.go()
    wait_until(lambda: len(fleet.loads()) >= 1, deadline=30)
    fleet.release()
    results = [fleet.result(p) for p in procs]
    assert len(fleet.loads()) == 1
    values = {v for r in results for v in r["values"]}
    assert len(values) == 1  # every caller of every process got the leader's value
    assert sum(r["calls"] for r in results) == 200
    assert sum(r["loads"] for r in results) == 1
    assert lease_keys(fleet) == []


@pytest.mark.timeout(120)
def test_cold_key_many_processes_of_tasks_load_once(fleet: Fleet) -> None:
    procs = [fleet.start(threads=200, tasks=True) for _ in range(8)]
    fleet.ready(8)
    fleet.go()
    wait_until(lambda: len(fleet.loads()) >= 1, deadline=30)
    fleet.release()
    results = [fleet.result(p) for p in procs]
    assert len(fleet.loads()) == 1
    assert len({v for r in results for v in r["values"]}) == 1
    assert sum(r["calls"] for r in results) == 1600
    assert lease_keys(fleet) == []


@pytest.mark.timeout(120)
def test_async_killed_leader_is_taken_over(fleet: Fleet) -> None:
    leader = fleet.start(lease_ttl=1.0, tasks=True)
    fleet.ready(1)
    fleet.go()
    wait_until(lambda: len(fleet.loads()) == 1, deadline=30)
    waiter = fleet.start(lease_ttl=1.0, tasks=True)
    fleet.ready(2)
    leader.send_signal(signal.SIGKILL)
    leader.wait(10)
    wait_until(lambda: len(fleet.loads()) == 2, deadline=30)
    fleet.release()
    result = fleet.result(waiter)
    assert result["values"] == [f"value-from-{result['pid']}"]
    assert result["lease_takeovers"] == 1
    assert lease_keys(fleet) == []


@pytest.mark.timeout(120)
def test_killed_leader_is_taken_over_within_the_lease(fleet: Fleet) -> None:
    leader = fleet.start(lease_ttl=1.0)
    fleet.ready(1)
    fleet.go()
    wait_until(lambda: len(fleet.loads()) == 1, deadline=30)  # it holds the lease, loading
    waiter = fleet.start(lease_ttl=1.0)
    fleet.ready(2)
    leader.send_signal(signal.SIGKILL)
    leader.wait(10)
    killed = time.monotonic()
    wait_until(lambda: len(fleet.loads()) == 2, deadline=30)  # the waiter took over
    assert time.monotonic() - killed < 1.0 + 4.0  # about lease_ttl, plus a poll (and slack)
    fleet.release()
    result = fleet.result(waiter)
    assert result["values"] == [f"value-from-{result['pid']}"]
    assert result["lease_takeovers"] == 1 and result["lease_waits"] == 1
    assert lease_keys(fleet) == []


@pytest.mark.timeout(120)
def test_a_paused_leader_past_its_lease_cannot_write(fleet: Fleet) -> None:
    old = fleet.start(lease_ttl=0.5)
    fleet.ready(1)
    fleet.go()
    wait_until(lambda: len(fleet.loads()) == 1, deadline=30)
    old.send_signal(signal.SIGSTOP)  # paused while loading, renewer included
    try:
        new = fleet.start(lease_ttl=0.5)
        fleet.ready(2)
        wait_until(lambda: len(fleet.loads()) == 2, deadline=30)  # took over
        fleet.release()
        newer = fleet.result(new)
    finally:
        old.send_signal(signal.SIGCONT)
    stale = fleet.result(old)
    assert stale["values"] == [f"value-from-{stale['pid']}"]  # its own callers get its value
    assert stale["fenced"] == 1  # ... but the store refused its write
    assert store_cache(fleet).get("k") == f"value-from-{newer['pid']}"
    assert lease_keys(fleet) == []


@pytest.mark.timeout(120)
def test_a_load_longer_than_the_lease_keeps_it(fleet: Fleet) -> None:
    leader = fleet.start(lease_ttl=1.0)
    fleet.ready(1)
    fleet.go()
    wait_until(lambda: len(fleet.loads()) == 1, deadline=30)
    waiter = fleet.start(lease_ttl=1.0)
    fleet.ready(2)
    time.sleep(3.0)  # the scenario itself: three lease lifetimes while the load runs
    assert len(fleet.loads()) == 1  # renewed: nobody took over
    fleet.release()
    first, second = fleet.result(leader), fleet.result(waiter)
    assert first["values"] == second["values"] and len(fleet.loads()) == 1


@pytest.mark.timeout(120)
def test_invalidate_fences_a_load_in_another_process(fleet: Fleet) -> None:
    leader = fleet.start()
    fleet.ready(1)
    fleet.go()
    wait_until(lambda: len(fleet.loads()) == 1, deadline=30)
    here = store_cache(fleet)
    here.invalidate("k")
    fleet.release()
    result = fleet.result(leader)
    assert result["values"] == [f"value-from-{result['pid']}"] and result["fenced"] == 1
    assert here.get("k") is None  # its write was refused
    assert here.get_or_load("k", lambda: "fresh") == "fresh"


def test_distributed_needs_a_shared_store() -> None:
    with pytest.raises(ValueError, match="shared between processes"):
        CoalescingCache({}, distributed=True)


@pytest.mark.parametrize("kind", ["redis", "disk"])
def test_one_background_refresh_for_the_fleet(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Two caches with their own single-flights (as two processes would have) on one
    store: both see the value stale, both start a refresh, one lease lets one load."""
    from stampede.testing import FakeClock, Gate

    if kind == "redis":
        store: Any = redis.Redis.from_url(request.getfixturevalue("redis_url"))
    else:
        folder = tmp_path / "s"
        folder.mkdir(mode=0o700)
        store = diskcache.Cache(str(folder))
    clock = FakeClock()  # one clock: both read the entry's write time as it is
    options: dict[str, Any] = dict(ttl=1, stale_ttl=100, beta=0, distributed=True, clock=clock)
    a: CoalescingCache[str] = CoalescingCache(store, **options)
    b: CoalescingCache[str] = CoalescingCache(store, **options)
    a.get_or_load("k", lambda: "old")
    clock.advance(2)
    gate = Gate("new")
    assert a.get_or_load("k", gate) == "old"  # stale: a's refresh takes the lease
    assert gate.entered.wait(10)
    assert b.get_or_load("k", gate) == "old"  # stale: b's refresh finds the lease taken
    wait_until(lambda: len(b._flight) == 0, deadline=10)  # b gave up at once
    gate.open()
    wait_until(lambda: a.stats().loads == 2, deadline=10)
    assert gate.calls == 1
    assert b.get("k") == "new"


def test_redis_killed_mid_flight_in_distributed_mode(fresh_redis_server: Any) -> None:
    """The leader holds the lease and loads; Redis dies: callers still get the value
    (failing open), and the cache works again once Redis is back."""
    import threading

    from stampede.testing import Gate

    from .helpers import join_all, run_threads

    client = redis.Redis.from_url(
        fresh_redis_server.url, socket_timeout=0.5, socket_connect_timeout=0.5, retry=None
    )
    cache: CoalescingCache[str] = CoalescingCache(client, ttl=60, distributed=True)
    gate = Gate("v")
    got: list[str] = []
    lock = threading.Lock()

    def caller() -> None:
        value = cache.get_or_load("k", gate)
        with lock:
            got.append(value)

    threads = run_threads(10, caller)
    wait_until(lambda: cache.stats().coalesced == 9)
    fresh_redis_server.kill()
    gate.open()
    join_all(threads)
    assert got == ["v"] * 10 and gate.calls == 1
    fresh_redis_server.restart()
    wait_until(
        lambda: cache.get_or_load("j", lambda: "back") == "back" and cache.get("j") == "back",
        deadline=15,
    )

"""distributed=True: one load per key across real processes, on Redis and diskcache.

Each process is tests/_distributed_worker.py; files in a temporary folder
coordinate the test and the processes (ready, go, loads, release), and the
loads are counted as files, where every process and the test see them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import diskcache
import pytest
import redis
import redis.asyncio

from stampede import AsyncCoalescingCache, CoalescingCache, LoadTimeout
from stampede.testing import FakeClock, Gate, wait_until

from .helpers import fork, in_thread, join_all, wait_child

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
    return lease_keys_in(fleet.kind, fleet.where)


def lease_keys_in(kind: str, where: str) -> list[str]:
    """The lease keys left in a Redis (URL) or diskcache (folder) store."""
    if kind == "redis":
        keys = redis.Redis.from_url(where).keys("*:lease")
        return [k.decode() if isinstance(k, bytes) else k for k in keys]
    with diskcache.Cache(where) as c:
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


def test_distributed_on_a_fanout_cache_says_why_it_is_refused(tmp_path: Path) -> None:
    """distributed=True on a FanoutCache is refused, and the error names the FanoutCache.

    Regression test for 2ed77b3 (distributed=True on a FanoutCache: say it cannot hold
    leases).
    """
    fanout = diskcache.FanoutCache(str(tmp_path / "fan"), shards=2)
    try:
        with pytest.raises(ValueError, match="FanoutCache"):
            CoalescingCache(fanout, distributed=True)
        with pytest.raises(ValueError, match="this process only"):
            CoalescingCache({}, distributed=True)
    finally:
        fanout.close()


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


@pytest.mark.timeout(30)
def test_a_refresh_run_by_another_process_is_not_retried_on_every_read(
    redis_url: str, redis_client: redis.Redis
) -> None:
    """A refresh running in another process is not retried on every read, nor counted here.

    Past its refresh point, every read of a key in a process that does not hold
    the refresh lease tried the lease again (an extra EVALSHA per read) and counted
    an early refresh it did not run. Now a process that found the refresh running
    elsewhere leaves it alone for a moment, and only the refreshing process counts it.

    Regression test for 1180e36 (distributed: a process that finds a key's refresh running
    in another process leaves it alone for a poll interval).
    """
    clock = FakeClock()
    options: dict[str, Any] = dict(ttl=1, stale_ttl=30, distributed=True, clock=clock)
    a: CoalescingCache[str] = CoalescingCache(redis_url, **options)
    b: CoalescingCache[str] = CoalescingCache(redis_url, **options)

    def first() -> str:
        clock.advance(0.3)  # the load time XFetch scales by
        return "v1"

    assert a.get_or_load("k", first) == "v1"
    clock.advance(0.95)  # past any refresh point (>= half the ttl), before expiry
    gate = Gate("v2")
    assert a.get_or_load("k", gate) == "v1"  # starts a's background refresh
    assert gate.entered.wait(10)  # a holds the refresh lease

    def evalsha_calls() -> int:
        stats: Any = redis_client.info("commandstats")
        return int(stats["cmdstat_evalsha"]["calls"])

    before = evalsha_calls()
    never = Gate("never loaded by b")
    for _ in range(30):
        assert b.get_or_load("k", never) == "v1"
        wait_until(lambda: len(b._flight) == 0)  # b's refresh attempt, if any, is over
    # One look at the lease (a read is GETRANGE + PTTL, no script; a's renewer may
    # add a renewal or two). Retrying the lease on every read would make it 30 more.
    assert evalsha_calls() - before <= 3
    assert never.calls == 0
    gate.open()
    wait_until(lambda: len(a._flight) == 0)
    assert (a.stats().early_refreshes, b.stats().early_refreshes) == (1, 0)
    assert b.get_or_load("k", never) == "v2"


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


# -- two caches on one store, as two processes would have ------------------------------


def _store_for(kind: str, redis_url: str, tmp_path: Path) -> Any:
    return redis_url if kind == "redis" else f"disk://{tmp_path / 'shared'}"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["redis", "disk"])
def test_distributed_set_is_not_overwritten_by_a_load_committing_meanwhile(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """A distributed set() is not overwritten by another process's load committing meanwhile.

    set() with distributed=True wrote the value, then broke the lease in a second
    step: a leader in another process committing in between overwrote the value
    just set. Now the write and the break are one atomic step. Two caches stand
    for two processes; the other leader's commit is let through at the worst moment.

    Regression test for b7f45dc (distributed set(): the value is written and the lease
    broken in one atomic step).
    """
    url = request.getfixturevalue("redis_url") if kind == "redis" else ""
    where = _store_for(kind, url, tmp_path)
    a: CoalescingCache[str] = CoalescingCache(where, ttl=60, distributed=True)
    b: CoalescingCache[str] = CoalescingCache(where, ttl=60, distributed=True)
    gate = Gate("loaded-before-set")
    leader = threading.Thread(target=a.get_or_load, args=("k", gate))
    leader.start()
    assert gate.entered.wait(10)
    store: Any = b.backend
    original = store._lease_break_raw

    def break_after_the_other_commit(*args: Any) -> None:
        gate.open()
        leader.join(10)  # a's commit lands before b's lease break runs
        original(*args)

    store._lease_break_raw = break_after_the_other_commit
    b.set("k", "set-by-b")
    assert not leader.is_alive()
    assert b.get("k") == "set-by-b"
    assert a.get("k") == "set-by-b"


@pytest.mark.timeout(30)
def test_async_distributed_set_is_not_overwritten_by_a_load_committing_meanwhile(
    redis_url: str,
) -> None:
    """The async distributed set() is not overwritten by a load committing meanwhile.

    Regression test for b7f45dc (distributed set(): the value is written and the lease
    broken in one atomic step).
    """

    async def main() -> None:
        a: AsyncCoalescingCache[str] = AsyncCoalescingCache(redis_url, ttl=60, distributed=True)
        b: AsyncCoalescingCache[str] = AsyncCoalescingCache(redis_url, ttl=60, distributed=True)
        opened = asyncio.Event()
        entered = asyncio.Event()

        async def load() -> str:
            entered.set()
            await opened.wait()
            return "loaded-before-set"

        leader = asyncio.create_task(a.get_or_load("k", load))
        await asyncio.wait_for(entered.wait(), 10)
        store: Any = b.backend
        original = store._alease_break_raw

        async def break_after_the_other_commit(*args: Any) -> None:
            opened.set()
            await asyncio.wait_for(leader, 10)
            await original(*args)

        store._alease_break_raw = break_after_the_other_commit
        await b.set("k", "set-by-b")
        assert await b.get("k") == "set-by-b"
        assert await a.get("k") == "set-by-b"

    asyncio.run(main())


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["redis", "disk"])
@pytest.mark.parametrize("problem", ["too large", "not serializable"])
def test_distributed_value_that_cannot_be_stored_is_counted_and_frees_the_lease(
    kind: str, problem: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """A value that cannot be stored is counted, and its lease is freed for the next process.

    With distributed=True, a value over max_value_size was dropped silently (not
    counted, not logged), and one the serializer refused left the lease held until
    it expired: the next process waited lease_ttl before loading.

    Regression test for bc5d468 (distributed: a value that cannot be stored frees the
    lease and is counted and logged).
    """
    from stampede.backends.disk import DiskBackend
    from stampede.backends.redis import RedisBackend

    url = request.getfixturevalue("redis_url") if kind == "redis" else ""
    folder = tmp_path / "shared"

    def store() -> Any:
        if kind == "redis":
            return RedisBackend(redis.Redis.from_url(url), max_value_size=1000)
        return DiskBackend(str(folder), max_value_size=1000)

    a: CoalescingCache[Any] = CoalescingCache(store(), ttl=60, distributed=True, lease_ttl=30)
    b: CoalescingCache[Any] = CoalescingCache(store(), ttl=60, distributed=True, lease_ttl=30)
    value: Any = "x" * 5000 if problem == "too large" else object()
    assert a.get_or_load("k", lambda: value) is value  # the callers still get it
    assert a.stats().serialization_errors == 1
    # The lease is free: b loads at once instead of waiting out lease_ttl (30 s,
    # past this test's timeout).
    assert b.get_or_load("k", lambda: "b's value") == "b's value"
    assert b.stats().lease_waits == 0


@pytest.mark.timeout(30)
def test_async_distributed_value_that_cannot_be_stored_frees_the_lease(redis_url: str) -> None:
    """The async cache frees the lease of a value that cannot be stored, and counts it.

    Regression test for bc5d468 (distributed: a value that cannot be stored frees the
    lease and is counted and logged).
    """
    from stampede.backends.redis import AsyncRedisBackend

    async def main() -> None:
        def cache() -> AsyncCoalescingCache[Any]:
            store = AsyncRedisBackend(redis.asyncio.Redis.from_url(redis_url))
            return AsyncCoalescingCache(store, ttl=60, distributed=True, lease_ttl=30)

        a, b = cache(), cache()
        value = object()
        assert await a.get_or_load("k", lambda: value) is value
        assert a.stats().serialization_errors == 1
        assert await b.get_or_load("k", lambda: "b's value") == "b's value"
        assert b.stats().lease_waits == 0

    asyncio.run(main())


# -- Redis restarted while a lease is held and waited for ---------------------------------


class _Heard(threading.Event):
    """An event that counts how often it was set (by lease-done messages)."""

    def __init__(self) -> None:
        super().__init__()
        self.times = 0

    def set(self) -> None:
        self.times += 1
        super().set()


def _restart_waiter(url: str, work: Path, wait_timeout: float) -> None:
    """Process B of the restart test (a forked child): wait on "k" across the
    restart, then on a later lease of "k"; files in ``work`` pace it with the test."""
    from stampede.backends.redis import _notifier_for

    def step(name: str) -> None:
        (work / name).touch()

    def wait_for(name: str) -> None:
        wait_until(lambda: (work / name).exists(), deadline=30)

    cache: CoalescingCache[str] = CoalescingCache(
        url, ttl=60, distributed=True, lease_ttl=30, wait_timeout=wait_timeout
    )
    first, got = in_thread(lambda: cache.get_or_load("k", lambda: "from-B"))
    wait_until(lambda: cache.stats().lease_waits == 1, deadline=20)
    step("b-waiting")
    first.join(60)
    assert not first.is_alive(), "B hung across the restart"
    (work / "b-got").write_text(repr(got))
    step("b-done")  # after b-got is written: the test reads it then
    # Pub/sub again: the listener subscribes anew, and lease-done messages reach B.
    store: Any = cache.backend  # a Redis store
    notifier = _notifier_for(store.client)
    heard = _Heard()
    ready = notifier.register(str(cache._key("k")), heard)  # its namespace's channel
    wait_until(ready.is_set, deadline=20)
    step("b-listening")
    wait_until(lambda: heard.times >= 1, deadline=20)  # the test's invalidate of "k"
    wait_for("held")  # the test process leads "k" now
    second, again = in_thread(lambda: cache.get_or_load("k", lambda: "from-B-again"))
    wait_until(lambda: cache.stats().lease_waits == 2, deadline=20)
    before = heard.times
    step("b-waiting-again")
    wait_until(lambda: heard.times > before, deadline=20)  # the holder's commit
    second.join(30)
    assert again == ["from-holder"], again  # woken, and nothing loaded here
    assert cache.stats().loads == 1


@pytest.mark.timeout(120)
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_redis_restart_with_a_lease_held_and_waited_for_hangs_no_one(
    fresh_redis_server: Any, tmp_path: Path
) -> None:
    """Process A holds the lease of "k" and loads; process B waits for it; Redis is
    restarted (empty, same port). B does not hang: the lease is gone, so B loads
    itself (takeover, or failing open if it looked while Redis was down), within
    wait_timeout plus a margin. A's commit afterwards finds no lease of its own and
    is refused: the store holds B's value or nothing, never A's, and no lease. B's
    pub/sub wake-ups work again: a later lease of "k" wakes B when it ends."""
    url = fresh_redis_server.url
    work = tmp_path / "work"
    work.mkdir()
    wait_timeout = 5.0
    fleet = Fleet("redis", url, work)
    try:
        a = fleet.start(lease_ttl=30.0)
        fleet.ready(1)
        fleet.go()
        wait_until(lambda: len(fleet.loads()) == 1, deadline=30)  # A holds the lease
        pid = fork()  # with threads running
        if pid == 0:  # process B
            code = 1
            try:
                _restart_waiter(url, work, wait_timeout)
                code = 0
            finally:
                os._exit(code)
        try:
            wait_until(lambda: (work / "b-waiting").exists(), deadline=30)
            fresh_redis_server.restart()
            restarted = time.monotonic()
            wait_until(lambda: (work / "b-done").exists(), deadline=wait_timeout + 30)
            assert time.monotonic() - restarted < wait_timeout + 5.0, "B waited too long"
            assert (work / "b-got").read_text() == "['from-B']"  # B loaded itself
            fleet.release()
            stale = fleet.result(a)
            assert stale["values"] == [f"value-from-{stale['pid']}"]  # A's callers got it
            assert stale["fenced"] == 1  # ... but its write was refused
            here: CoalescingCache[str] = CoalescingCache(url, ttl=60, distributed=True)
            assert here.get("k") in ("from-B", None)
            assert lease_keys_in("redis", url) == []
            # A later lease of "k", held by this process, with B waiting for it.
            wait_until(lambda: (work / "b-listening").exists(), deadline=30)
            here.invalidate("k")
            gate = Gate("from-holder")
            holder, out = in_thread(lambda: here.get_or_load("k", gate))
            assert gate.entered.wait(10)
            (work / "held").touch()
            wait_until(lambda: (work / "b-waiting-again").exists(), deadline=30)
            gate.open()
            join_all([holder])
            assert out == ["from-holder"]
            assert wait_child(pid, 30, "B hung waiting for the later lease") == 0
        finally:
            fleet.release()
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG) == (0, 0):
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
    finally:
        fleet.close()


# -- fork ----------------------------------------------------------------------------------


@pytest.mark.timeout(90)
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("kind", ["redis", "disk"])
def test_a_child_forked_during_a_leased_load_waits_for_the_parents_lease(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """A thread of the parent holds the fleet's lease of "k" and loads (blocked) when
    the process forks. The child's single-flight starts empty (the leader thread does
    not exist there), and the lease is in the store: the child is one more process of
    the fleet. It waits for the lease at most wait_timeout (LoadTimeout), loads another
    key at once, and a patient caller is woken by the parent's commit and gets the
    parent's value without loading. The parent's flight completes and stores."""
    url = request.getfixturevalue("redis_url") if kind == "redis" else ""
    where = _store_for(kind, url, tmp_path)
    # lease_ttl 60: the parent's renewer (every 20 s) never writes during the fork.
    options: dict[str, Any] = dict(ttl=60, distributed=True, lease_ttl=60)
    patient: CoalescingCache[str] = CoalescingCache(where, wait_timeout=30, **options)
    hasty: CoalescingCache[str] = CoalescingCache(where, wait_timeout=0.5, **options)
    gate = Gate("parent")
    leader, out = in_thread(lambda: patient.get_or_load("k", gate))
    assert gate.entered.wait(10)  # the parent holds the lease of "k", loading
    waiting, signal_waiting = os.pipe()
    pid = fork()  # with threads running
    if pid == 0:  # the child
        code = 1
        try:
            os.close(waiting)
            started = time.monotonic()
            with pytest.raises(LoadTimeout):
                hasty.get_or_load("k", lambda: "child")
            code = 2
            assert time.monotonic() - started < 0.5 + 5.0  # wait_timeout, and slack
            assert hasty.stats().lease_waits == 1 and hasty.stats().loads == 0
            code = 3
            assert hasty.get_or_load("other", lambda: "child-other") == "child-other"
            code = 4
            caller, got = in_thread(lambda: patient.get_or_load("k", lambda: "child"))
            wait_until(lambda: patient.stats().lease_waits == 1)
            os.write(signal_waiting, b"w")  # the parent may commit now
            caller.join(30)
            code = 5
            assert got == ["parent"], got  # woken by the parent's commit
            assert patient.stats().loads == 0 and patient.stats().backend_errors == 0
            code = 0
        finally:
            os._exit(code)
    os.close(signal_waiting)
    try:
        ready, _, _ = select.select([waiting], [], [], 30)
        assert ready, "the child did not start waiting for the parent's lease"
        gate.open()
        code = wait_child(pid, 30, "the child hung waiting for its parent's lease")
    finally:
        gate.open()
        os.close(waiting)
    join_all([leader])
    assert code == 0
    assert out == ["parent"] and gate.calls == 1
    assert patient.get("k") == "parent" and patient.get("other") == "child-other"
    assert patient.stats().fenced == 0 and patient.stats().backend_errors == 0
    assert lease_keys_in(kind, where if kind == "redis" else str(tmp_path / "shared")) == []


# -- the Redis pub/sub listener ------------------------------------------------------------


@pytest.mark.timeout(20)
def test_first_lease_wait_ends_on_the_subscription_not_the_poll(redis_url: str) -> None:
    """A first lease wait ends once the pub/sub subscription is confirmed, not at the poll.

    A process's first lease wait began before its pub/sub subscription was
    confirmed: a commit in that window woke no one and the waiter slept out the
    poll interval. Now a wait before the subscription returns once subscribed
    (the caller looks again), and later waits end on the commit's message.
    The waits below get 60 s timeouts: without the fix they would hang the test.

    Regression test for 9cc322b (Lease waits before the pub/sub subscription is confirmed
    end when it is).
    """
    from stampede.backends.redis import RedisBackend, namespace_channel

    store = RedisBackend(redis.Redis.from_url(redis_url))
    publisher = redis.Redis.from_url(redis_url)
    with store.lease_listen("k") as wake:  # not a cache's key: the empty namespace's channel
        wake.wait(60)  # returns when subscribed
    with store.lease_listen("k") as wake:
        publisher.publish(namespace_channel(""), "k")
        wake.wait(60)  # returns on the message
    publisher.close()


@pytest.mark.timeout(20)
def test_first_async_lease_wait_ends_on_the_subscription_not_the_poll(redis_url: str) -> None:
    """A first async lease wait ends once subscribed, and later ones on the commit's message.

    Regression test for 9cc322b (Lease waits before the pub/sub subscription is confirmed
    end when it is).
    """
    from stampede.backends.redis import AsyncRedisBackend, namespace_channel

    async def main() -> None:
        store = AsyncRedisBackend(redis.asyncio.Redis.from_url(redis_url))
        publisher = redis.asyncio.Redis.from_url(redis_url)
        async with store.alease_listen("k") as wake:
            await wake.wait(60)
        async with store.alease_listen("k") as wake:
            await publisher.publish(namespace_channel(""), "k")
            await wake.wait(60)
        await publisher.aclose()
        await store.client.aclose()

    asyncio.run(main())


@pytest.mark.timeout(30)
def test_lease_listener_thread_ends_with_its_client_and_at_exit(redis_url: str) -> None:
    """The sync pub/sub listener thread ends with its client, and at interpreter exit.

    The sync pub/sub listener held its client for ever and never stopped: one
    thread per client for the life of the process, reconnecting every 0.5 s once
    the server was gone, and frozen at interpreter exit, maybe holding the pool's
    lock (a deadlock in the pool's finalizers, seen on Python 3.13). It now holds
    the client weakly, ends with it, and is stopped by an atexit hook.

    Regression test for 6393671 (Python 3.10 and 3.13: ...; the sync listener holds its
    client weakly, closes its pub/sub, ends with the client and is stopped at exit).
    """
    import gc

    from stampede.backends import redis as redis_backend

    def listening_thread() -> tuple[threading.Thread, Any]:
        client = redis.Redis.from_url(redis_url)
        store = redis_backend.RedisBackend(client)
        with store.lease_listen("k") as wake:
            wake.wait(10)  # returns once subscribed
        notifier = redis_backend._notifier_for(client)
        assert notifier._thread.is_alive()
        return notifier._thread, client

    thread, client = listening_thread()
    del client
    gc.collect()
    thread.join(10)
    assert not thread.is_alive()

    thread, client = listening_thread()
    redis_backend._stop_listeners()  # what the atexit hook runs
    assert not thread.is_alive()
    client.close()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["redis", "disk"])
def test_a_planted_lease_without_an_expiry_is_replaced_not_waited_for(
    kind: str, redis_url: str, tmp_path: Path
) -> None:
    """stampede's leases always expire; one without an expiry was planted (or left by
    something else) and, before, held its key forever: with ``wait_timeout=None``
    every caller waited for good. Acquiring now replaces it: the caller leads."""
    from stampede.backends._shared import lease_key

    from .helpers import disk_store

    store: Any = redis.Redis.from_url(redis_url) if kind == "redis" else disk_store(tmp_path)
    cache: CoalescingCache[str] = CoalescingCache(
        store, ttl=60, distributed=True, wait_timeout=None
    )
    lease = lease_key(cache._key("k"))
    store.set(lease, "not-a-token")  # no PX, no expire: kept forever
    assert cache.get_or_load("k", lambda: "loaded") == "loaded"
    s = cache.stats()
    assert (s.loads, s.lease_waits) == (1, 0)
    assert cache.get("k") == "loaded"
    if kind == "redis":
        assert store.exists(lease) == 0  # the commit freed the lease it took
    else:
        assert lease not in store

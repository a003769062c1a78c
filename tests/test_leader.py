"""The leader's work under distributed=True, unit-tested on an in-memory lease store.

Two caches on one ``DictLeaseStore`` stand for two processes on one Redis:
each has its own single-flight, they share values and leases, and a commit
wakes the other's waiters. The store passes the same lease conformance suite
as Redis and diskcache (tests/test_leases.py), so what holds here is the
engine's doing (stampede/_async/engine.py and its generated sync twin), not a
server's. Real processes and real servers are in tests/test_distributed.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from stampede import (
    AsyncCoalescingCache,
    BackendUnavailable,
    CoalescingCache,
    LoadTimeout,
)
from stampede._entry import value_entry
from stampede._leader import Step, look
from stampede.testing import AsyncGate, FakeClock, Gate, wait_until
from tests.helpers import in_thread
from tests.support.fake_leases import DictLeaseStore

pytestmark = pytest.mark.timeout(30)


def fleet(store: DictLeaseStore, n: int = 2, **options: Any) -> list[CoalescingCache[Any]]:
    """``n`` caches on one store: ``n`` processes, as far as the engine can tell."""
    options.setdefault("ttl", 60)
    return [CoalescingCache(store, distributed=True, **options) for _ in range(n)]


def test_two_processes_load_a_missing_key_once() -> None:
    store = DictLeaseStore()
    a, b = fleet(store)
    gate = Gate("v1")
    leader, led = in_thread(lambda: a.get_or_load("k", gate))
    assert gate.entered.wait(10)
    waiter, waited = in_thread(lambda: b.get_or_load("k", gate))
    wait_until(lambda: b.stats().lease_waits == 1, what="b waits for a's lease")
    gate.open()
    leader.join(10)
    waiter.join(10)
    assert (led, waited, gate.calls) == (["v1"], ["v1"], 1)
    assert (a.stats().loads, b.stats().loads, b.stats().lease_takeovers) == (1, 0, 0)


def test_a_leader_that_lost_its_lease_cannot_overwrite_the_newer_value() -> None:
    store = DictLeaseStore()
    a, b = fleet(store)
    slow = Gate("old")
    leader, led = in_thread(lambda: a.get_or_load("k", slow))
    assert slow.entered.wait(10)
    k = a._key("k")
    assert isinstance(k, str)
    store.lease_break(k, drop_value=False)  # its lease expired while it was paused
    assert b.get_or_load("k", lambda: "new") == "new"
    slow.open()
    leader.join(10)
    assert led == ["old"]  # its callers still get its value ...
    assert b.get("k") == "new" and a.get("k") == "new"  # ... the store does not
    assert a.stats().fenced == 1


def test_a_lease_whose_holder_died_is_taken_over() -> None:
    store = DictLeaseStore()
    (a,) = fleet(store, 1, lease_ttl=0.4)
    k = a._key("k")
    assert isinstance(k, str)
    assert store.lease_acquire(k, "a-dead-process", 0.4)[0]
    assert a.get_or_load("k", lambda: "v") == "v"
    s = a.stats()
    assert (s.lease_waits, s.lease_takeovers, s.loads) == (1, 1, 1)


def test_wait_timeout_bounds_a_lease_wait_and_starts_no_load() -> None:
    store = DictLeaseStore()
    (a,) = fleet(store, 1, wait_timeout=0.3)
    k = a._key("k")
    assert isinstance(k, str)
    store.lease_acquire(k, "a-slow-process", 30)
    calls: list[int] = []
    with pytest.raises(LoadTimeout):
        a.get_or_load("k", lambda: calls.append(1))
    assert calls == []


def test_a_store_down_at_lease_time_fails_open_or_raises() -> None:
    store = DictLeaseStore(failure_threshold=100)
    (a,) = fleet(store, 1)
    store.down = True
    assert a.get_or_load("k", lambda: "local") == "local"  # this process's single-flight only
    assert a.stats().backend_errors >= 2  # the read and the lease
    (strict,) = fleet(store, 1, on_backend_error="raise")
    with pytest.raises(BackendUnavailable):
        strict.get_or_load("k", lambda: "never")


def test_a_refresh_another_process_runs_is_left_to_it_for_a_moment() -> None:
    store = DictLeaseStore()
    clock = FakeClock()
    (a,) = fleet(store, 1, ttl=10, stale_ttl=100, beta=0, clock=clock)
    a.set("k", "old")
    clock.advance(11)  # stale: a read serves it and refreshes in the background
    k = a._key("k")
    assert isinstance(k, str)
    store.lease_acquire(k, "another-process", 30)
    calls: list[int] = []
    assert a.get_or_load("k", lambda: calls.append(1)) == "old"
    wait_until(lambda: len(a._flight) == 0, what="the background refresh ended")
    attempts = store.calls["lease_acquire"]
    for _ in range(5):  # within the pause: served, no lease attempt on every read
        assert a.get_or_load("k", lambda: calls.append(1)) == "old"
    assert store.calls["lease_acquire"] == attempts
    assert calls == [] and a.stats().early_refreshes == 0


def test_a_value_that_cannot_be_stored_frees_the_lease() -> None:
    store = DictLeaseStore()
    a, b = fleet(store)
    odd = object()
    assert a.get_or_load("k", lambda: odd) is odd  # returned, not stored
    assert a.stats().serialization_errors == 1
    k = a._key("k")
    assert isinstance(k, str)
    assert store.holder(k) is None  # nobody else waits for it to expire
    assert b.get_or_load("k", lambda: "fine") == "fine"


def test_an_invalidate_during_the_load_fences_it_for_the_fleet() -> None:
    store = DictLeaseStore()
    a, b = fleet(store)
    gate = Gate("loaded")
    leader, led = in_thread(lambda: a.get_or_load("k", gate))
    assert gate.entered.wait(10)
    b.invalidate("k")  # another process
    gate.open()
    leader.join(10)
    assert led == ["loaded"]
    assert a.get("k") is None and a.stats().fenced == 1


def test_async_processes_load_once() -> None:
    async def main() -> tuple[list[Any], int]:
        store = DictLeaseStore()
        a, b = (AsyncCoalescingCache(store, distributed=True, ttl=60) for _ in range(2))
        gate = AsyncGate("v")
        first = asyncio.ensure_future(a.get_or_load("k", gate))
        await asyncio.wait_for(gate.entered.wait(), 10)
        rest = [asyncio.ensure_future(c.get_or_load("k", gate)) for c in (a, b) for _ in range(5)]
        while b.stats().lease_waits < 1:
            await asyncio.sleep(0.001)
        gate.open()
        return await asyncio.wait_for(asyncio.gather(first, *rest), 10), gate.calls

    values, calls = asyncio.run(main())
    assert values == ["v"] * 11 and calls == 1


# -- the decision after a lease attempt (pure) -----------------------------------------


def test_look_decides_from_the_lease_and_the_entries() -> None:
    clock = FakeClock()
    cache = CoalescingCache(DictLeaseStore(), distributed=True, ttl=10, clock=clock)
    host = cache._host
    fresh = value_entry("new", clock(), 10, 0, 0, 0, 1.0)
    old = value_entry("old", clock() - 20, 10, 100, 0, 0, 1.0)  # stale, still servable
    kw: dict[str, Any] = {"force": False, "background": False}
    assert look(host, "k", False, fresh, old, **kw)[:2] == (Step.ANSWER, fresh)
    assert look(host, "k", True, None, None, **kw)[0] is Step.LEAD
    assert look(host, "k", False, None, None, **kw)[0] is Step.WAIT
    assert look(host, "k", False, old, old, force=False, background=True)[0] is Step.SKIP
    assert host.elsewhere.active("k")  # noted: leave it to the other process a moment
    # refresh() (force): whatever is stored, lead or wait
    assert look(host, "j", True, fresh, None, force=True, background=False)[0] is Step.LEAD

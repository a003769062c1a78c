"""A conformance suite for stores that hold leases (``distributed=True``), ours or yours.

``distributed=True`` asks five things of a shared store (the ``LeaseStore``
protocol of ``stampede/_async/engine.py``): take a key's lease with a token
and read the value in the same step; renew, commit and free it only with
that token; break it whoever holds it; let it expire by itself; wake a
listener when it ends. Each test below checks one of them on a new store,
through the store's own operations, with real time bounded by deadlines
(leases expire on the store's clock, which a test cannot move).

Usage, in your own tests::

    from stampede.testing.leases import LeaseStoreConformance

    class TestMyStoreLeases(LeaseStoreConformance):
        def make_store(self):
            return MyStore(...)          # a SharedStore with supports_leases = True

``make_store`` is called once per test; the store's ``close()`` (or its
client's), if any, is the subclass's to call in a fixture of its own.
"""

from __future__ import annotations

import importlib.util
import threading
import time
from collections.abc import Callable
from typing import Any, ClassVar

import pytest

from .. import CoalescingCache, SerializationError
from .._entry import Entry, value_entry
from ..backends import SharedStore

__all__ = ["LeaseStoreConformance"]

DEADLINE = 10.0  # seconds any single wait of a test may take before it fails
TIMEOUT = 60  # seconds a whole test may take (pytest-timeout)
LEASE = 10.0  # seconds a lease lives when a test does not wait for it to expire

_MARKS = [pytest.mark.timeout(TIMEOUT)] if importlib.util.find_spec("pytest_timeout") else []


def _until(condition: Callable[[], bool], what: str, poll: float = 0.02) -> float:
    """Poll ``condition`` until true (or fail after ``DEADLINE``); the seconds it took."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > DEADLINE:
            raise AssertionError(f"{what}: not within {DEADLINE} s")
        time.sleep(poll)
    return time.monotonic() - start


class LeaseStoreConformance:
    """Subclass it (as ``Test...``) and implement ``make_store``; see the module docstring."""

    pytestmark: ClassVar[list[pytest.MarkDecorator]] = _MARKS

    def make_store(self) -> SharedStore:
        """A new, empty shared store whose ``supports_leases`` is true."""
        raise NotImplementedError("subclasses of LeaseStoreConformance implement make_store")

    @pytest.fixture
    def cache(self) -> CoalescingCache[Any]:
        """A distributed cache on the store: its ``backend`` is the store bound to it."""
        store = self.make_store()
        assert store.supports_leases, f"{store!r} does not hold leases"
        return CoalescingCache(store, distributed=True, ttl=60.0, namespace="lease-conformance")

    # -- helpers ------------------------------------------------------------------

    @staticmethod
    def bound(cache: CoalescingCache[Any]) -> SharedStore:
        store = cache.backend
        assert isinstance(store, SharedStore)
        return store

    @staticmethod
    def key(cache: CoalescingCache[Any], name: str) -> str:
        k = cache._key(name)
        assert isinstance(k, str)
        return k

    @staticmethod
    def entry(value: Any) -> Entry[Any]:
        return value_entry(value, time.monotonic(), 60.0, 0.0, 0.0, 0.0, 1.0)

    def read(self, cache: CoalescingCache[Any], k: str) -> Any:
        entry = self.bound(cache).get(k)
        return None if entry is None else entry.value

    # -- one holder, the token rules ---------------------------------------------------

    def test_one_holder_at_a_time(self, cache: CoalescingCache[Any]) -> None:
        store, k = self.bound(cache), self.key(cache, "one")
        assert store.lease_acquire(k, "t1", LEASE)[0] is True
        assert store.lease_acquire(k, "t2", LEASE)[0] is False
        assert store.lease_acquire(k, "t1", LEASE)[0] is False  # not re-entrant either
        other = self.key(cache, "other")
        assert store.lease_acquire(other, "t2", LEASE)[0] is True  # keys are independent

    def test_taking_the_lease_reads_the_value_in_the_same_step(
        self, cache: CoalescingCache[Any]
    ) -> None:
        store, k = self.bound(cache), self.key(cache, "read")
        taken, data, remaining = store.lease_acquire(k, "t0", LEASE)
        assert (taken, data) == (True, None)
        assert store.lease_commit(k, "t0", self.entry("v")) is True
        taken, data, remaining = store.lease_acquire(k, "t1", LEASE)
        assert taken is True and data is not None and remaining is not None
        assert 0 < remaining <= 60.0 + 1
        decoded = store.decode(k, data, remaining)
        assert decoded is not None and decoded.value == "v"

    def test_commit_with_the_token_writes_and_frees(self, cache: CoalescingCache[Any]) -> None:
        store, k = self.bound(cache), self.key(cache, "commit")
        store.lease_acquire(k, "t1", LEASE)
        assert store.lease_commit(k, "t1", self.entry("v1")) is True
        assert self.read(cache, k) == "v1"
        assert store.lease_acquire(k, "t2", LEASE)[0] is True

    def test_commit_without_the_token_is_refused(self, cache: CoalescingCache[Any]) -> None:
        store, k = self.bound(cache), self.key(cache, "refused")
        store.lease_acquire(k, "t1", LEASE)
        assert store.lease_commit(k, "t2", self.entry("stale")) is False
        assert self.read(cache, k) is None  # nothing written
        assert store.lease_acquire(k, "t3", LEASE)[0] is False  # t1 still holds it
        assert store.lease_commit(k, "t1", self.entry("v")) is True

    def test_committing_nothing_frees_the_lease_and_keeps_the_value(
        self, cache: CoalescingCache[Any]
    ) -> None:
        store, k = self.bound(cache), self.key(cache, "nothing")
        store.lease_acquire(k, "t0", LEASE)
        store.lease_commit(k, "t0", self.entry("kept"))
        store.lease_acquire(k, "t1", LEASE)
        assert store.lease_commit(k, "t1", None) is True
        assert self.read(cache, k) == "kept"
        assert store.lease_acquire(k, "t2", LEASE)[0] is True

    def test_renewal_needs_the_token(self, cache: CoalescingCache[Any]) -> None:
        store, k = self.bound(cache), self.key(cache, "renew")
        assert store.lease_renew(k, "t1", LEASE) is False  # nobody holds it
        store.lease_acquire(k, "t1", LEASE)
        assert store.lease_renew(k, "t1", LEASE) is True
        assert store.lease_renew(k, "t2", LEASE) is False

    def test_a_break_frees_whoever_holds_and_drops_or_writes(
        self, cache: CoalescingCache[Any]
    ) -> None:
        store, k = self.bound(cache), self.key(cache, "break")
        store.lease_acquire(k, "t0", LEASE)
        store.lease_commit(k, "t0", self.entry("old"))
        store.lease_acquire(k, "t1", LEASE)
        store.lease_break(k, drop_value=True)
        assert self.read(cache, k) is None
        assert store.lease_commit(k, "t1", self.entry("late")) is False  # fenced
        assert self.read(cache, k) is None
        assert store.lease_acquire(k, "t2", LEASE)[0] is True
        store.lease_break(k, False, self.entry("set"))  # set(): write and break in one step
        assert self.read(cache, k) == "set"
        assert store.lease_commit(k, "t2", self.entry("late")) is False
        assert self.read(cache, k) == "set"

    def test_an_entry_that_cannot_be_stored_still_frees_the_lease(
        self, cache: CoalescingCache[Any]
    ) -> None:
        store, k = self.bound(cache), self.key(cache, "unstorable")
        store.lease_acquire(k, "t1", LEASE)
        with pytest.raises(SerializationError):
            store.lease_commit(k, "t1", self.entry(object()))  # no serializer takes it
        assert self.read(cache, k) is None
        assert store.lease_acquire(k, "t2", LEASE)[0] is True  # others need not wait it out

    # -- time ----------------------------------------------------------------------------

    def test_a_lease_expires_by_itself(self, cache: CoalescingCache[Any]) -> None:
        store, k = self.bound(cache), self.key(cache, "expires")
        assert store.lease_acquire(k, "dead", 0.2)[0] is True
        assert store.lease_acquire(k, "t1", LEASE)[0] is False
        _until(lambda: store.lease_acquire(k, "t1", LEASE)[0], "the abandoned lease expired")
        assert store.lease_renew(k, "dead", LEASE) is False  # its holder lost it
        assert store.lease_commit(k, "dead", self.entry("late")) is False

    def test_renewal_keeps_a_lease_past_its_ttl(self, cache: CoalescingCache[Any]) -> None:
        store, k = self.bound(cache), self.key(cache, "renewed")
        ttl = 1.0
        store.lease_acquire(k, "t1", ttl)
        end = time.monotonic() + 2.5 * ttl
        while time.monotonic() < end:
            assert store.lease_renew(k, "t1", ttl) is True
            assert store.lease_acquire(k, "t2", ttl)[0] is False
            time.sleep(ttl / 5)  # renewing well within the ttl, as the leader's renewer does
        assert store.lease_commit(k, "t1", self.entry("v")) is True

    # -- wake-ups --------------------------------------------------------------------------

    def test_the_end_of_a_lease_ends_a_listener_wait(self, cache: CoalescingCache[Any]) -> None:
        """A listener registered before the lease ends returns from ``wait`` long
        before its timeout (woken, or after the store's bounded poll)."""
        store, k = self.bound(cache), self.key(cache, "wake")
        store.lease_acquire(k, "t1", LEASE)
        listening = threading.Event()
        waited: list[float] = []

        def listen() -> None:
            with store.lease_listen(k) as wake:
                listening.set()
                start = time.monotonic()
                while not store.lease_acquire(k, "t2", LEASE)[0]:
                    wake.wait(DEADLINE)
                    if time.monotonic() - start > DEADLINE:
                        break
                waited.append(time.monotonic() - start)

        thread = threading.Thread(target=listen, daemon=True)
        thread.start()
        assert listening.wait(DEADLINE)
        store.lease_commit(k, "t1", self.entry("v"))
        thread.join(DEADLINE + 1)
        assert waited, "the listener did not return"
        assert waited[0] < DEADLINE / 2, f"woken only after {waited[0]:.2f} s"

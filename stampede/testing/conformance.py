"""A conformance suite for cache backends, ours or yours: subclass it, pytest runs it.

Each test checks, through the public ``CoalescingCache`` API on a new backend,
a promise of DESIGN.md: exact round trips, miss -> one load -> hit, expiry and
stale serving on a ``FakeClock``, negative entries seen by a second cache, get /
set / invalidate, namespaces, fencing, 50 threads -> one load; for byte stores
(disk, Redis, your ``SharedStore``) also damaged entries, unserializable values,
other clock domains and the store's own expiry. Loaders are gated, quiet points
polled with a deadline, never slept for; each test has a hard timeout
(``pytest.mark.timeout``, when pytest-timeout is installed).

Usage, in your own tests::

    import diskcache, pytest
    from stampede.testing.conformance import BackendConformance

    class TestMyDisk(BackendConformance):
        @pytest.fixture(autouse=True)
        def _folder(self, tmp_path):
            self.folder = tmp_path / "cache"
            self.folder.mkdir(mode=0o700)

        def make_backend(self):
            return diskcache.Cache(str(self.folder))

``make_backend`` returns anything ``CoalescingCache`` accepts (a mapping, a
client, a store object). It is called once per test, every cache of the test
shares the result, and its ``close()``, if it has one, is called afterwards.
Optional hooks: ``make_cache`` (add the options your store needs),
``round_trip_values`` (with another serializer than the default), and, for
byte stores, ``read_raw`` / ``damage``, which read and write an entry's raw
bytes (default: the store's own ``_get_raw`` / ``_set_raw``; override ``damage``
to write with your own client instead).
"""

from __future__ import annotations

import datetime
import decimal
import importlib.util
import random
import threading
import time
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import pytest

from .. import CoalescingCache
from ..backends import SharedStore, resolve
from . import FakeClock, Gate, wait_until

__all__ = ["BackendConformance", "NotFound"]

DEADLINE = 10.0  # seconds any single wait of a test may take before it fails
TIMEOUT = 60  # seconds a whole test may take (pytest-timeout)
_ABSENT = object()


class NotFound(LookupError):
    """The error the suite negative-caches (importable, so byte stores can rebuild it)."""


def _never() -> Any:
    raise AssertionError("the loader ran, but the value should have come from the store")


def _same(a: Any, b: Any) -> bool:
    """Equal, with the same types all the way down (and -0.0, nan, Decimal exponents kept)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict):
        return len(a) == len(b) and _same(list(a.items()), list(b.items()))
    if isinstance(a, (set, frozenset)):
        return sorted(map(repr, a)) == sorted(map(repr, b))
    return repr(a) == repr(b)


def _spawn(n: int, fn: Callable[[], Any]) -> Callable[[], list[Any]]:
    """Start ``n`` threads calling ``fn``; the returned ``join()`` gives their results."""
    results: list[Any] = []
    lock = threading.Lock()

    def run() -> None:
        try:
            result = fn()
        except BaseException as exc:  # for the test's assertion, not lost in the thread
            result = exc
        with lock:
            results.append(result)

    threads = [threading.Thread(target=run, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()

    def join() -> list[Any]:
        for t in threads:
            t.join(DEADLINE)
            assert not t.is_alive(), "a caller hung"
        return results

    return join


def _shared(backend: Any) -> SharedStore:
    store = resolve(backend)
    assert isinstance(store, SharedStore)
    return store


def _byte_store(cache: CoalescingCache[Any]) -> SharedStore:
    """The cache's store if it keeps bytes; skip the test otherwise."""
    store = cache.backend
    if not isinstance(store, SharedStore):
        pytest.skip("a check for byte stores; this store keeps Python objects")
    return store


def _store_key(cache: CoalescingCache[Any], key: str) -> str:
    made = _byte_store(cache).key_maker(cache.namespace)(key)
    assert isinstance(made, str)
    return made


_MARKS = [pytest.mark.timeout(TIMEOUT)] if importlib.util.find_spec("pytest_timeout") else []


class BackendConformance:
    """Subclass it (as ``Test...``) and implement ``make_backend``; see the module docstring."""

    pytestmark: ClassVar[list[pytest.MarkDecorator]] = _MARKS

    # -- what a subclass supplies ------------------------------------------------

    def make_backend(self) -> Any:
        """A new, empty backend (a mapping, client, store or URL) with room for 20+ entries."""
        raise NotImplementedError("subclasses of BackendConformance implement make_backend")

    def make_cache(self, backend: Any, **options: Any) -> CoalescingCache[Any]:
        """A cache on ``backend`` (ttl 60 s unless given); override to add options."""
        options.setdefault("ttl", 60.0)
        return CoalescingCache(backend, **options)

    def round_trip_values(self) -> dict[str, Any]:
        """Values that must come back equal and of the same types (the default serializer's)."""
        utc = datetime.timezone.utc
        return {
            "none": None,
            "nested": {"a": [1, (2.5, "x", None)], 3: {"s": {1, 2}, "f": frozenset({"y"})}},
            "bytes": b"\x00\xff raw",
            "big ints": [2**200 + 1, -(3**150), 0, True, False],
            "floats": [0.1, -0.0, float("inf"), float("nan")],
            "text": "päß 🐍 \ud800",
            "odd keys": {(1, "t"): 1, 1.5: 2, None: 3, b"k": 4, frozenset({1}): 5},
            "datetime": datetime.datetime(2024, 2, 29, 23, 59, 59, 999999, tzinfo=utc),
            "date, delta": (datetime.date(2000, 1, 1), datetime.timedelta(-1, microseconds=5)),
            "decimal and uuid": (decimal.Decimal("-1.50E+3"), uuid.UUID(int=7)),
            "empties": [[], (), {}, "", b"", set(), frozenset()],
        }

    def read_raw(self, backend: Any, key: str) -> bytes | None:
        """The raw bytes stored under the store key ``key``, None if none (byte stores)."""
        data = _shared(backend)._get_raw(key)[0]
        assert not isinstance(data, int), f"{data:,} bytes under {key!r}: over max_value_size"
        return data

    def damage(self, backend: Any, key: str, data: bytes) -> None:
        """Write ``data`` as the raw bytes under the store key ``key``, for 60 s."""
        _shared(backend)._set_raw(key, data, 60.0)

    @pytest.fixture
    def backend(self) -> Iterator[Any]:
        made = self.make_backend()
        yield made
        close = getattr(made, "close", None)
        if callable(close):
            close()

    # -- values --------------------------------------------------------------------

    def test_round_trip_miss_then_one_load_then_hit(self, backend: Any) -> None:
        cache = self.make_cache(backend)
        reader = self.make_cache(backend)  # a second cache: what the store really kept
        values = self.round_trip_values()
        for name, value in values.items():
            load = Gate(value, opened=True)
            assert _same(cache.get_or_load(name, load), value), name
            assert _same(cache.get_or_load(name, load), value), name
            assert load.calls == 1, name
            assert _same(reader.get(name, _ABSENT), value), name
        n = len(values)
        s = cache.stats()
        assert (s.misses, s.loads, s.hits, s.serialization_errors) == (n, n, n, 0)

    # -- time ----------------------------------------------------------------------

    def test_fresh_for_ttl_then_loaded_again(self, backend: Any) -> None:
        clock = FakeClock()
        cache = self.make_cache(backend, ttl=10, beta=0, clock=clock)
        assert cache.get_or_load("k", lambda: 1) == 1
        clock.advance(9.5)
        assert cache.get_or_load("k", _never) == 1
        clock.advance(0.5)
        assert cache.get_or_load("k", lambda: 2) == 2
        assert cache.get("k") == 2

    def test_stale_served_while_one_refresh_runs(self, backend: Any) -> None:
        clock = FakeClock()
        cache = self.make_cache(backend, ttl=1, stale_ttl=10, beta=0, clock=clock)
        cache.get_or_load("k", lambda: "v1")
        clock.advance(5)
        gate = Gate("v2")
        assert cache.get_or_load("k", gate) == "v1"  # stale: served, a refresh starts
        assert gate.entered.wait(DEADLINE)
        assert cache.get_or_load("k", gate) == "v1"  # still stale; no second refresh
        gate.open()
        wait_until(lambda: cache.stats().loads == 2, DEADLINE, "the background refresh")
        assert cache.get_or_load("k", _never) == "v2" and gate.calls == 1
        assert cache.stats().stale_served == 2
        clock.advance(11)  # past ttl + stale_ttl: nothing left to serve
        assert cache.get("k") is None
        assert cache.get_or_load("k", lambda: "v3") == "v3"

    def test_stale_served_when_the_refresh_fails(self, backend: Any) -> None:
        clock = FakeClock()
        cache = self.make_cache(backend, ttl=1, stale_ttl=10, beta=0, error_ttl=3, clock=clock)
        cache.get_or_load("k", lambda: "v1")
        clock.advance(2)
        failing: Gate[str] = Gate(error=ConnectionError("origin down"), opened=True)
        assert cache.get_or_load("k", failing) == "v1"
        wait_until(lambda: cache.stats().load_errors == 1, DEADLINE, "the failed refresh")
        assert cache.get_or_load("k", failing) == "v1"  # backing off for error_ttl
        assert failing.calls == 1

    @pytest.mark.parametrize("clocks", ["fake/fake", "fake/monotonic", "monotonic/fake"])
    def test_another_clock_domain_sees_a_fresh_value_fresh(self, backend: Any, clocks: str) -> None:
        def clock(name: str, start: float) -> Callable[[], float]:
            return FakeClock(start) if name == "fake" else time.monotonic

        writer_clock, reader_clock = clocks.split("/")
        writer = self.make_cache(backend, clock=clock(writer_clock, 1e6))
        _byte_store(writer)  # in process memory, entries live on their writer's clock
        reader = self.make_cache(backend, clock=clock(reader_clock, 3.0))
        writer.set("k", "v")
        assert writer.get_or_load("v", lambda: "loaded") == "loaded"
        assert reader.get_or_load("k", _never) == "v"
        assert reader.get_or_load("v", _never) == "loaded"
        s = reader.stats()
        assert (s.hits, s.misses, s.stale_served) == (2, 0, 0)

    def test_the_store_ages_and_drops_entries_in_real_time(self, backend: Any) -> None:
        writer = self.make_cache(backend, ttl=0.2, stale_ttl=60, beta=0)
        dropped = self.make_cache(backend, ttl=0.2, beta=0, namespace="drop")
        key = _store_key(dropped, "k")
        reader = self.make_cache(backend, clock=FakeClock())  # its clock never moves
        gone = self.make_cache(backend, clock=FakeClock(), namespace="drop")
        writer.set("k", "v")
        dropped.set("k", "v")
        assert (reader.get("k"), gone.get("k")) == ("v", "v")
        # Only the time left that the store reports can age an entry for these readers.
        wait_until(lambda: reader.get("k") == "v" and reader.stats().stale_served > 0)
        wait_until(lambda: gone.get("k") is None, DEADLINE, "the entry to expire")
        wait_until(lambda: self.read_raw(backend, key) is None, DEADLINE, "the store to drop it")

    # -- errors --------------------------------------------------------------------

    def test_negative_entry_raised_again_by_a_second_cache(self, backend: Any) -> None:
        clock = FakeClock()
        options: dict[str, Any] = {"cache_errors": (NotFound,), "error_ttl": 30, "beta": 0}
        writer = self.make_cache(backend, clock=clock, **options)
        # A byte store's reader may be on another clock; objects in memory are on the writer's.
        other = FakeClock(50.0) if isinstance(writer.backend, SharedStore) else clock
        reader = self.make_cache(backend, clock=other, **options)

        def fail() -> str:
            raise NotFound("user", 7)

        with pytest.raises(NotFound):
            writer.get_or_load("k", fail)
        for cache in (writer, reader):
            with pytest.raises(NotFound) as caught:
                cache.get_or_load("k", _never)
            assert type(caught.value) is NotFound and caught.value.args == ("user", 7)
            assert cache.get("k", "default") == "default"  # get never raises cached errors
        assert reader.stats().negative_hits == 1
        # error_ttl later on the writer's clock (a reader on another clock counts the
        # store's own time left instead), the loader runs again; the reader sees its value.
        clock.advance(30)
        assert writer.get_or_load("k", lambda: "found") == "found"
        assert reader.get_or_load("k", _never) == "found"

    # -- get, set, invalidate, namespaces --------------------------------------------

    def test_get_set_invalidate(self, backend: Any) -> None:
        clock = FakeClock()
        cache = self.make_cache(backend, ttl=10, clock=clock)
        assert cache.get("k", "default") == "default"
        cache.set("k", "manual")
        assert cache.get("k") == "manual"
        assert cache.get_or_load("k", _never) == "manual"
        cache.set("short", 1, ttl=1)
        clock.advance(1)
        assert cache.get("short") is None and cache.get("k") == "manual"
        cache.set("k", "replaced")
        assert self.make_cache(backend, clock=clock).get("k") == "replaced"
        cache.invalidate("k")
        assert cache.get("k") is None
        assert cache.get_or_load("k", lambda: "loaded") == "loaded"
        cache.invalidate("never set")

    def test_namespaces_keep_apart(self, backend: Any) -> None:
        # Equal lengths and a glob character: a prefix match or a SCAN pattern would mix them.
        a = self.make_cache(backend, namespace="tenant-?")
        b = self.make_cache(backend, namespace="tenant-1")
        plain = self.make_cache(backend)
        a.set("k", "A")
        b.set("k", "B")
        plain.set("k", "plain")
        assert (a.get("k"), b.get("k"), plain.get("k")) == ("A", "B", "plain")
        a.invalidate("k")
        assert (a.get("k"), b.get("k"), plain.get("k")) == (None, "B", "plain")
        a.set("j", 1)
        a.clear()
        assert a.get("j") is None
        if isinstance(a.backend, SharedStore):  # a shared store drops the namespace only
            assert (b.get("k"), plain.get("k")) == ("B", "plain")

    # -- fencing and single-flight -----------------------------------------------------

    def test_invalidate_during_a_load_fences_it(self, backend: Any) -> None:
        cache = self.make_cache(backend)
        gate = Gate("outdated")
        leader = _spawn(1, lambda: cache.get_or_load("k", gate))
        assert gate.entered.wait(DEADLINE)
        waiters = _spawn(2, lambda: cache.get_or_load("k", _never))
        wait_until(lambda: cache.stats().coalesced == 2, DEADLINE, "two waiters")
        cache.invalidate("k")
        gate.open()
        assert leader() + waiters() == ["outdated"] * 3  # its callers get the load's value
        assert cache.get("k") is None and self.make_cache(backend).get("k") is None
        assert cache.stats().fenced == 1 and gate.calls == 1
        assert cache.get_or_load("k", lambda: "new") == "new"

    def test_set_during_a_load_wins(self, backend: Any) -> None:
        cache = self.make_cache(backend)
        gate = Gate("from the load")
        leader = _spawn(1, lambda: cache.get_or_load("k", gate))
        assert gate.entered.wait(DEADLINE)
        cache.set("k", "set meanwhile")
        gate.open()
        assert leader() == ["from the load"]
        assert cache.get("k") == "set meanwhile" and cache.stats().fenced == 1

    def test_cold_key_loads_once_for_50_threads(self, backend: Any) -> None:
        cache = self.make_cache(backend)
        gate = Gate({"v": 1})
        callers = _spawn(50, lambda: cache.get_or_load("k", gate))
        wait_until(lambda: cache.stats().coalesced == 49, DEADLINE, "49 waiters")
        gate.open()
        assert callers() == [{"v": 1}] * 50 and gate.calls == 1
        assert cache.get_or_load("k", _never) == {"v": 1}

    # -- what a byte store may hold: never trusted ---------------------------------------

    @pytest.mark.parametrize(
        "kind", ["truncated", "random", "bit-flip-head", "bit-flip-tail", "other key", "empty"]
    )
    def test_damaged_entry_is_a_counted_miss(self, backend: Any, kind: str) -> None:
        cache = self.make_cache(backend, namespace="dmg")
        key, other = _store_key(cache, "k"), _store_key(cache, "other")
        cache.set("k", {"v": [1, 2]})
        cache.set("other", {"v": [1, 2]})  # equal value: only the key tells them apart
        good, copied = self.read_raw(backend, key), self.read_raw(backend, other)
        assert good is not None and copied is not None, "set() stored nothing"

        def flip(at: int) -> bytes:
            return good[:at] + bytes([good[at] ^ 0x10]) + good[at + 1 :]

        makers: dict[str, Callable[[], bytes]] = {
            "truncated": lambda: good[: len(good) - 5],
            "random": lambda: random.Random(len(good)).randbytes(len(good)),
            "bit-flip-head": lambda: flip(30),
            "bit-flip-tail": lambda: flip(len(good) - 6),
            "other key": lambda: copied,
            "empty": lambda: b"",
        }
        bad = makers[kind]()
        assert bad != good
        self.damage(backend, key, bad)
        assert cache.get_or_load("k", lambda: "reloaded") == "reloaded"
        s = cache.stats()
        assert (s.serialization_errors, s.misses, s.loads) == (1, 1, 1)
        assert cache.get_or_load("k", _never) == "reloaded"  # rewritten, readable again
        assert cache.get("other") == {"v": [1, 2]}

    def test_an_oversized_entry_is_a_counted_miss_and_never_fetched(self, backend: Any) -> None:
        # Planted bytes larger than max_value_size (4x here) are refused by their
        # length inside the read: what the reader allocates stays far below the
        # planted size, and the miss is counted like any unreadable entry.
        cache = self.make_cache(backend, namespace="big")
        store, key = _byte_store(cache), _store_key(cache, "k")
        self.damage(backend, key, b"\xa5" * (4 * store.max_value_size))
        tracemalloc.start()
        try:
            assert cache.get_or_load("k", lambda: "small") == "small"
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < store.max_value_size // 4, f"the read allocated {peak:,} bytes"
        s = cache.stats()
        assert (s.serialization_errors, s.misses, s.loads) == (1, 1, 1)
        assert cache.get_or_load("k", _never) == "small"  # rewritten, readable again

    def test_unserializable_value_is_returned_not_stored(self, backend: Any) -> None:
        cache = self.make_cache(backend)
        _byte_store(cache)
        thing = threading.Lock()  # no serializer stores a lock
        gate = Gate(thing)
        leader = _spawn(1, lambda: cache.get_or_load("k", gate))
        assert gate.entered.wait(DEADLINE)
        waiters = _spawn(2, lambda: cache.get_or_load("k", _never))
        wait_until(lambda: cache.stats().coalesced == 2, DEADLINE, "two waiters")
        gate.open()
        got = leader() + waiters()
        assert len(got) == 3 and all(v is thing for v in got)  # every caller gets it
        assert cache.get("k") is None
        s = cache.stats()
        assert (s.serialization_errors, s.loads, s.backend_errors) == (1, 1, 0)
        assert cache.get_or_load("k", lambda: "plain") == "plain" and cache.get("k") == "plain"

"""Wrapping a cache the application already has: stampede keeps its own entries
there and leaves everything else alone (docs/backends.md, "Wrapping a cache you
already have").

Real mappings only: dicts, cachetools and cachebox caches, a diskcache Index,
a shelf.
"""

from __future__ import annotations

import asyncio
import logging
import shelve
import warnings
from collections.abc import Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import cachebox
import cachetools
import diskcache
import pytest

import stampede
from stampede import AsyncCoalescingCache, CoalescingCache
from stampede._entry import Entry
from stampede.backends import MemoryBackend
from stampede.backends import memory as memory_backend

MAPPINGS: dict[str, Callable[[], Any]] = {
    "dict": dict,
    "cachetools.LRUCache": lambda: cachetools.LRUCache(maxsize=100),
    "cachetools.TTLCache": lambda: cachetools.TTLCache(maxsize=100, ttl=3600),
    "cachebox.LRUCache": lambda: cachebox.LRUCache(100),
    "cachebox.TTLCache": lambda: cachebox.TTLCache(100, 3600),
}

mappings = pytest.mark.parametrize("make", list(MAPPINGS.values()), ids=list(MAPPINGS))


def foreign_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "stampede" and r.levelno >= logging.WARNING and "foreign" in r.getMessage()
    ]


class Counting:
    """A loader that counts its calls."""

    def __init__(self, value: Any = "loaded") -> None:
        self.calls = 0
        self.value = value

    def __call__(self) -> Any:
        self.calls += 1
        return self.value


# -- the application's values are left alone ---------------------------------------


@mappings
def test_a_foreign_value_is_never_overwritten(
    make: Callable[[], Any], caplog: pytest.LogCaptureFixture
) -> None:
    mapping = make()
    mapping["k"] = "the app's own"
    cache: CoalescingCache[str] = CoalescingCache(mapping, ttl=60)
    load = Counting()
    with caplog.at_level(logging.WARNING, logger="stampede"):
        for _ in range(3):
            assert cache.get_or_load("k", load) == "loaded"  # returned to the caller
    assert mapping["k"] == "the app's own"  # not stored over the app's value
    assert load.calls == 3  # so every call loads: the key is not cached
    assert cache.stats().serialization_errors == 3  # each read that found it
    found = foreign_warnings(caplog)
    assert len(found) == 1, found  # once for the key, not once per call
    assert "type str" in found[0] and "'k'" in found[0]
    # Other keys are cached as usual, and hit.
    assert cache.get_or_load("mine", Counting(1)) == 1
    assert cache.get_or_load("mine", Counting(2)) == 1
    assert cache.stats().hits == 1
    assert type(mapping["mine"]) is Entry


@mappings
def test_set_and_invalidate_leave_a_foreign_value(
    make: Callable[[], Any], caplog: pytest.LogCaptureFixture
) -> None:
    mapping = make()
    mapping["k"] = 41
    cache: CoalescingCache[int] = CoalescingCache(mapping, ttl=60)
    with caplog.at_level(logging.WARNING, logger="stampede"):
        cache.set("k", 42)
        assert mapping["k"] == 41
        cache.invalidate("k")
        assert mapping["k"] == 41
        cache.refresh("k", lambda: 43)
        assert mapping["k"] == 41
    assert cache.get("k") is None  # a foreign value is a miss, never served
    assert len(foreign_warnings(caplog)) == 1
    # stampede's own entries are set and dropped as before.
    cache.set("j", 1)
    assert type(mapping["j"]) is Entry
    cache.invalidate("j")
    assert "j" not in mapping


def test_a_foreign_none_is_left_alone_too() -> None:
    mapping: dict[str, Any] = {"k": None}
    cache: CoalescingCache[str] = CoalescingCache(mapping, ttl=60)
    assert cache.get_or_load("k", lambda: "loaded") == "loaded"
    cache.invalidate("k")
    assert mapping == {"k": None}


def test_reading_a_foreign_value_is_counted_without_a_warning_per_read(
    caplog: pytest.LogCaptureFixture,
) -> None:
    mapping = cachetools.LRUCache(maxsize=10)
    mapping["k"] = object()
    cache: CoalescingCache[Any] = CoalescingCache(mapping, ttl=60)
    with caplog.at_level(logging.WARNING, logger="stampede"):
        for _ in range(5):
            assert cache.get("k", "default") == "default"
    assert cache.stats().serialization_errors == 5
    assert foreign_warnings(caplog) == []  # only writes that leave it in place warn


def test_the_async_cache_leaves_a_foreign_value_alone(caplog: pytest.LogCaptureFixture) -> None:
    mapping = cachebox.LRUCache(10)
    mapping["k"] = "the app's own"

    async def main() -> None:
        cache: AsyncCoalescingCache[str] = AsyncCoalescingCache(mapping, ttl=60)

        async def load() -> str:
            return "loaded"

        for _ in range(3):
            assert await cache.get_or_load("k", load) == "loaded"
        await cache.set("k", "set")
        await cache.invalidate("k")
        await cache.clear()

    with caplog.at_level(logging.WARNING, logger="stampede"):
        asyncio.run(main())
    assert mapping["k"] == "the app's own"
    assert len(foreign_warnings(caplog)) == 1


def test_foreign_keys_are_reported_a_bounded_number_of_times(
    caplog: pytest.LogCaptureFixture,
) -> None:
    limit = memory_backend._WARNED_MAX
    mapping = {i: "app" for i in range(limit + 10)}
    cache: CoalescingCache[str] = CoalescingCache(mapping, ttl=60)
    with caplog.at_level(logging.WARNING, logger="stampede"):
        for i in range(limit + 10):
            cache.set(i, "ours")
        cache.set(0, "ours")  # a key reported already
    found = foreign_warnings(caplog)
    assert len(found) == limit + 1
    assert "no more are reported" in found[-1]
    assert set(mapping.values()) == {"app"}


# -- clear() drops stampede's entries only ------------------------------------------


@mappings
def test_clear_without_a_namespace_drops_only_stampedes_entries(make: Callable[[], Any]) -> None:
    mapping = make()
    mapping["other"] = 1
    mapping[("a", "tuple")] = "the app's"
    cache: CoalescingCache[str] = CoalescingCache(mapping, ttl=60)
    named: CoalescingCache[str] = CoalescingCache(mapping, ttl=60, namespace="named")
    cache.get_or_load("a", lambda: "A")
    cache.set("b", "B")
    named.set("a", "named A")
    cache.clear()
    assert cache.get("a") is None and cache.get("b") is None
    assert mapping["other"] == 1 and mapping[("a", "tuple")] == "the app's"
    assert named.get("a") == "named A"  # another namespace's entries stay
    assert len(mapping) == 3


@mappings
def test_clear_with_a_namespace_drops_only_its_namespace(make: Callable[[], Any]) -> None:
    mapping = make()
    mapping["other"] = 1
    plain: CoalescingCache[str] = CoalescingCache(mapping, ttl=60)
    users: CoalescingCache[str] = CoalescingCache(mapping, ttl=60, namespace="users")
    teams: CoalescingCache[str] = CoalescingCache(mapping, ttl=60, namespace="teams")
    plain.set(1, "plain")
    users.set(1, "Ada")
    teams.set(1, "Core")
    users.clear()
    assert (plain.get(1), users.get(1), teams.get(1)) == ("plain", None, "Core")
    assert mapping["other"] == 1


def test_cache_clear_of_a_decorated_function_keeps_the_apps_keys() -> None:
    mapping: dict[Any, Any] = {"other": 1}

    @stampede.cached(cache=mapping, ttl=60)
    def square(x: int) -> int:
        return x * x

    assert square(3) == 9
    square.cache_clear()
    assert mapping == {"other": 1}


# -- the wrapped cache's own TTL ------------------------------------------------------


@pytest.fixture
def no_warnings() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def test_a_ttl_cache_shorter_than_ttl_plus_stale_ttl_warns_once_at_construction() -> None:
    store = cachetools.TTLCache(maxsize=10, ttl=1)
    with pytest.warns(UserWarning, match=r"expires items after 1 s.*ttl \+ stale_ttl \(60 s\)"):
        cache: CoalescingCache[int] = CoalescingCache(store, ttl=60)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not again when used
        assert cache.get_or_load("k", lambda: 1) == 1


def test_the_lifetime_warning_points_at_the_callers_line() -> None:
    with pytest.warns(UserWarning) as made:
        CoalescingCache(cachetools.TTLCache(maxsize=10, ttl=1), ttl=60)
    assert [Path(w.filename).name for w in made] == [Path(__file__).name]
    with pytest.warns(UserWarning) as decorated:

        @stampede.cached(cache=cachetools.TTLCache(maxsize=10, ttl=1), ttl=60)
        def f(x: int) -> int:
            return x

    assert [Path(w.filename).name for w in decorated] == [Path(__file__).name]


def test_stale_ttl_counts_in_the_lifetime() -> None:
    with pytest.warns(UserWarning, match=r"ttl \+ stale_ttl \(90 s\)"):
        CoalescingCache(cachetools.TTLCache(maxsize=10, ttl=60), ttl=30, stale_ttl=60)


def test_a_cachebox_ttl_cache_is_checked_too() -> None:
    with pytest.warns(UserWarning, match="TTLCache expires items after 2 s"):
        CoalescingCache(cachebox.TTLCache(10, 2), ttl=5)


def test_the_async_cache_checks_the_lifetime() -> None:
    with pytest.warns(UserWarning, match="expires items after 1 s"):
        AsyncCoalescingCache(cachetools.TTLCache(maxsize=10, ttl=1), ttl=5)


@pytest.mark.parametrize(
    "make",
    [
        lambda: CoalescingCache(cachetools.TTLCache(maxsize=10, ttl=30), ttl=30),  # equal: fine
        lambda: CoalescingCache(cachetools.TTLCache(maxsize=10, ttl=3600), ttl=60, stale_ttl=600),
        lambda: CoalescingCache(cachebox.TTLCache(10, 60), ttl=60),
        lambda: CoalescingCache(cachebox.VTTLCache(10), ttl=60),  # no cache-wide ttl to read
        lambda: CoalescingCache(cachetools.LRUCache(maxsize=10), ttl=60),
        lambda: CoalescingCache({}, ttl=60),
        lambda: CoalescingCache(ttl=3600),  # the default store
        lambda: CoalescingCache(cachetools.TTLCache(maxsize=10, ttl=1), ttl=lambda v: 1),
    ],
    ids=["equal", "longer", "cachebox-longer", "VTTLCache", "LRUCache", "dict", "default", "fn"],
)
def test_no_lifetime_warning_when_the_mapping_keeps_entries_long_enough(
    make: Callable[[], Any], no_warnings: None
) -> None:
    make()


# -- in-process mappings only -------------------------------------------------------


def test_a_diskcache_index_draws_an_in_process_warning(tmp_path: Path) -> None:
    index = diskcache.Index(str(tmp_path / "index"))
    with pytest.warns(UserWarning, match="diskcache Index keeps its items in a folder"):
        cache: CoalescingCache[int] = CoalescingCache(index, ttl=60)
    assert cache.get_or_load("k", lambda: 1) == 1  # still works, in this process


def test_a_shelf_draws_an_in_process_warning(tmp_path: Path) -> None:
    with (
        shelve.open(str(tmp_path / "shelf")) as shelf,
        pytest.warns(UserWarning, match="shelf keeps its items in a file"),
    ):
        CoalescingCache(shelf, ttl=60)


class AppMapping(MutableMapping[Any, Any]):
    """A mapping of the application's own, in this process."""

    def __init__(self) -> None:
        self.data: dict[Any, Any] = {}

    def __getitem__(self, key: Any) -> Any:
        return self.data[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        self.data[key] = value

    def __delitem__(self, key: Any) -> None:
        del self.data[key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)


def test_a_mapping_of_the_apps_own_draws_no_warning(no_warnings: None) -> None:
    mapping = AppMapping()
    mapping["other"] = 1
    cache: CoalescingCache[int] = CoalescingCache(mapping, ttl=60)
    assert cache.get_or_load("k", lambda: 2) == 2
    cache.clear()
    assert dict(mapping.data) == {"other": 1}


def test_a_non_mapping_is_refused_saying_what_stampede_does_with_it() -> None:
    with pytest.raises(TypeError, match="keeps stampede's entries in a mutable mapping"):
        MemoryBackend(object())

"""A stateful model of ``CoalescingCache`` and ``AsyncCoalescingCache``.

One thread drives the cache with a ``FakeClock`` and a scripted draw; a small
reference model, written from the contract (DESIGN.md items 8-14), predicts
every answer: values, raised errors, loader calls, random draws and every
counter of ``stats()``. Loaders move the fake clock by their "duration", so
XFetch sees a real ``delta`` and refreshes early. Background refreshes (XFetch,
stale-while-revalidate) run on the refresh pool (sync) or as tasks (async);
after each rule the machine waits, with a hard deadline and no sleeps to order
anything, until the refresh has ended before it checks the model.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections import Counter
from collections.abc import Callable, Hashable
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import stampede
from stampede._entry import XFETCH_CAP
from stampede.testing import FakeClock, async_wait_until, wait_until


class NotFound(LookupError):
    """Listed in ``cache_errors``: negative-cached."""


class Boom(RuntimeError):
    """Not listed: shared with the callers, never cached."""


# "timeout" is listed too, but a TimeoutError must never be negative-cached (item 9).
ERRORS: dict[str, type[Exception]] = {"listed": NotFound, "unlisted": Boom, "timeout": TimeoutError}
CACHE_ERRORS = (NotFound, TimeoutError)

KEYS = st.sampled_from(["a", "b"])
OUTCOMES = st.sampled_from(["value", "value", "value", "listed", "unlisted", "timeout"])
LOAD_TIMES = st.sampled_from([0.0, 0.25, 1.0])  # seconds a loader moves the fake clock
STEPS = st.sampled_from([0.0, 0.125, 0.5, 1.0, 2.5, 7.0, 30.0])
# What random() returns; the cache draws u = 1 - r: r=0 -> u=1 (never early),
# r=1 -> u=0 (clamped to the cap: the earliest refresh there is).
DRAWS = st.sampled_from([0.0, 0.5, 0.9, 0.999999, 1.0])
DEFAULT = object()
STAT_FIELDS = [f.name for f in dataclasses.fields(stampede.Stats) if f.name != "load_time"]


@dataclasses.dataclass(frozen=True)
class Value:
    value: object
    fresh_until: float
    stale_until: float
    delta: float  # measured duration of the load that produced it
    retry_at: float = -math.inf  # no refresh before this (after a failed refresh)


@dataclasses.dataclass(frozen=True)
class Negative:
    type: type[Exception]
    args: tuple[Any, ...]
    until: float


class Model:
    """What the cache should do, from the contract."""

    def __init__(
        self, *, ttl: float, beta: float, stale_ttl: float, error_ttl: float, now: float
    ) -> None:
        self.ttl, self.beta, self.stale_ttl, self.error_ttl = ttl, beta, stale_ttl, error_ttl
        self.now = now
        self.entries: dict[Hashable, Value | Negative] = {}
        self.stats: Counter[str] = Counter()
        self.load_time = 0.0
        self.loader_calls = 0
        self.loaded = 0  # successful loader calls: the n in the values they return
        self.draws = 0
        self.decisions: Counter[str] = Counter()

    def advance(self, seconds: float) -> None:
        self.now += seconds  # the same float operation as FakeClock.advance

    def value_at(self, value: object, ttl: float, delta: float) -> Value:
        fresh_until = self.now + ttl
        return Value(value, fresh_until, fresh_until + self.stale_ttl, delta)

    def check_at(self, entry: Value) -> float:
        """Before this a read cannot refresh early, so the hit path skips the draw."""
        if self.beta <= 0:
            return entry.fresh_until
        return entry.fresh_until - entry.delta * self.beta * XFETCH_CAP

    def read(self, key: Hashable, r: float) -> str:
        """get_or_load's decision: hit, refresh, stale, quiet, negative or miss."""
        entry, now = self.entries.get(key), self.now
        if isinstance(entry, Value) and now < self.check_at(entry):
            return "hit"  # far from expiry: no draw
        self.draws += 1
        if entry is None:
            return "miss"
        if isinstance(entry, Negative):
            return "negative" if now < entry.until else "miss"
        if now < entry.fresh_until:
            if now < entry.retry_at or self.beta <= 0:
                return "hit"
            u = min(max(1.0 - r, math.exp(-XFETCH_CAP)), 1.0)
            early = now - entry.delta * self.beta * math.log(u) >= entry.fresh_until  # XFetch
            return "refresh" if early else "hit"
        if now < entry.stale_until:
            return "quiet" if now < entry.retry_at else "stale"
        return "miss"

    def load(
        self, key: Hashable, outcome: str, duration: float, previous: Value | Negative | None
    ) -> tuple[str, Any]:
        """One loader call (foreground or background): ("value", v) or ("raise", (type, args))."""
        self.loader_calls += 1
        started = self.now
        self.advance(duration)
        delta = max(0.0, self.now - started)
        self.load_time += delta  # time in the loader, whatever it ended with
        if outcome == "value":
            self.loaded += 1
            value = ("load", key, self.loaded)
            self.stats["loads"] += 1
            self.entries[key] = self.value_at(value, self.ttl, delta)
            return "value", value
        self.stats["load_errors"] += 1
        if isinstance(previous, Value) and self.now < previous.stale_until:
            # A usable old value beats any error (items 9, 12); no retry for error_ttl.
            # (The cache counts this as stale_served even for a background refresh.)
            self.entries[key] = dataclasses.replace(previous, retry_at=self.now + self.error_ttl)
            self.stats["stale_served"] += 1
            return "value", previous.value
        kind = ERRORS[outcome]
        if kind is NotFound:
            self.entries[key] = Negative(kind, (key,), self.now + self.error_ttl)
        return "raise", (kind, (key,))


class CacheMachine(RuleBasedStateMachine):
    """Drives a ``CoalescingCache``; the async subclass swaps how calls are made."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock(1000.0)
        self.r = 0.5
        self.draws = 0  # random() calls seen by the cache
        self.calls = 0  # loader calls that really happened
        self.loaded = 0
        self.sets = 0
        self.raised: dict[Hashable, BaseException] = {}
        self.cache: Any = None
        self.model: Model | None = None

    # -- the flavour-specific part -----------------------------------------------

    def make_cache(self, **options: Any) -> Any:
        return stampede.CoalescingCache(**options)

    def call(self, method: Callable[..., Any], *args: Any) -> Any:
        return method(*args)

    def make_loader(
        self, key: Hashable, outcome: str, duration: float, asynchronous: bool
    ) -> Callable[[], Any]:
        def loader() -> Any:
            self.calls += 1
            self.clock.advance(duration)
            if outcome == "value":
                self.loaded += 1
                return ("load", key, self.loaded)
            raise ERRORS[outcome](key)

        return loader

    def in_flight(self) -> int:
        # No public way to await a background refresh: the stats counters move
        # *before* the refresh stores its entry, so also wait for the flight map
        # entry to go, which happens after the store (SingleFlight._lead's finally).
        return len(self.cache._flight)

    def settle(self) -> None:
        m = self._model()
        wait_until(
            lambda: self.calls == m.loader_calls
            and self.cache.stats().loads + self.cache.stats().load_errors
            == m.stats["loads"] + m.stats["load_errors"]
            and not self.in_flight(),
            what="the background refresh to end",
        )

    # -- helpers -------------------------------------------------------------------

    def random(self) -> float:
        self.draws += 1
        return self.r

    def _model(self) -> Model:
        assert self.model is not None
        return self.model

    def boundaries(self) -> list[float]:
        """Future instants where some entry changes state."""
        m = self.model
        if m is None:
            return []
        marks: set[float] = set()
        for entry in m.entries.values():
            if isinstance(entry, Negative):
                marks.add(entry.until)
            else:
                marks.update(
                    (m.check_at(entry), entry.fresh_until, entry.stale_until, entry.retry_at)
                )
        return sorted(t for t in marks if math.isfinite(t) and t > m.now)

    # -- rules -----------------------------------------------------------------------

    @initialize(
        ttl=st.sampled_from([1.0, 2.5, 10.0]),
        beta=st.sampled_from([0.0, 0.5, 1.0, 2.0]),
        stale_ttl=st.sampled_from([0.0, 1.5, 4.0]),
        error_ttl=st.sampled_from([0.0, 0.5, 3.0]),
    )
    def configure(self, ttl: float, beta: float, stale_ttl: float, error_ttl: float) -> None:
        self.model = Model(
            ttl=ttl, beta=beta, stale_ttl=stale_ttl, error_ttl=error_ttl, now=self.clock()
        )
        self.cache = self.make_cache(
            ttl=ttl,
            beta=beta,
            stale_ttl=stale_ttl,
            error_ttl=error_ttl,
            cache_errors=CACHE_ERRORS,
            clock=self.clock,
            random=self.random,
        )

    @rule(key=KEYS, outcome=OUTCOMES, duration=LOAD_TIMES, r=DRAWS, asynchronous=st.booleans())
    def get_or_load(
        self, key: str, outcome: str, duration: float, r: float, asynchronous: bool
    ) -> None:
        m = self._model()
        self.r = r  # what random() returns if the cache draws
        previous = m.entries.get(key)
        decision = m.read(key, self.r)
        m.decisions[decision] += 1
        if decision in ("hit", "refresh", "stale", "quiet"):
            assert isinstance(previous, Value)
            m.stats["hits" if decision in ("hit", "refresh") else "stale_served"] += 1
            expected: tuple[str, Any] = ("value", previous.value)
        elif decision == "negative":
            assert isinstance(previous, Negative)
            m.stats["negative_hits"] += 1
            expected = ("raise", (previous.type, previous.args))
        else:
            m.stats["misses"] += 1
            expected = m.load(key, outcome, duration, previous)
        if decision == "refresh":
            m.stats["early_refreshes"] += 1

        loader = self.make_loader(key, outcome, duration, asynchronous)
        try:
            got: tuple[str, Any] = ("value", self.call(self.cache.get_or_load, key, loader))
        except Exception as exc:
            got = ("raise", (type(exc), exc.args))
            if decision == "negative":
                # A new instance of the cached type every time, never the loader's object.
                assert exc is not self.raised.get(key)
            self.raised[key] = exc
        assert got == expected, f"{decision}: got {got}, expected {expected}"

        if decision in ("refresh", "stale"):
            m.load(key, outcome, duration, previous)  # the one background refresh
        self.settle()

    @rule(key=KEYS, r=DRAWS, asynchronous=st.booleans())
    def read_hot_key(self, key: str, r: float, asynchronous: bool) -> None:
        """get_or_load with a working 1 s loader: the common case, so make it frequent."""
        self.get_or_load(key, "value", 1.0, r, asynchronous)

    @rule(key=KEYS, outcome=OUTCOMES, duration=LOAD_TIMES, asynchronous=st.booleans())
    def refresh(self, key: str, outcome: str, duration: float, asynchronous: bool) -> None:
        """Load now whatever is cached; a failure keeps a servable value (stale-if-error)."""
        m = self._model()
        expected = m.load(key, outcome, duration, m.entries.get(key))
        loader = self.make_loader(key, outcome, duration, asynchronous)
        try:
            got: tuple[str, Any] = ("value", self.call(self.cache.refresh, key, loader))
        except Exception as exc:
            got = ("raise", (type(exc), exc.args))
        assert got == expected
        self.settle()

    @rule(key=KEYS)
    def get(self, key: str) -> None:
        m = self._model()
        entry = m.entries.get(key)
        if isinstance(entry, Value) and m.now < entry.stale_until:
            m.stats["hits" if m.now < entry.fresh_until else "stale_served"] += 1
            expected = entry.value
        else:  # nothing, expired, or negative: get() never loads and never raises
            m.stats["misses"] += 1
            expected = DEFAULT
        assert self.call(self.cache.get, key, DEFAULT) == expected

    @rule(key=KEYS, ttl=st.sampled_from([None, 0.5, 1.0, 4.0]))
    def set(self, key: str, ttl: float | None) -> None:
        m = self._model()
        self.sets += 1
        value = ("set", key, self.sets)
        previous = m.entries.get(key)
        delta = previous.delta if isinstance(previous, Value) else 0.0  # keeps the load time
        m.entries[key] = m.value_at(value, m.ttl if ttl is None else ttl, delta)
        self.call(self.cache.set, key, value, ttl)

    @rule(key=KEYS)
    def invalidate(self, key: str) -> None:
        self._model().entries.pop(key, None)
        self.call(self.cache.invalidate, key)

    @rule()
    def clear(self) -> None:
        self._model().entries.clear()
        self.call(self.cache.clear)

    @rule(seconds=STEPS)
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self._model().advance(seconds)

    @precondition(lambda self: bool(self.boundaries()))
    @rule(data=st.data(), just_before=st.booleans())
    def advance_to_boundary(self, data: st.DataObject, just_before: bool) -> None:
        m = self._model()
        target = data.draw(st.sampled_from(self.boundaries()), label="boundary")
        if just_before:
            target = math.nextafter(target, -math.inf)
        if target > m.now:
            self.clock.set(target)
            m.now = target

    # -- invariants -------------------------------------------------------------------

    @invariant()
    def agrees_with_the_model(self) -> None:
        m = self._model()
        stats = self.cache.stats()
        assert {name: getattr(stats, name) for name in STAT_FIELDS} == {
            name: m.stats[name] for name in STAT_FIELDS
        }
        assert stats.load_time == m.load_time
        assert self.calls == m.loader_calls, "a fresh hit must never call the loader"
        assert self.draws == m.draws, "the hit path must skip the draw far from expiry"
        assert self.clock() == m.now
        assert self.in_flight() == 0


class AsyncCacheMachine(CacheMachine):
    """The same model through ``AsyncCoalescingCache``, one event loop for the whole run."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()

    def teardown(self) -> None:
        self.loop.close()

    def make_cache(self, **options: Any) -> Any:
        return stampede.AsyncCoalescingCache(**options)

    def call(self, method: Callable[..., Any], *args: Any) -> Any:
        return self.loop.run_until_complete(method(*args))

    def make_loader(
        self, key: Hashable, outcome: str, duration: float, asynchronous: bool
    ) -> Callable[[], Any]:
        plain = super().make_loader(key, outcome, duration, asynchronous)
        if not asynchronous:
            return plain  # a plain function runs on the loop's thread

        async def loader() -> Any:
            await asyncio.sleep(0)  # a real suspension point inside the load
            return plain()

        return loader

    def settle(self) -> None:
        m = self._model()
        # A refresh is a task on this loop: run the loop until it is done.
        self.loop.run_until_complete(
            async_wait_until(
                lambda: self.calls == m.loader_calls and not self.in_flight(),
                what="the background refresh task to end",
            )
        )


TestCoalescingCacheModel = CacheMachine.TestCase
TestCoalescingCacheModel.settings = settings(
    max_examples=120, stateful_step_count=40, deadline=None
)

TestAsyncCoalescingCacheModel = AsyncCacheMachine.TestCase
TestAsyncCoalescingCacheModel.settings = settings(
    max_examples=50, stateful_step_count=30, deadline=None
)


# -- scripted runs: the model's interesting states are really reached --------------


def _scripted(machine: CacheMachine) -> Model:
    """Walk one machine through every decision, checking the model after each step."""
    m = machine.model
    assert m is None
    machine.configure(ttl=10.0, beta=1.0, stale_ttl=4.0, error_ttl=3.0)
    m = machine._model()
    steps: list[tuple[str, tuple[Any, ...]]] = [
        # (key, outcome, load time, r, async loader); the cache draws u = 1 - r
        ("get_or_load", ("a", "value", 1.0, 0.5, True)),  # miss: load, delta = 1 s
        ("get_or_load", ("a", "value", 0.0, 0.5, False)),  # u = 0.5: head start 0.69 s: hit
        ("get", ("a",)),
        ("advance", (9.5,)),  # 0.5 s before expiry
        ("get_or_load", ("a", "value", 0.25, 0.9, True)),  # u = 0.1: 2.3 s: refresh early
        ("advance", (10.25,)),  # the refreshed entry expired: stale window
        ("get_or_load", ("a", "unlisted", 0.0, 0.0, False)),  # stale; refresh fails: kept
        ("get_or_load", ("a", "value", 0.0, 0.0, False)),  # quiet: backing off
        ("advance", (4.0,)),  # past stale_until
        ("get_or_load", ("a", "listed", 0.0, 0.0, True)),  # miss, listed error: negative
        ("get_or_load", ("a", "value", 0.0, 0.0, False)),  # negative: raised again, no load
        ("get", ("a",)),  # a negative entry is a miss for get()
        ("advance", (3.0,)),  # exactly error_ttl later
        ("get_or_load", ("a", "timeout", 0.0, 0.0, True)),  # miss; a timeout is never cached
        ("get_or_load", ("a", "value", 0.0, 0.0, False)),
        ("set", ("b", None)),
        ("refresh", ("b", "unlisted", 0.25, True)),  # keeps the value set above
        ("refresh", ("b", "value", 0.0, False)),
        ("invalidate", ("a",)),
        ("get", ("a",)),
        ("clear", ()),
        ("get", ("b",)),
    ]
    for name, args in steps:
        getattr(machine, name)(*args)
        machine.agrees_with_the_model()
    return m


def test_scripted_sync_run_reaches_every_decision() -> None:
    machine = CacheMachine()
    try:
        m = _scripted(machine)
    finally:
        machine.teardown()
    assert set(m.decisions) == {"hit", "refresh", "stale", "quiet", "negative", "miss"}
    assert m.stats["early_refreshes"] == 1 and m.stats["negative_hits"] == 1


def test_scripted_async_run_reaches_every_decision() -> None:
    machine = AsyncCacheMachine()
    try:
        m = _scripted(machine)
    finally:
        machine.teardown()
    assert set(m.decisions) == {"hit", "refresh", "stale", "quiet", "negative", "miss"}

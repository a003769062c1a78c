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
import contextlib
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

# What a loader does. The last three change the key while they run (item 13): the
# callers still get the load's result, but the cache must not store it ("fenced").
RESULTS = {
    "value": "value",
    "listed": "listed",
    "unlisted": "unlisted",
    "timeout": "timeout",
    "invalidates": "value",  # invalidate(key) during the load
    "overwritten": "value",  # set(key, ...) during the load
    "invalidates-then-fails": "listed",
}
SIDE_EFFECTS = {
    "invalidates": "invalidate",
    "overwritten": "set",
    "invalidates-then-fails": "invalidate",
}

KEYS = st.sampled_from(["a", "b"])
OUTCOMES = st.sampled_from(["value", "value", "value", *list(RESULTS)[1:]])
LOAD_TIMES = st.sampled_from([0.0, 0.25, 1.0])  # seconds a loader moves the fake clock
STEPS = st.sampled_from([0.0, 0.125, 0.5, 1.0, 2.5, 7.0, 30.0])
# What random() returns. The cache draws once per stored value, u = 1 - r: r=0 -> u=1
# (a head start of delta only), r=1 -> u=0 (clamped to the cap: the earliest point).
DRAWS = st.sampled_from([0.0, 0.5, 0.9, 0.999999, 1.0])
DEFAULT = object()
STAT_FIELDS = [f.name for f in dataclasses.fields(stampede.Stats) if f.name != "load_time"]


@dataclasses.dataclass(frozen=True)
class Value:
    value: object
    fresh_until: float
    stale_until: float
    delta: float  # measured duration of the load that produced it
    check_at: float  # the early refresh is due from here (XFetch, drawn when stored)
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
        self.r = 0.5  # what the cache's random() returns now
        self.decisions: Counter[str] = Counter()
        self.sets = 0  # values written by set(): the n in ("set", key, n)

    def advance(self, seconds: float) -> None:
        self.now += seconds  # the same float operation as FakeClock.advance

    def value_at(self, value: object, ttl: float, delta: float) -> Value:
        """A stored value; storing it takes one draw, u = 1 - r, for its refresh point."""
        self.draws += 1
        fresh_until = self.now + ttl
        check_at = fresh_until
        if self.beta > 0:
            # XFetch with one draw per stored value, a head start of delta (the
            # refresh should be done by expiry), never before half the ttl.
            u = min(max(1.0 - self.r, math.exp(-XFETCH_CAP)), 1.0)
            lead = delta * (1.0 + self.beta * -math.log(u))
            check_at = max(fresh_until - lead, self.now + ttl * 0.5)
        return Value(value, fresh_until, fresh_until + self.stale_ttl, delta, check_at)

    def check_at(self, entry: Value) -> float:
        return entry.check_at

    def read(self, key: Hashable) -> str:
        """get_or_load's decision: hit, refresh, stale, quiet, negative or miss (no draw)."""
        entry, now = self.entries.get(key), self.now
        if entry is None:
            return "miss"
        if isinstance(entry, Negative):
            return "negative" if now < entry.until else "miss"
        if now < entry.fresh_until:
            return "hit" if now < entry.check_at or now < entry.retry_at else "refresh"
        if now < entry.stale_until:
            return "quiet" if now < entry.retry_at else "stale"
        return "miss"

    def set(self, key: Hashable, ttl: float | None) -> tuple[str, Hashable, int]:
        self.sets += 1
        value = ("set", key, self.sets)
        previous = self.entries.get(key)
        delta = previous.delta if isinstance(previous, Value) else 0.0  # keeps the load time
        self.entries[key] = self.value_at(value, self.ttl if ttl is None else ttl, delta)
        return value

    def load(
        self, key: Hashable, outcome: str, duration: float, previous: Value | Negative | None
    ) -> tuple[str, Any]:
        """One loader call (foreground or background): ("value", v) or ("raise", (type, args)).

        ``previous`` is the entry the load was started from (read before it ran).
        """
        self.loader_calls += 1
        started = self.now
        self.advance(duration)
        side_effect = SIDE_EFFECTS.get(outcome)
        if side_effect == "invalidate":
            self.entries.pop(key, None)
        elif side_effect == "set":
            self.set(key, None)
        fenced = side_effect is not None
        delta = max(0.0, self.now - started)
        self.load_time += delta  # time in the loader, whatever it ended with
        result = RESULTS[outcome]
        if result == "value":
            self.loaded += 1
            value = ("load", key, self.loaded)
            self.stats["loads"] += 1
            self.store(key, self.value_at(value, self.ttl, delta), fenced)
            return "value", value
        self.stats["load_errors"] += 1
        if isinstance(previous, Value) and self.now < previous.stale_until and not fenced:
            # A usable old value beats any error (items 9, 12); no retry for error_ttl.
            # Not when the key was invalidated or set during the load: that old value
            # is no longer the cache's to hand out, so the error is raised (item 13).
            retry = dataclasses.replace(previous, retry_at=self.now + self.error_ttl)
            self.store(key, retry, fenced)
            return "value", previous.value
        kind = ERRORS[result]
        if kind is NotFound:
            self.store(key, Negative(kind, (key,), self.now + self.error_ttl), fenced)
        return "raise", (kind, (key,))

    def store(self, key: Hashable, entry: Value | Negative, fenced: bool) -> None:
        if fenced:
            self.stats["fenced"] += 1  # invalidated or overwritten meanwhile: not stored
        else:
            self.entries[key] = entry


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
            side_effect = self.begin_load(key, outcome, duration)
            if side_effect is not None:
                side_effect()
            return self.end_load(key, outcome)

        return loader

    def begin_load(self, key: Hashable, outcome: str, duration: float) -> Callable[[], Any] | None:
        """A loader's first half: count, take its time, and say what it does to the key."""
        self.calls += 1
        self.clock.advance(duration)
        side_effect = SIDE_EFFECTS.get(outcome)
        if side_effect == "invalidate":
            return lambda: self.cache.invalidate(key)
        if side_effect == "set":
            self.sets += 1
            value = ("set", key, self.sets)
            return lambda: self.cache.set(key, value)
        return None

    def end_load(self, key: Hashable, outcome: str) -> Any:
        if RESULTS[outcome] == "value":
            self.loaded += 1
            return ("load", key, self.loaded)
        raise ERRORS[RESULTS[outcome]](key)

    def in_flight(self) -> int:
        return len(self.cache._flight)

    def quiet(self) -> bool:
        """Has the cache done all the model expects (the background refresh ended)?"""
        m = self._model()
        stats = self.cache.stats()
        return (
            self.calls == m.loader_calls
            and stats.loads + stats.load_errors == m.stats["loads"] + m.stats["load_errors"]
            and not self.in_flight()
        )

    def matches(self) -> bool:
        stats = self.cache.stats()
        return all(getattr(stats, name) == self._model().stats[name] for name in STAT_FIELDS)

    def settle(self, background: bool) -> None:
        """Reach a quiet point: the background refresh the model expects has ended.

        There is no public way to await a background refresh, and its counters move
        before it stores its entry (loads, then fenced or stale_served). So wait for
        its loader call, its loads/load_errors count and the end of its flight, then
        give the last counters a short grace; the invariant then compares everything.
        """
        if not background:
            return  # a foreground load ends before get_or_load returns; the invariant checks it
        # The refresh is reserved before get_or_load returns: fail now, not at the deadline.
        m = self._model()
        assert self.in_flight() or self.calls == m.loader_calls, "no background refresh started"
        wait_until(self.quiet, what="the background refresh to end")
        with contextlib.suppress(AssertionError):  # agrees_with_the_model says what differs
            wait_until(self.matches, deadline=1.0)

    # -- helpers -------------------------------------------------------------------

    def random(self) -> float:
        self.draws += 1
        return self.r

    def _model(self) -> Model:
        assert self.model is not None
        return self.model

    def boundaries(self) -> list[tuple[float, Hashable]]:
        """Future instants where an entry changes state, with the entry's key."""
        m = self.model
        if m is None:
            return []
        marks: set[tuple[float, Hashable]] = set()
        for key, entry in m.entries.items():
            if isinstance(entry, Negative):
                times = [entry.until]
            else:
                times = [m.check_at(entry), entry.fresh_until, entry.stale_until, entry.retry_at]
            marks.update((t, key) for t in times if math.isfinite(t) and t > m.now)
        return sorted(marks, key=repr)

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
        self.r = m.r = r  # what random() returns if the cache stores a value
        previous = m.entries.get(key)
        decision = m.read(key)
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

        background = decision in ("refresh", "stale")
        if background:
            m.load(key, outcome, duration, previous)  # the one background refresh
        self.settle(background)

    @rule(key=KEYS, r=DRAWS, asynchronous=st.booleans())
    def read_hot_key(self, key: str, r: float, asynchronous: bool) -> None:
        """get_or_load with a working 1 s loader: the common case, so make it frequent."""
        self.get_or_load(key, "value", 1.0, r, asynchronous)

    @rule(key=KEYS, r=DRAWS, asynchronous=st.booleans())
    def read_during_outage(self, key: str, r: float, asynchronous: bool) -> None:
        """get_or_load while the origin fails: stale-if-error, then the retry backoff."""
        self.get_or_load(key, "unlisted", 0.0, r, asynchronous)

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
        self.settle(False)

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
        self.sets += 1
        value = self._model().set(key, ttl)
        assert value == ("set", key, self.sets)
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

    def _jump(self, target: float, just_before: bool) -> None:
        m = self._model()
        if just_before:
            target = math.nextafter(target, -math.inf)
        if target > m.now:
            self.clock.set(target)
            m.now = target

    @precondition(lambda self: bool(self.boundaries()))
    @rule(data=st.data(), just_before=st.booleans())
    def advance_to_boundary(self, data: st.DataObject, just_before: bool) -> None:
        target, _ = data.draw(st.sampled_from(self.boundaries()), label="boundary")
        self._jump(target, just_before)

    @precondition(lambda self: bool(self.boundaries()))
    @rule(
        data=st.data(),
        just_before=st.booleans(),
        outcome=OUTCOMES,
        r=DRAWS,
        asynchronous=st.booleans(),
    )
    def read_at_boundary(
        self, data: st.DataObject, just_before: bool, outcome: str, r: float, asynchronous: bool
    ) -> None:
        """Jump to where an entry changes state (or one ulp before) and read it there."""
        target, key = data.draw(st.sampled_from(self.boundaries()), label="boundary")
        self._jump(target, just_before)
        self.get_or_load(str(key), outcome, 0.25, r, asynchronous)

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
        assert self.draws == m.draws, "one draw per stored value, none per read"
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
        if not asynchronous and outcome not in SIDE_EFFECTS:
            # A plain function runs on the loop's thread.
            return super().make_loader(key, outcome, duration, asynchronous)

        async def loader() -> Any:
            await asyncio.sleep(0)  # a real suspension point inside the load
            side_effect = self.begin_load(key, outcome, duration)
            if side_effect is not None:
                await side_effect()  # the cache's async invalidate / set
            return self.end_load(key, outcome)

        return loader

    def settle(self, background: bool) -> None:
        if not background:
            return  # the load task's done callback left the flight map before we resumed
        m = self._model()
        assert self.in_flight() or self.calls == m.loader_calls, "no background refresh started"
        # The refresh is a task on this loop: run the loop until it is done. Everything
        # after its loader returns happens in one step of that task.
        self.loop.run_until_complete(
            async_wait_until(self.quiet, what="the background refresh task to end")
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
        # (key, outcome, load time, r, async loader); a stored value draws u = 1 - r
        ("get_or_load", ("a", "value", 1.0, 0.5, True)),  # miss: load, delta = 1 s, u = 0.5:
        # refresh due 1 * (1 + ln 2) = 1.69 s before expiry (1011), at 1009.31
        ("get_or_load", ("a", "value", 0.0, 0.5, False)),  # hit
        ("get", ("a",)),
        ("advance", (9.5,)),  # 1010.5: past the refresh point, 0.5 s before expiry
        ("get_or_load", ("a", "value", 0.25, 0.9, True)),  # refresh early, in the background
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
        # Item 13: a load overlapped by invalidate / set answers its caller, is not stored.
        ("get_or_load", ("c", "invalidates", 0.0, 0.0, True)),
        ("get", ("c",)),
        ("get_or_load", ("c", "overwritten", 0.5, 0.0, False)),
        ("get", ("c",)),  # the value set during the load, not the load's
        ("get_or_load", ("d", "invalidates-then-fails", 0.0, 0.0, False)),  # raise, no negative
        ("get_or_load", ("d", "value", 0.0, 0.0, True)),
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
    assert m.stats["fenced"] == 3
    assert m.stats["early_refreshes"] == 1 and m.stats["negative_hits"] == 1


def test_scripted_async_run_reaches_every_decision() -> None:
    machine = AsyncCacheMachine()
    try:
        m = _scripted(machine)
    finally:
        machine.teardown()
    assert set(m.decisions) == {"hit", "refresh", "stale", "quiet", "negative", "miss"}
    assert m.stats["fenced"] == 3

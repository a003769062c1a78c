"""The leader's pieces that do no I/O, shared by both flavours of its work.

The leader of a key (the caller that runs the loader for everyone else) does
the same steps in both flavours: look again (someone may have stored the key
meanwhile), take the fleet's lease when distributed, load, build the entry,
commit it unless fenced, wake the waiters. The I/O sequence is written once
in ``_async/engine.py`` (the sync twin is generated); what it decides is
here, in functions of a ``Host`` (the few things of a cache the leader
needs) and the entries involved.

A ``Host`` holds a cache's store, its checked ``Options``, its ``Recorder``,
its single-flight (to fence in-flight loads) and the memo of refreshes run
by other processes. Nothing here reads a cache's other state.
"""

from __future__ import annotations

import enum
import logging
import sys
import time
from collections.abc import Callable, Hashable, Mapping
from typing import Any, Generic, Protocol, TypeVar

from . import _policy
from ._entry import MISSING, Entry, ErrorData, error_entry, value_entry
from ._envelope import CorruptEntry
from ._errors import LoadTimeout
from ._failures import read_failed, write_failed
from ._near import NearTier
from ._options import Options, seconds
from ._policy import Decision
from ._stats import Recorder
from .backends._shared import SharedStore

V = TypeVar("V")
S = TypeVar("S")
L = TypeVar("L")
F = TypeVar("F")

log = logging.getLogger("stampede")


class Fenced(Protocol):
    """A call record of a single-flight: ``fenced`` is set when its key was
    invalidated or set while it ran (its result must not be stored)."""

    fenced: bool


class Flight(Protocol):
    def forget(self, key: Hashable) -> None: ...

    def _forget_all(self, where: Callable[[Hashable], bool] | None = None) -> None: ...


class RefreshMemo:
    """distributed: keys whose background refresh another process runs, and
    until when this process leaves them alone (no lease attempt on every read)."""

    __slots__ = ("_until", "_clock", "_pause")

    def __init__(self, clock: Callable[[], float], lease_ttl: float) -> None:
        self._until: dict[Hashable, float] = {}
        self._clock = clock
        self._pause = min(0.25, lease_ttl / 4)

    def note(self, k: Hashable) -> None:
        if len(self._until) >= 4096:  # bounded: forgetting costs one lease attempt
            self._until.clear()
        self._until[k] = self._clock() + self._pause

    def active(self, k: Hashable) -> bool:
        until = self._until.get(k)
        if until is None:
            return False
        if self._clock() < until:
            return True
        self._until.pop(k, None)
        return False


class Host(Generic[S, L, F]):
    """What the leader's work needs of a cache (``S``: its store, ``L``: the same
    store when it holds leases, ``F``: its fences)."""

    __slots__ = (
        "store",
        "local",
        "leases",
        "options",
        "rec",
        "flight",
        "fences",
        "elsewhere",
        "near",
    )

    def __init__(
        self,
        store: S,
        leases: L | None,
        options: Options,
        rec: Recorder,
        flight: Flight,
        fences: F,
        near: NearTier | None = None,
    ) -> None:
        self.store = store
        self.near = near  # the near cache of a shared store, if the cache has one
        self.local: bool = bool(getattr(store, "local", False))  # a mapping of this process
        self.leases = leases  # the store, when distributed; else None
        self.options = options
        self.rec = rec
        self.flight = flight
        self.fences = fences
        self.elsewhere = RefreshMemo(options.clock, options.lease_ttl)
        if isinstance(store, SharedStore):
            store.recorder = rec  # the breaker's transitions its calls see count here

    # -- background refreshes ---------------------------------------------------

    def refresh_wanted(self, k: Hashable) -> bool:
        """Start a background refresh of ``k`` here (unless one already runs)?

        Not when another process was found refreshing it a moment ago: trying
        its lease on every read would cost a round trip per read.
        """
        return self.leases is None or not self.elsewhere.active(k)

    def refresh_started(self, early: bool) -> None:
        """A background refresh was reserved here: count an early one, unless
        distributed, where it counts once it holds the fleet's lease."""
        if early and self.leases is None:
            self.rec.count("early_refreshes")

    # -- what a read means ------------------------------------------------------

    def valid(self, entry: object, count_foreign: bool = True) -> Entry[Any] | None:
        """``entry`` if it is ours; anything else in the store is a counted miss."""
        if entry is None or type(entry) is Entry:
            return entry
        if count_foreign:
            self.rec.count("serialization_errors")
            # Debug only: on every read it would flood the log. The in-process store
            # warns once per key, when it leaves the object in place (backends/memory.py).
            log.debug("ignoring a foreign object of type %s in the store", type(entry).__name__)
        return None

    def read_failed(self, exc: Exception, count: bool = True) -> None:
        """See ``_failures.read_failed``; returns None (a miss) or raises."""
        read_failed(
            exc,
            local=self.local,
            raise_backend_errors=self.options.raise_backend_errors,
            rec=self.rec,
            count=count,
            store=self.store,
            clock=self.options.clock,
        )

    def write_failed(self, exc: Exception) -> None:
        opts = self.options
        write_failed(
            exc,
            raise_backend_errors=opts.raise_backend_errors,
            rec=self.rec,
            store=self.store,
            clock=opts.clock,
        )

    def decoded(
        self, key: str, data: bytes | int | None, remaining: float | None
    ) -> Entry[Any] | None:
        """Bytes read alongside a lease, as an entry; unreadable ones are a counted miss."""
        if data is None:
            return None
        leases: Any = self.leases  # a shared store (data came from its lease read)
        try:
            entry: Entry[Any] | None = leases.decode(key, data, remaining)
            return entry
        except CorruptEntry as exc:
            self.read_failed(exc)
            return None

    def served(self, entry: Entry[Any] | None) -> Decision:
        """Classify a read and count it: a hit, a stale read or a miss; a negative
        entry raises its error (a new instance)."""
        return self._count_read(entry, _policy.decide(entry, self.options.clock()))

    def _count_read(self, entry: Entry[Any] | None, decision: Decision) -> Decision:
        if decision is Decision.HIT or decision is Decision.REFRESH:
            self.rec.counters.hits += 1
        elif decision is Decision.STALE or decision is Decision.STALE_QUIET:
            self.rec.count("stale_served")
        elif decision is Decision.MISS:
            self.rec.count("misses")
        else:
            assert entry is not None
            raise self.negative(entry)
        return decision

    def negative(self, entry: Entry[Any]) -> Exception:
        """The exception to raise for a negative entry: a new instance every time."""
        self.rec.count("negative_hits")
        assert entry.error is not None
        exc = entry.error.rebuild()
        if sys.version_info >= (3, 11):
            exc.add_note("stampede: negative-cached error, raised again until error_ttl passes")
        return exc

    def looked_up(self, entry: Entry[Any] | None, default: Any) -> Any:
        """What ``get`` answers for ``entry``: never loads, never raises a cached error."""
        decision = _policy.decide(entry, self.options.clock())
        if entry is None or decision is Decision.MISS or decision is Decision.NEGATIVE:
            self.rec.count("misses")
            return default
        self._count_read(entry, decision)  # fresh or stale here
        return entry.value

    # -- the leader's decisions -------------------------------------------------

    def second_look(
        self, current: Entry[V] | None, previous: Entry[V] | None
    ) -> tuple[Entry[V] | None, Entry[V] | None]:
        """(an entry that answers the call now, the value to fall back on if the load fails).

        An entry stored since ``previous`` was read answers the call if it is
        fresh or negative. When the first read failed (a store error), the
        second one may find a servable stale value: it then counts as
        ``previous``, so that a failing load serves it instead of caching an
        error over it (contract item 9).
        """
        now = self.options.clock()
        found = None
        if current is not None and current is not previous:
            answers = _policy.decide(current, now) in (Decision.HIT, Decision.NEGATIVE)
            found = current if answers else None
        if previous is None and _policy.usable(current, now):
            previous = current
        return found, previous

    def answer(self, entry: Entry[V]) -> V:
        """Answer a call (counted as a miss already) from an entry found on a second look."""
        if entry.error is not None:
            raise self.negative(entry)
        return entry.value  # type: ignore[return-value]

    def new_entry(self, value: V, now: float, ttl: float, delta: float) -> Entry[V]:
        """A value entry, with this cache's stale window and its XFetch draw."""
        opts = self.options
        u = 1.0 - opts.random()  # random() is in [0, 1): u in (0, 1]
        return value_entry(value, now, ttl, opts.stale_ttl, delta, opts.beta, u)

    def loaded(
        self, value: V, started: float, cache_if: Callable[[Any], bool] | None = None
    ) -> tuple[Entry[V] | None, float]:
        """The entry a successful load stores (None: the value is not to be stored,
        by ``cache_if`` or a ``ttl`` function), and the load's duration."""
        opts = self.options
        now = opts.clock()
        delta = max(0.0, now - started)
        ttl = self.ttl_for(value, opts.cache_if if cache_if is None else cache_if)
        if ttl is None:
            return None, delta
        return self.new_entry(value, now, ttl, delta), delta

    def ttl_for(self, value: Any, cache_if: Callable[[Any], bool] | None) -> float | None:
        """Seconds ``value`` is fresh, or None when it is not to be stored.

        The user's ``cache_if`` and ``ttl`` functions decide; one that raises or
        answers nonsense keeps the value out of the cache (logged), never loses it.
        """
        opts = self.options
        try:
            if cache_if is not None and not cache_if(value):
                self.rec.count("not_stored")
                return None
            if opts.ttl_of is None:
                return opts.ttl
            ttl = opts.ttl_of(value)
            if ttl is None or ttl == 0:
                self.rec.count("not_stored")
                return None
            return seconds("ttl", ttl, positive=True)
        except Exception:
            self.rec.count("not_stored")
            log.warning(
                "cache_if or the ttl function failed for a %s: the value is returned, "
                "not stored",
                type(value).__name__,
                exc_info=True,
            )
            return None

    def set_entry(
        self, value: V, ttl: float | None, previous: Entry[Any] | None
    ) -> Entry[V] | None:
        """The entry ``set(key, value, ttl)`` writes over ``previous`` (None: ``value``
        is not stored, its ``ttl`` function said so, and ``previous`` is dropped)."""
        if ttl is None:
            ttl = self.ttl_for(value, None)
            if ttl is None:
                return None
        else:
            ttl = seconds("ttl", ttl, positive=True)
        # Keep the measured load time so XFetch still refreshes a set value early.
        delta = previous.delta if previous is not None and previous.error is None else 0.0
        return self.new_entry(value, self.options.clock(), ttl, delta)

    def failure(
        self,
        k: Hashable,
        call: Fenced,
        exc: BaseException,
        previous: Entry[Any] | None,
        started: float,
    ) -> tuple[Entry[Any] | None, Any, float]:
        """What a loader's exception leaves: (entry to store, value to serve instead, time).

        The value is ``MISSING`` when the exception is to be raised.
        """
        opts = self.options
        now = opts.clock()
        spent = max(0.0, now - started)
        # A fenced load (the key was invalidated or set meanwhile) must not hand
        # out the value it was refreshing: that value is gone from the cache.
        usable = None if call.fenced else previous
        outcome = _policy.on_load_error(exc, usable, now, opts.cacheable)
        if outcome is _policy.Outcome.SERVE_STALE:
            assert previous is not None
            log.warning(
                "load of %r failed; serving the previous value, next try in %s s",
                k,
                opts.error_ttl,
                exc_info=exc,
            )
            return previous.with_retry_at(now + opts.error_ttl), previous.value, spent
        if outcome is _policy.Outcome.NEGATIVE:
            assert isinstance(exc, Exception)
            if not ErrorData.of(exc).rebuildable():
                return None, MISSING, spent  # no reader could raise it again: not cached
            if not self.local and not isinstance(exc, opts.error_types):
                # A predicate chose it, but a reader of a shared store can only rebuild
                # the types cache_errors names: do not store what no one can read.
                return None, MISSING, spent
            return error_entry(exc, now, opts.error_ttl), MISSING, spent
        return None, MISSING, spent

    def committed(self, fenced: bool, failure: Exception | None) -> bool:
        """Count how a commit ended: written (True), fenced, or refused by the store."""
        if fenced:
            self.rec.count("fenced")
            return False
        if failure is not None:
            self.write_failed(failure)
            return False
        return True


# -- after a lease attempt ---------------------------------------------------------------


class Step(enum.Enum):
    ANSWER = "answer"  # an entry answers the call (free the lease first if taken)
    LEAD = "lead"  # this process holds the lease: load
    SKIP = "skip"  # a background refresh another process runs: leave it to it
    WAIT = "wait"  # another process loads: wait for its wake-up, then look again


def look(
    host: Host[Any, Any, Any],
    k: Hashable,
    taken: bool,
    current: Entry[V] | None,
    previous: Entry[V] | None,
    *,
    force: bool,
    background: bool,
) -> tuple[Step, Entry[V] | None, Entry[V] | None]:
    """After a lease attempt: (what to do, the entry that answers, the fallback value)."""
    found, previous = (None, previous) if force else host.second_look(current, previous)
    if found is not None:
        return Step.ANSWER, found, previous
    if taken:
        return Step.LEAD, None, previous
    if background and previous is not None:
        host.elsewhere.note(k)  # this process leaves the key alone for a moment
        return Step.SKIP, None, previous
    return Step.WAIT, None, previous


class Patience:
    """A waiter's bookkeeping: counts the wait once, bounds it by ``wait_timeout``,
    and tells the metrics hook how long it lasted when it ends (``finish``).

    The deadline is on the real monotonic clock, not the cache's (which tests
    may freeze): it bounds a real wait for another process.
    """

    def __init__(self, host: Host[Any, Any, Any]) -> None:
        self._host = host
        opts = host.options
        self.waited = False
        self._since = 0.0
        self._timed = False
        self.poll: float = min(0.25, opts.lease_ttl / 4)
        timeout = opts.wait_timeout
        self._deadline: float | None = None if timeout is None else time.monotonic() + timeout

    def next_wait(self) -> float:
        """Seconds to wait before looking again; ``LoadTimeout`` once out of time."""
        if not self.waited:
            self.waited = True
            self._since = self._host.options.clock()
            self._host.rec.counters.lease_waits += 1  # now; the hook hears of it at the end
        if self._deadline is None:
            return self.poll
        left = min(self.poll, self._deadline - time.monotonic())
        if left <= 0:
            raise LoadTimeout(
                f"no result after waiting {self._host.options.wait_timeout} s for a lease"
            )
        return left

    def finish(self) -> None:
        """The wait is over (a value, a lease, an error): time it for the hook."""
        if self.waited and not self._timed:
            self._timed = True
            self._host.rec.emit("lease_waits", self._host.options.clock() - self._since)

    def leading(self, early: bool) -> None:
        """This process took the lease and loads for the fleet."""
        if self.waited:
            self._host.rec.count("lease_takeovers")  # the lease waited on ended with no value
        if early:
            self._host.rec.count("early_refreshes")  # this process's refresh is the fleet's one


# -- many keys at once (get_or_load_many) ------------------------------------------------


class Failed:
    """A key's outcome in a batch load that is an exception to raise (its callers')."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def result(self) -> Any:
        raise self.exc


def outcome(value: Any) -> Any:
    """A batch outcome as its caller sees it: the value, or the exception raised."""
    if type(value) is Failed:
        return value.result()
    return value


def picked(loaded: object, key: Hashable) -> Any:
    """``key``'s value in what ``load_many`` returned; ``KeyError`` if it left it out."""
    if not isinstance(loaded, Mapping):
        raise TypeError(
            f"load_many must return a mapping of the keys asked to their values, "
            f"got a {type(loaded).__name__}"
        )
    try:
        return loaded[key]
    except KeyError:
        raise KeyError(f"load_many returned no value for {key!r}") from None

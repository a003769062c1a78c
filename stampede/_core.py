"""What the sync and async caches share: configuration, bookkeeping, and every
step of a load that is not I/O or waiting.

The shells (``_cache.py``, ``_acache.py``) differ only in how they wait (a
thread event or a task) and how they call the loader (plainly or awaited).
Everything they decide goes through ``_policy`` and the methods here, so the
two flavours cannot drift; ``tests/test_parity.py`` runs one scenario list
through both.

Fencing: ``invalidate`` and ``set`` forget the key's in-flight call and write
the store under the key's lock; a finished load writes under it only if
its call was not forgotten. So a load that overlaps an invalidation still
answers its callers but never writes its (possibly outdated) result.
"""

from __future__ import annotations

import logging
import math
import os
import random as _random
import sys
import threading
import time
import weakref
from collections.abc import Callable, Hashable
from typing import Any, Generic, Literal, Protocol, TypeVar

from . import _policy
from ._entry import MISSING, Entry, ErrorData, Missing, error_entry, value_entry
from ._envelope import CorruptEntry
from ._errors import BackendUnavailable, SerializationError
from ._policy import Decision, ErrorFilter
from ._stats import Counters, MetricsHook, Stats
from .backends import SharedStore, Store, resolve
from .backends._shared import CircuitOpen, Codec, StoreBusy, ValueTooLarge

V = TypeVar("V")

log = logging.getLogger("stampede")


class _Flight(Protocol):
    def forget(self, key: Hashable) -> None: ...

    def _forget_all(self, where: Callable[[Hashable], bool] | None = None) -> None: ...


class _CallRecord(Protocol):
    forgotten: bool


_live: weakref.WeakSet[CacheCore[Any]] = weakref.WeakSet()


def _after_fork() -> None:
    for cache in list(_live):  # a lock held by a parent's thread would stay held here
        cache._locks = tuple(threading.Lock() for _ in cache._locks)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


def _error_types(cache_errors: object) -> tuple[type[BaseException], ...]:
    """The exception types a negative entry read from a shared store may be rebuilt as."""
    if isinstance(cache_errors, type):
        return (cache_errors,)
    if isinstance(cache_errors, tuple):
        return cache_errors
    return ()  # a predicate names no types: negative entries stay in this process's reads


def _seconds(name: str, value: float, *, positive: bool = False) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number of seconds, got {value!r}") from None
    if math.isnan(value) or value < 0 or (positive and value == 0) or math.isinf(value):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be finite and {bound}, got {value!r}")
    return value


class CacheCore(Generic[V]):
    """Configuration and shared steps of ``CoalescingCache`` / ``AsyncCoalescingCache``."""

    _asynchronous = False  # the flavour of store I/O the shell does

    def __init__(
        self,
        backend: Any = None,
        *,
        ttl: float = 60.0,
        beta: float = 1.0,
        stale_ttl: float = 0.0,
        cache_errors: type[BaseException] | tuple[type[BaseException], ...] | ErrorFilter = (),
        error_ttl: float = 5.0,
        wait_timeout: float | None = None,
        namespace: str = "",
        serializer: Any = None,
        distributed: bool = False,
        lease_ttl: float = 10.0,
        maxsize: int | None = None,
        name: str | None = None,
        metrics: MetricsHook | None = None,
        on_backend_error: Literal["fail-open", "raise"] = "fail-open",
        clock: Callable[[], float] = time.monotonic,
        random: Callable[[], float] = _random.random,
    ) -> None:
        """Wrap ``backend`` in a single-flight, early-refreshing, failure-aware cache.

        Args:
            backend: where entries live: ``None`` for a bounded in-process LRU
                (``maxsize`` entries), a ``dict``, a cachetools or cachebox
                cache or any mutable mapping, a ``diskcache.Cache`` /
                ``FanoutCache``, a ``redis.Redis`` (``redis.asyncio.Redis`` for
                the async cache) or ``RedisCluster`` client, or a URL:
                ``memory://``, ``disk:///path``, ``redis://``, ``rediss://``, ``unix://``.
            ttl: seconds a loaded value is fresh.
            beta: XFetch eagerness: how early a hot key is refreshed in the
                background, relative to how long its load took (``0`` turns
                early refresh off).
            stale_ttl: seconds after ``ttl`` during which an expired value is
                still served, while one caller refreshes it in the background
                (stale-while-revalidate) or when the refresh fails
                (stale-if-error).
            cache_errors: exception types (or a predicate on the exception)
                whose raising by the loader is cached for ``error_ttl``
                seconds and raised again to readers (negative caching). Other
                errors are shared by the callers of the load, never stored.
            error_ttl: seconds a cached error lives; also how long a failed
                background refresh waits before the next try.
            wait_timeout: the most seconds a caller waits for another
                caller's load (``LoadTimeout`` past it); ``None``: no bound.
            namespace: prefix of this cache's keys in a shared store, and the
                scope of ``clear()``.
            serializer: how values are encoded in shared stores (default
                ``DataSerializer``, data only); ignored by in-process stores.
            distributed: single-flight across processes and hosts with a
                per-key lease in the store (Redis, diskcache).
            lease_ttl: seconds a lease lives without renewal; a loader that
                runs longer keeps it renewed.
            maxsize: entries of the default in-process LRU.
            name: the cache's name for the metrics hook (default: the
                namespace, else ``"default"``).
            metrics: a ``MetricsHook`` told of misses, loads, waits, errors.
            on_backend_error: ``"fail-open"`` (load as if the store were
                empty, behind a circuit breaker) or ``"raise"``
                (``BackendUnavailable``).
            clock: monotonic seconds; tests pass a fake clock.
            random: uniform draws in ``[0, 1)`` for XFetch; tests script them.

        Raises:
            TypeError: an option of the wrong type.
            ValueError: an option out of range, or ``distributed=True`` on a
                store that lives in this process only.
        """
        self._ttl = _seconds("ttl", ttl, positive=True)
        self._beta = _seconds("beta", beta)
        self._stale_ttl = _seconds("stale_ttl", stale_ttl)
        self._error_ttl = _seconds("error_ttl", error_ttl)
        self._wait_timeout = (
            None if wait_timeout is None else _seconds("wait_timeout", wait_timeout, positive=True)
        )
        self._lease_ttl = _seconds("lease_ttl", lease_ttl, positive=True)
        if not isinstance(namespace, str):
            raise TypeError(f"namespace must be a str, got {type(namespace).__name__}")
        try:
            namespace.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("namespace must be encodable as UTF-8 (no lone surrogates)") from None
        self._namespace = namespace
        self._cacheable = _policy.error_filter(cache_errors)
        self._error_types = _error_types(cache_errors)
        if on_backend_error not in ("fail-open", "raise"):
            raise ValueError(
                f"on_backend_error must be 'fail-open' or 'raise', got {on_backend_error!r}"
            )
        self._raise_backend_errors = on_backend_error == "raise"
        store = resolve(backend, maxsize=maxsize, asynchronous=self._asynchronous)
        if distributed and store.local:
            raise ValueError(
                "distributed=True needs a backend shared between processes (Redis, "
                f"diskcache); {store!r} lives in this process only"
            )
        if distributed and not getattr(store, "supports_leases", False):
            raise ValueError(
                f"distributed=True needs leases, which {store!r} cannot hold (a diskcache "
                "FanoutCache spreads a value and its lease over shards: use a plain Cache)"
            )
        self._distributed = bool(distributed)
        if isinstance(store, SharedStore):
            if serializer is None:
                from .serializers import DataSerializer

                serializer = DataSerializer()
            for attr in ("name", "dumps", "loads"):
                if not hasattr(serializer, attr):
                    raise TypeError(f"serializer {serializer!r} has no {attr!r}")
            codec = Codec(serializer, clock=clock, beta=self._beta, error_types=self._error_types)
            store = store.bind(codec, namespace)
        self._backend: Store = store
        self._serializer = serializer  # the in-memory backend keeps objects: no serializer
        self._clock = clock
        self._random = random
        self._get = self._backend.get
        # How keys become store keys; None: used as they are (the hit path's fast case).
        self._make_key = self._backend.key_maker(namespace)
        self._counters = Counters()
        self._metrics = metrics
        self._name = name or namespace or "default"
        # Fencing (see the module docstring), striped by key so that writes of
        # different keys to a remote store do not queue behind each other.
        self._locks = tuple(threading.Lock() for _ in range(16))
        # distributed: keys whose background refresh another process runs, and
        # until when this one leaves it alone (no lease attempt on every read).
        self._elsewhere: dict[Hashable, float] = {}
        self._setup()
        _live.add(self)

    def _setup(self) -> None:
        """The shell's own state (its single-flight), made last in ``__init__``."""
        raise NotImplementedError

    def _refresh_wanted(self, k: Hashable) -> bool:
        """Start a background refresh of ``k`` here (unless one already runs)?

        Not when another process was found refreshing it a moment ago: trying
        its lease on every read would cost a round trip per read.
        """
        return not (self._distributed and self._refreshing_elsewhere(k))

    def _refresh_started(self, early: bool) -> None:
        """A background refresh was reserved here: count an early one, unless
        distributed, where it counts once it holds the fleet's lease."""
        if early and not self._distributed:
            self._count("early_refreshes")

    def _refreshing_elsewhere(self, k: Hashable) -> bool:
        """Another process was refreshing ``k`` a moment ago: do not try its lease yet."""
        until = self._elsewhere.get(k)
        if until is None:
            return False
        if self._clock() < until:
            return True
        self._elsewhere.pop(k, None)
        return False

    def _note_refreshing_elsewhere(self, k: Hashable) -> None:
        if len(self._elsewhere) >= 4096:  # bounded: forgetting costs one lease attempt
            self._elsewhere.clear()
        self._elsewhere[k] = self._clock() + min(0.25, self._lease_ttl / 4)

    def _in_flight(self) -> _Flight:
        """The shell's single-flight (its ``_flight``, of a type each shell declares)."""
        raise NotImplementedError

    # -- introspection -------------------------------------------------------

    @property
    def ttl(self) -> float:
        return self._ttl

    @property
    def beta(self) -> float:
        return self._beta

    @property
    def stale_ttl(self) -> float:
        return self._stale_ttl

    @property
    def error_ttl(self) -> float:
        return self._error_ttl

    @property
    def wait_timeout(self) -> float | None:
        return self._wait_timeout

    @property
    def namespace(self) -> str:
        return self._namespace

    @property
    def backend(self) -> Store:
        return self._backend

    @property
    def name(self) -> str:
        """The name given to the metrics hook (``name=``, else the namespace)."""
        return self._name

    def stats(self) -> Stats:
        """A frozen snapshot of the counters."""
        return self._counters.snapshot()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self._backend!r}, ttl={self._ttl}, beta={self._beta}, "
            f"stale_ttl={self._stale_ttl}, namespace={self._namespace!r})"
        )

    # -- shared steps ----------------------------------------------------------

    def _count(self, event: str, duration: float | None = None) -> None:
        """Bump the counter ``event`` and tell the metrics hook (slow paths only)."""
        counters = self._counters
        setattr(counters, event, getattr(counters, event) + 1)
        if self._metrics is not None:
            self._emit(event, duration)

    def _emit(self, event: str, duration: float | None = None) -> None:
        assert self._metrics is not None
        try:
            self._metrics.record(self._name, event, duration)
        except Exception:
            log.warning("metrics hook failed", exc_info=True)

    def _key(self, key: Hashable) -> Hashable:
        return key if self._make_key is None else self._make_key(key)

    def _valid(self, entry: object, count_foreign: bool = True) -> Entry[V] | None:
        """``entry`` if it is ours; anything else in the store is a counted miss."""
        if entry is None or type(entry) is Entry:
            return entry
        if not count_foreign:
            return None
        self._count("serialization_errors")
        log.warning("ignoring a foreign object of type %s in the store", type(entry).__name__)
        return None

    def _read(self, k: Hashable, count_foreign: bool = True) -> Entry[V] | None:
        try:
            entry = self._get(k)
        except Exception as exc:
            return self._read_failed(exc, count_foreign)
        return self._valid(entry, count_foreign)

    def _read_failed(self, exc: Exception, count: bool = True) -> Entry[V] | None:
        """A failed store read is a miss (counted, logged), or raises when configured to."""
        if isinstance(exc, CorruptEntry):
            if count:
                self._count("serialization_errors")
                log.warning("unreadable entry in the store, treated as a miss: %s", exc)
            return None
        if isinstance(exc, BackendUnavailable):
            self._count("backend_errors")
            if self._raise_backend_errors:
                raise exc
            if isinstance(exc, (CircuitOpen, StoreBusy)):
                log.debug("%s", exc)
            else:
                log.warning("store read failed, loading without it: %s", exc)
            return None
        if self._backend.local and not isinstance(exc, TypeError):
            # A user's mapping failing on read (a TypeError is an unhashable key).
            self._count("backend_errors")
            log.warning("store read failed; treating it as a miss", exc_info=True)
            return None
        raise exc

    def _decide(self, entry: Entry[V] | None) -> Decision:
        return _policy.decide(entry, self._clock())

    def _served(self, decision: Decision) -> bool:
        """Count a read answered from the store; should it start a refresh?"""
        if decision is Decision.HIT or decision is Decision.REFRESH:
            self._counters.hits += 1
            return decision is Decision.REFRESH
        self._count("stale_served")
        return decision is Decision.STALE

    def _from_store(self, k: Hashable, loader: Any, entry: object) -> V | Missing:
        """The slow path's answer from the entry read, or ``MISSING``: load it.

        Starts the background refresh the entry calls for (``_refresh`` of the
        shell), raises a negative-cached error, counts a miss.
        """
        valid = self._valid(entry)
        decision = self._decide(valid)
        if decision <= Decision.STALE_QUIET:
            assert valid is not None
            if self._served(decision):
                self._refresh(k, loader, valid, early=decision is Decision.REFRESH)
            return valid.value
        if decision is Decision.NEGATIVE:
            assert valid is not None
            raise self._negative(valid)
        self._count("misses")
        return MISSING

    def _refresh(self, k: Hashable, loader: Any, entry: Entry[V], early: bool) -> None:
        raise NotImplementedError  # each shell starts refreshes its own way

    def _negative(self, entry: Entry[V]) -> Exception:
        """The exception to raise for a negative entry: a new instance every time."""
        self._count("negative_hits")
        assert entry.error is not None
        exc = entry.error.rebuild()
        if sys.version_info >= (3, 11):
            exc.add_note("stampede: negative-cached error, raised again until error_ttl passes")
        return exc

    # Each step below is split in two: what to do (pure, shared by both shells)
    # and doing it on the store (here for sync stores; _acache.py awaits async ones).

    def _recheck_entry(
        self, current: Entry[V] | None, previous: Entry[V] | None
    ) -> Entry[V] | None:
        """A leader's second look: an entry someone stored since ``previous`` was read."""
        if current is None or current is previous:
            return None
        decision = _policy.decide(current, self._clock())
        return current if decision in (Decision.HIT, Decision.NEGATIVE) else None

    def _decoded(self, key: str, data: bytes | None, remaining: float | None) -> Entry[V] | None:
        """Bytes read alongside a lease, as an entry; unreadable ones are a counted miss."""
        if data is None:
            return None
        try:
            return self._backend.decode(key, data, remaining)  # type: ignore[union-attr]
        except CorruptEntry as exc:
            return self._read_failed(exc)

    def _second_look(
        self, current: Entry[V] | None, previous: Entry[V] | None
    ) -> tuple[Entry[V] | None, Entry[V] | None]:
        """(an entry that answers the call now, the value to fall back on if the load fails).

        When the first read failed (a store error), the second one may find a
        servable stale value: it then counts as ``previous``, so that a failing
        load serves it instead of caching an error over it (contract item 9).
        """
        found = self._recheck_entry(current, previous)
        if previous is None and _policy.usable(current, self._clock()):
            previous = current
        return found, previous

    def _answer(self, entry: Entry[V]) -> V:
        """Answer a call (counted as a miss already) from an entry found on a second look."""
        if entry.error is not None:
            raise self._negative(entry)
        return entry.value  # type: ignore[return-value]

    def _lock_for(self, k: Hashable) -> threading.Lock:
        return self._locks[hash(k) % len(self._locks)]

    def _commit(self, k: Hashable, call: _CallRecord, entry: Entry[Any]) -> bool:
        """Store ``entry`` unless the call was fenced; a failing store is logged, not raised."""
        failure: Exception | None = None
        with self._lock_for(k):
            fenced = call.forgotten
            if not fenced:
                try:
                    self._backend.set(k, entry)
                except Exception as exc:
                    failure = exc
        # Counted (and the metrics hook called) once the lock is released.
        return self._committed(fenced, failure)

    def _committed(self, fenced: bool, failure: Exception | None) -> bool:
        if fenced:
            self._count("fenced")
            return False
        if failure is not None:
            self._write_failed(failure)
            return False
        return True

    def _write_failed(self, exc: Exception) -> None:
        """A value that could not be stored is still returned: count and log why."""
        if isinstance(exc, (SerializationError, ValueTooLarge)):
            self._count("serialization_errors")
            log.warning(
                "%s; the result is given to its callers but not cached (a serializer= "
                "that supports it, e.g. PickleSerializer(secret=...), would store it)",
                exc,
            )
            return
        self._count("backend_errors")
        if isinstance(exc, BackendUnavailable):
            if self._raise_backend_errors:
                raise exc
            if not isinstance(exc, CircuitOpen):
                log.warning("store write failed; the value is returned, not cached: %s", exc)
            return
        log.warning("store write failed; the value is returned, not cached", exc_info=exc)

    def _entry(self, value: V, now: float, ttl: float, delta: float) -> Entry[V]:
        """A value entry, with this cache's stale window and its XFetch draw."""
        u = 1.0 - self._random()  # random() is in [0, 1): u in (0, 1]
        return value_entry(value, now, ttl, self._stale_ttl, delta, self._beta, u)

    def _loaded(self, value: V, started: float) -> tuple[Entry[V], float]:
        """The entry a successful load stores, and the load's duration."""
        now = self._clock()
        delta = max(0.0, now - started)
        return self._entry(value, now, self._ttl, delta), delta

    def _count_load(self, event: str, spent: float) -> None:
        # Counted once the entry is written: whoever sees the count sees the entry.
        self._counters.load_time += spent
        self._count(event, spent)

    def _stored(self, k: Hashable, call: _CallRecord, value: V, started: float) -> V:
        entry, delta = self._loaded(value, started)
        self._commit(k, call, entry)
        self._count_load("loads", delta)
        return value

    def _failure(
        self,
        k: Hashable,
        call: _CallRecord,
        exc: BaseException,
        previous: Entry[V] | None,
        started: float,
    ) -> tuple[Entry[Any] | None, V | Missing, float]:
        """What a loader's exception leaves: (entry to store, value to serve instead, time).

        The value is ``MISSING`` when the exception is to be raised.
        """
        now = self._clock()
        spent = max(0.0, now - started)
        # A fenced load (the key was invalidated or set meanwhile) must not hand
        # out the value it was refreshing: that value is gone from the cache.
        usable = None if call.forgotten else previous
        outcome = _policy.on_load_error(exc, usable, now, self._cacheable)
        if outcome is _policy.Outcome.SERVE_STALE:
            assert previous is not None
            log.warning(
                "load of %r failed; serving the previous value, next try in %s s",
                k,
                self._error_ttl,
                exc_info=exc,
            )
            return previous.with_retry_at(now + self._error_ttl), previous.value, spent
        if outcome is _policy.Outcome.NEGATIVE:
            assert isinstance(exc, Exception)
            if not ErrorData.of(exc).rebuildable():
                return None, MISSING, spent  # no reader could raise it again: not cached
            if not self._backend.local and not isinstance(exc, self._error_types):
                # A predicate chose it, but a reader of a shared store can only rebuild
                # the types cache_errors names: do not store what no one can read.
                return None, MISSING, spent
            return error_entry(exc, now, self._error_ttl), MISSING, spent
        return None, MISSING, spent

    def _failed(
        self,
        k: Hashable,
        call: _CallRecord,
        exc: BaseException,
        previous: Entry[V] | None,
        started: float,
    ) -> V | Missing:
        """Handle a loader's exception: the value to serve instead, or ``MISSING`` to raise."""
        entry, instead, spent = self._failure(k, call, exc, previous, started)
        if entry is not None:
            self._commit(k, call, entry)
        self._count_load("load_errors", spent)
        return instead

    def _new_entry(self, value: V, ttl: float | None, previous: Entry[V] | None) -> Entry[V]:
        """The entry ``set(key, value, ttl)`` writes over ``previous``."""
        ttl = self._ttl if ttl is None else _seconds("ttl", ttl, positive=True)
        # Keep the measured load time so XFetch still refreshes a set value early.
        delta = previous.delta if previous is not None and previous.error is None else 0.0
        return self._entry(value, self._clock(), ttl, delta)

    def _set_entry(self, k: Hashable, value: V, ttl: float | None) -> None:
        entry = self._new_entry(value, ttl, self._read(k))
        with self._lock_for(k):
            self._in_flight().forget(k)
            if self._distributed:  # write and fence the fleet's load in one step
                self._backend.lease_break(k, False, entry)  # type: ignore[union-attr, arg-type]
            else:
                self._backend.set(k, entry)

    def _invalidate(self, k: Hashable) -> None:
        with self._lock_for(k):
            self._in_flight().forget(k)
            if self._distributed:
                self._backend.lease_break(k, drop_value=True)  # type: ignore[union-attr, arg-type]
            else:
                self._backend.delete(k)

    def _clear(self) -> None:
        for lock in self._locks:
            lock.acquire()
        try:
            self._in_flight()._forget_all()
            if isinstance(self._backend, SharedStore):
                self._backend.clear()  # a bound store knows its namespace
            else:
                self._backend.clear(self._namespace)
        finally:
            for lock in self._locks:
                lock.release()

    def _looked_up(self, entry: Entry[V] | None, default: Any) -> Any:
        """What ``get`` answers for ``entry``: never loads, never raises a cached error."""
        decision = _policy.decide(entry, self._clock())
        if entry is None or decision in (Decision.MISS, Decision.NEGATIVE):
            self._count("misses")
            return default
        self._served(decision)
        return entry.value

    def _lookup(self, k: Hashable, default: Any) -> Any:
        return self._looked_up(self._read(k), default)

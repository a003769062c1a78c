"""``CoalescingCache``: the sync shell.

Read the entry, let the policy decide, and on a miss lead or join the key's
single flight: the leader loads on its own thread (``_sync/engine.load``),
the others wait for it. Background refreshes (XFetch,
stale-while-revalidate) run on a small shared thread pool, reserved in the
flight map first so a key never has two refreshes at once and foreground
misses join the running one.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import functools
import logging
import os
import threading
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any, TypeVar

from ._base import CacheBase, V
from ._entry import MISSING, Entry
from ._errors import LoadAbandoned
from ._leader import Failed, outcome, picked
from ._policy import Decision
from ._primitives import call_loader
from ._singleflight import SingleFlight, _Call, _leading
from ._sync import engine

K = TypeVar("K", bound=Hashable)

log = logging.getLogger("stampede")

REFRESH_WORKERS = 8

_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_lock = threading.RLock()  # reentrant: a finalizer run while the pool is made


def _refresher() -> concurrent.futures.ThreadPoolExecutor:
    global _pool
    if _pool is None:
        with _pool_lock:
            if _pool is None:
                _pool = concurrent.futures.ThreadPoolExecutor(
                    max_workers=REFRESH_WORKERS, thread_name_prefix="stampede-refresh"
                )
    return _pool


def _after_fork() -> None:
    # The parent's pool threads do not exist in the child: start a new pool lazily.
    global _pool, _pool_lock
    _pool = None
    _pool_lock = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


class CoalescingCache(CacheBase[V]):
    """A cache whose misses load once for all concurrent callers.

    Wraps ``backend`` (``None`` for a bounded in-process LRU, a ``dict``, a
    cachetools or cachebox cache, any mutable mapping, a diskcache or Redis
    client, or a URL). The guarantees are listed in docs/guarantees.md.
    """

    _flight: SingleFlight

    def get_or_load(
        self, key: Hashable, loader: Callable[[], V], *, cache_if: Callable[[V], bool] | None = None
    ) -> V:
        """The cached value of ``key``, loading it with ``loader()`` when missing.

        Concurrent callers of a missing key share one ``loader()`` call and its
        result or exception. Raises the loader's exception, a negative-cached
        error (a new instance of its type), ``LoadTimeout`` when a wait runs
        past ``wait_timeout``, ``RecursiveLoad`` when ``loader`` asks for
        ``key``, ``BlockingWaitInLoop`` when waiting would block a running
        event loop, ``TypeError`` when ``loader`` returns an awaitable.

        ``cache_if``: for this call instead of the cache's; a value for which it
        is false is returned to every caller of the load but not stored.
        """
        make_key = self._make_key
        k = key if make_key is None else make_key(key)
        value = self._peek(k)
        if value is MISSING:
            return self._slow(k, loader, cache_if)
        return value  # type: ignore[no-any-return]

    def _slow(
        self, k: Hashable, loader: Callable[[], V], cache_if: Callable[[Any], bool] | None = None
    ) -> V:
        """Everything but a plain hit: read, decide, serve, refresh, or load."""
        host = self._host
        entry = engine.read(host, k)
        decision = host.served(entry)  # counted; a negative entry raises its error here
        if decision is Decision.MISS:
            call, leader = self._flight._join(k)
            if leader:
                load = functools.partial(engine.load, host, k, loader, entry, cache_if=cache_if)
                return self._flight._lead(k, call, load)  # type: ignore[no-any-return]
            return self._join_wait(call)
        assert entry is not None
        if decision is Decision.REFRESH or decision is Decision.STALE:
            self._refresh(k, loader, entry, decision is Decision.REFRESH, cache_if)
            if decision is Decision.REFRESH and self._near is not None:
                self._near.refreshing(k, entry)
        return entry.value  # type: ignore[return-value]

    def _join_wait(self, call: _Call) -> V:
        """Wait for another caller's load of the key: counted, and timed for the hook."""
        self._counters.coalesced += 1  # before waiting: tests poll it to see waiters
        timeout = self._options.wait_timeout
        if self._rec.metrics is None:
            return self._flight._wait(call, timeout)  # type: ignore[no-any-return]
        started = self._clock()
        try:
            return self._flight._wait(call, timeout)  # type: ignore[no-any-return]
        finally:
            self._rec.emit("coalesced", self._clock() - started)

    def _refresh(
        self,
        k: Hashable,
        loader: Callable[[], V],
        entry: Entry[V],
        early: bool,
        cache_if: Callable[[Any], bool] | None = None,
    ) -> None:
        """Start one background refresh of ``k`` (unless one runs already)."""
        if not self._host.refresh_wanted(k):
            return
        call = self._flight._reserve(k)
        if call is None:
            return  # a load or refresh of this key is already running
        self._host.refresh_started(early)
        run = functools.partial(self._run_refresh, k, loader, entry, call, early, cache_if)
        try:
            # In the reader's context, as asyncio tasks would be.
            context = contextvars.copy_context()
            context.run(_leading.set, ())  # not part of the reader's loads
            _refresher().submit(context.run, run)
        except RuntimeError:  # the pool is shut down: the interpreter is exiting
            with contextlib.suppress(RuntimeError):  # the reader still gets its value
                self._flight._lead(k, call, _not_started)

    def _run_refresh(
        self,
        k: Hashable,
        loader: Callable[[], V],
        entry: Entry[V],
        call: _Call,
        early: bool,
        cache_if: Callable[[Any], bool] | None,
    ) -> None:
        host = self._host
        try:
            load = functools.partial(
                engine.load, host, k, loader, entry, background=True, early=early, cache_if=cache_if
            )
            self._flight._lead(k, call, load)
        except Exception:
            log.warning("background refresh of %r failed", k, exc_info=True)

    def get_or_load_many(
        self,
        keys: Iterable[K],
        load_many: Callable[[list[K]], Mapping[K, V]],
        *,
        cache_if: Callable[[V], bool] | None = None,
    ) -> dict[K, V]:
        """The cached values of ``keys``, loading the missing ones with one
        ``load_many(missing_keys)`` call (a mapping of those keys to their values).

        The lookups take one store round trip (none for near or in-process
        hits). Each key is still single-flight: a key another caller is loading
        is waited for, not loaded again; the keys this call leads are loaded
        together. Fresh, stale and early-refreshed keys are served as
        ``get_or_load`` serves them (a background refresh loads its key alone,
        through ``load_many([key])``).

        Returns a dict with every key. Raises a negative-cached error of a key,
        ``KeyError`` when ``load_many`` leaves out a key (that key is not
        stored), or the error of a failed load; the other keys are still stored.
        """
        return self._get_or_load_many(self._many(keys), load_many, cache_if)

    def _get_or_load_many(
        self,
        ks: dict[Any, Hashable],
        load_many: Callable[[list[Any]], Any],
        cache_if: Callable[[Any], bool] | None,
    ) -> dict[Any, Any]:
        """``get_or_load_many`` of the keys in ``ks``, given with their store keys."""
        found: dict[Any, Any] = {}
        todo = self._peek_many(ks, found)
        if todo:
            self._load_many([(key, ks[key]) for key in todo], load_many, cache_if, found)
        return {key: found[key] for key in ks}

    def _load_many(
        self,
        todo: list[tuple[Any, Hashable]],
        load_many: Callable[[list[Any]], Any],
        cache_if: Callable[[Any], bool] | None,
        found: dict[Any, Any],
    ) -> None:
        """The keys the hit path did not serve: one read, then serve, refresh, or load."""
        entries = engine.read_many(self._host, [k for _, k in todo])
        one = functools.partial(_one, load_many)
        missing = self._served_many(todo, entries, one, cache_if, found)
        if not missing:
            return
        lead: list[tuple[Any, Hashable, Entry[Any] | None, _Call]] = []
        wait: list[tuple[Any, Hashable, Entry[Any] | None, _Call]] = []
        try:
            for key, k, entry in missing:
                call, leader = self._flight._join(k)
                (lead if leader else wait).append((key, k, entry, call))
        except Exception as exc:  # RecursiveLoad: the flights led so far end with it
            for _, k, _, call in lead:
                with contextlib.suppress(Exception):
                    self._flight._lead(k, call, functools.partial(_finish, Failed(exc)))
            raise
        failure: BaseException | None = None
        if lead:
            failure = self._lead_many(lead, load_many, cache_if, found)
        for key, _k, _entry, call in wait:
            try:
                found[key] = self._join_wait(call)
            except Exception as exc:
                failure = failure or exc
        if failure is not None:
            raise failure

    def _lead_many(
        self,
        lead: list[tuple[Any, Hashable, Entry[Any] | None, _Call]],
        load_many: Callable[[list[Any]], Any],
        cache_if: Callable[[Any], bool] | None,
        found: dict[Any, Any],
    ) -> Exception | None:
        """Load the keys this caller leads together, and finish each key's flight with
        its outcome. Returns the first key's error, if any."""
        flight = self._flight
        calls = [call for _, _, _, call in lead]
        # The batch is part of each key's load: a loader asking for one of them recurses.
        token = _leading.set((*_leading.get(), *calls))
        outcomes: list[Any] | None = None
        error: BaseException | None = None
        try:
            outcomes = engine.load_many(
                self._host,
                [k for _, k, _, _ in lead],
                [key for key, _, _, _ in lead],
                [entry for _, _, entry, _ in lead],
                calls,
                load_many,
                cache_if,
            )
        except BaseException as exc:
            error = exc
            raise
        finally:
            _leading.reset(token)
            failure: Exception | None = None
            # Each flight ends with its key's outcome, or what ended the batch: the
            # same error for every caller, an interrupt as LoadAbandoned.
            ended = Failed(
                error
                if isinstance(error, Exception)
                else LoadAbandoned("the batch load ended early")
            )
            for i, (key, k, _, call) in enumerate(lead):
                result = ended if outcomes is None else outcomes[i]
                try:
                    found[key] = flight._lead(k, call, functools.partial(_finish, result))
                except Exception as exc:
                    failure = failure or exc
        return failure

    def get_many(self, keys: Iterable[K]) -> dict[K, V]:
        """The cached values of ``keys`` that are there (fresh or still servable
        stale), in one store round trip; missing keys are left out. Never loads
        and never raises a cached error."""
        ks = self._many(keys)
        return self._looked_up_many(ks, engine.read_many(self._host, list(ks.values())))

    def get(self, key: Hashable, default: Any = None) -> V | Any:
        """The cached value of ``key`` (fresh or still servable stale), else ``default``.

        Never loads and never raises a cached error.
        """
        return engine.lookup(self._host, self._key(key), default)

    def set(self, key: Hashable, value: V, ttl: float | None = None) -> None:
        """Store ``value`` for ``ttl`` seconds (default: the cache's ``ttl``).

        An in-flight load of ``key`` still answers its callers but is not stored.
        """
        engine.store_value(self._host, self._key(key), value, ttl)

    def invalidate(self, key: Hashable) -> None:
        """Drop ``key``'s entry and fence any in-flight load of it (its result is not stored)."""
        engine.invalidate(self._host, self._key(key))

    def refresh(self, key: Hashable, loader: Callable[[], V]) -> V:
        """Load ``key`` now, whatever is cached, and store the result.

        Joins a load of ``key`` already in flight rather than starting another.
        If the load fails while a servable value is cached, that value is kept
        and returned (stale-if-error), as for background refreshes.
        """
        k = self._key(key)
        call, leader = self._flight._join(k)
        if leader:
            load = functools.partial(engine.reload, self._host, k, loader)
            return self._flight._lead(k, call, load)
        return self._join_wait(call)

    def clear(self) -> None:
        """Drop this cache's entries (its namespace) and fence every in-flight load."""
        engine.clear(self._host)


def _finish(result: Any, _call: _Call) -> Any:
    return outcome(result)


def _one(load_many: Callable[[list[Any]], Any], key: Any) -> Any:
    """One key's value through the batch loader (a background refresh of the key)."""
    return picked(call_loader(functools.partial(load_many, [key])), key)


def _not_started(_call: _Call) -> Any:
    raise RuntimeError("the background refresh could not start (interpreter shutting down)")

"""``CoalescingCache``: the sync shell.

Read the entry, let the policy decide, and on a miss lead or join the key's
single flight. Background refreshes (XFetch, stale-while-revalidate) run on a
small shared thread pool, reserved in the flight map first so a key never
has two refreshes at once and foreground misses join the running one.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import functools
import inspect
import os
import threading
from collections.abc import Callable, Hashable
from typing import Any

from . import _lease
from ._core import CacheCore, V, log
from ._entry import MISSING, Entry
from ._singleflight import SingleFlight, _Call, _leading

REFRESH_WORKERS = 8

_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


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
    _pool_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


class CoalescingCache(CacheCore[V]):
    """A cache whose misses load once for all concurrent callers.

    Wraps ``backend`` (``None`` for a bounded in-process LRU, a ``dict``, a
    cachetools or cachebox cache, any mutable mapping, a diskcache or Redis
    client, or a URL). The guarantees are listed in docs/guarantees.md.
    """

    _flight: SingleFlight

    def _in_flight(self) -> SingleFlight:
        return self._flight

    def _setup(self) -> None:
        self._flight = SingleFlight()

    def get_or_load(self, key: Hashable, loader: Callable[[], V]) -> V:
        """The cached value of ``key``, loading it with ``loader()`` when missing.

        Concurrent callers of a missing key share one ``loader()`` call and its
        result or exception. Raises the loader's exception, a negative-cached
        error (a new instance of its type), ``LoadTimeout`` when a wait runs
        past ``wait_timeout``, ``RecursiveLoad`` when ``loader`` asks for
        ``key``, ``BlockingWaitInLoop`` when waiting would block a running
        event loop.
        """
        make_key = self._make_key
        k = key if make_key is None else make_key(key)
        try:
            entry = self._get(k)
        except Exception as exc:
            entry = self._read_failed(exc)
        if entry is not None:
            try:
                if self._clock() < entry.check_at:
                    self._counters.hits += 1
                    return entry.value  # type: ignore[return-value]
            except (AttributeError, TypeError):  # not an Entry: _slow counts and drops it
                pass
        return self._slow(k, loader, entry)

    def _slow(self, k: Hashable, loader: Callable[[], V], entry: Any) -> V:
        found = self._from_store(k, loader, entry)
        if found is not MISSING:
            return found
        call, leader = self._flight._join(k)
        if leader:
            previous = self._valid(entry, count_foreign=False)
            load = functools.partial(self._load, k, loader, previous)
            return self._flight._lead(k, call, load)
        return self._join_wait(call)

    def _join_wait(self, call: Any) -> V:
        """Wait for another caller's load of the key: counted, and timed for the hook."""
        self._counters.coalesced += 1  # before waiting: tests poll it to see waiters
        if self._metrics is None:
            return self._flight._wait(call, self._wait_timeout)  # type: ignore[no-any-return]
        started = self._clock()
        try:
            return self._flight._wait(call, self._wait_timeout)  # type: ignore[no-any-return]
        finally:
            self._emit("coalesced", self._clock() - started)

    def _load(
        self,
        k: Hashable,
        loader: Callable[[], V],
        previous: Entry[V] | None,
        call: _Call,
        force: bool = False,
        background: bool = False,
        early: bool = False,
    ) -> V:
        if self._distributed:
            local = functools.partial(self._load_here, k, loader, previous, call, force)
            return _lease.load(
                self,
                k,
                loader,
                previous,
                call,
                force=force,
                background=background,
                early=early,
                local_load=local,
            )
        return self._load_here(k, loader, previous, call, force)

    def _load_here(
        self,
        k: Hashable,
        loader: Callable[[], V],
        previous: Entry[V] | None,
        call: _Call,
        force: bool = False,
    ) -> V:
        if not force:
            current = self._read(k, count_foreign=False)
            found, previous = self._second_look(current, previous)
            if found is not None:
                return self._answer(found)
        started = self._clock()
        try:
            value = loader()
            if inspect.isawaitable(value):
                _discard(value)
                raise TypeError(
                    "the loader returned an awaitable, which a sync cache would store "
                    "unawaited: use AsyncCoalescingCache (or @cached on the async def)"
                )
        except BaseException as exc:
            instead = self._failed(k, call, exc, previous, started)
            if instead is MISSING:
                raise
            return instead
        return self._stored(k, call, value, started)

    def _refresh(self, k: Hashable, loader: Callable[[], V], entry: Entry[V], early: bool) -> None:
        if not self._refresh_wanted(k):
            return
        call = self._flight._reserve(k)
        if call is None:
            return  # a load or refresh of this key is already running
        self._refresh_started(early)
        run = functools.partial(self._run_refresh, k, loader, entry, call, early)
        try:
            # In the reader's context, as asyncio tasks would be.
            context = contextvars.copy_context()
            context.run(_leading.set, ())  # not part of the reader's loads
            _refresher().submit(context.run, run)
        except RuntimeError:  # the pool is shut down: the interpreter is exiting
            with contextlib.suppress(RuntimeError):  # the reader still gets its value
                self._flight._lead(k, call, _not_started)

    def _run_refresh(
        self, k: Hashable, loader: Callable[[], V], entry: Entry[V], call: _Call, early: bool
    ) -> None:
        try:
            load = functools.partial(self._load, k, loader, entry, background=True, early=early)
            self._flight._lead(k, call, load)
        except Exception:
            log.warning("background refresh of %r failed", k, exc_info=True)

    def get(self, key: Hashable, default: Any = None) -> V | Any:
        """The cached value of ``key`` (fresh or still servable stale), else ``default``.

        Never loads and never raises a cached error.
        """
        return self._lookup(self._key(key), default)

    def set(self, key: Hashable, value: V, ttl: float | None = None) -> None:
        """Store ``value`` for ``ttl`` seconds (default: the cache's ``ttl``).

        An in-flight load of ``key`` still answers its callers but is not stored.
        """
        self._set_entry(self._key(key), value, ttl)

    def invalidate(self, key: Hashable) -> None:
        """Drop ``key``'s entry and fence any in-flight load of it (its result is not stored)."""
        self._invalidate(self._key(key))

    def refresh(self, key: Hashable, loader: Callable[[], V]) -> V:
        """Load ``key`` now, whatever is cached, and store the result.

        Joins a load of ``key`` already in flight rather than starting another.
        If the load fails while a servable value is cached, that value is kept
        and returned (stale-if-error), as for background refreshes.
        """
        k = self._key(key)
        call, leader = self._flight._join(k)
        if leader:
            load = functools.partial(self._load, k, loader, self._read(k), force=True)
            return self._flight._lead(k, call, load)
        return self._join_wait(call)

    def clear(self) -> None:
        """Drop this cache's entries (its namespace) and fence every in-flight load."""
        self._clear()


def _discard(awaitable: Any) -> None:
    close = getattr(awaitable, "close", None)  # a coroutine: no "never awaited" warning
    if close is not None:
        close()


def _not_started(_call: _Call) -> Any:
    raise RuntimeError("the background refresh could not start (interpreter shutting down)")

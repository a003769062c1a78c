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
from collections.abc import Callable, Hashable
from typing import Any

from ._base import CacheBase, V
from ._entry import MISSING, Entry
from ._policy import Decision
from ._singleflight import SingleFlight, _Call, _leading
from ._sync import engine

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

    def get_or_load(self, key: Hashable, loader: Callable[[], V]) -> V:
        """The cached value of ``key``, loading it with ``loader()`` when missing.

        Concurrent callers of a missing key share one ``loader()`` call and its
        result or exception. Raises the loader's exception, a negative-cached
        error (a new instance of its type), ``LoadTimeout`` when a wait runs
        past ``wait_timeout``, ``RecursiveLoad`` when ``loader`` asks for
        ``key``, ``BlockingWaitInLoop`` when waiting would block a running
        event loop, ``TypeError`` when ``loader`` returns an awaitable.
        """
        make_key = self._make_key
        k = key if make_key is None else make_key(key)
        value = self._peek(k)
        if value is MISSING:
            return self._slow(k, loader)
        return value  # type: ignore[no-any-return]

    def _slow(self, k: Hashable, loader: Callable[[], V]) -> V:
        """Everything but a plain hit: read, decide, serve, refresh, or load."""
        host = self._host
        entry = engine.read(host, k)
        decision = host.served(entry)  # counted; a negative entry raises its error here
        if decision is Decision.MISS:
            call, leader = self._flight._join(k)
            if leader:
                load = functools.partial(engine.load, host, k, loader, entry)
                return self._flight._lead(k, call, load)  # type: ignore[no-any-return]
            return self._join_wait(call)
        assert entry is not None
        if decision is Decision.REFRESH or decision is Decision.STALE:
            self._refresh(k, loader, entry, early=decision is Decision.REFRESH)
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

    def _refresh(self, k: Hashable, loader: Callable[[], V], entry: Entry[V], early: bool) -> None:
        """Start one background refresh of ``k`` (unless one runs already)."""
        if not self._host.refresh_wanted(k):
            return
        call = self._flight._reserve(k)
        if call is None:
            return  # a load or refresh of this key is already running
        self._host.refresh_started(early)
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
        host = self._host
        try:
            load = functools.partial(
                engine.load, host, k, loader, entry, background=True, early=early
            )
            self._flight._lead(k, call, load)
        except Exception:
            log.warning("background refresh of %r failed", k, exc_info=True)

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


def _not_started(_call: _Call) -> Any:
    raise RuntimeError("the background refresh could not start (interpreter shutting down)")

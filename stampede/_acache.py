"""``AsyncCoalescingCache``: the asyncio shell.

The same steps as ``CoalescingCache`` (all decisions live in ``_core`` and
``_policy``); what differs is that every load, foreground or background, runs
as its own task in ``AsyncSingleFlight``, and every caller, the first one
included, waits for that task without owning it. So:

- a cancelled caller withdraws alone; the load goes on and is stored;
- when every caller has left, the load still completes and is stored (the
  next reader gets it); ``invalidate`` is how to drop it;
- ``wait_timeout`` bounds the wait of every caller, the first one too (the
  sync cache's first caller runs the loader itself and cannot time out).

The loader may be a coroutine function, a function returning an awaitable
(``lambda: fetch(key)``), or a plain function; a plain function runs on the
event loop's thread, so wrap blocking I/O in ``asyncio.to_thread`` yourself.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import weakref
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

from . import _lease
from ._core import CacheCore, V, log
from ._entry import MISSING, Entry
from ._singleflight import AsyncSingleFlight, _AsyncCall


class AsyncCoalescingCache(CacheCore[V]):
    """The asyncio twin of ``CoalescingCache``: same parameters, async methods."""

    _asynchronous = True
    _flight: AsyncSingleFlight

    def _in_flight(self) -> AsyncSingleFlight:
        return self._flight

    def _setup(self) -> None:
        self._flight = AsyncSingleFlight()
        self._remote = not self._backend.local
        # Fencing locks of remote stores, per event loop (asyncio locks bind to one).
        self._alocks: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, tuple[asyncio.Lock, ...]
        ] = weakref.WeakKeyDictionary()

    async def get_or_load(self, key: Hashable, loader: Callable[[], Awaitable[V] | V]) -> V:
        """The cached value of ``key``, loading it with ``loader()`` when missing.

        See ``CoalescingCache.get_or_load``; a cancelled caller leaves the load
        running for the others.
        """
        make_key = self._make_key
        k = key if make_key is None else make_key(key)
        try:
            entry = await self._backend.aget(k) if self._remote else self._get(k)  # type: ignore[union-attr]
        except Exception as exc:
            entry = self._read_failed(exc)
        if entry is not None:
            try:
                if self._clock() < entry.check_at:
                    self._counters.hits += 1
                    return entry.value  # type: ignore[return-value]
            except (AttributeError, TypeError):  # not an Entry: _slow counts and drops it
                pass
        return await self._slow(k, loader, entry)

    async def _slow(self, k: Hashable, loader: Callable[[], Awaitable[V] | V], entry: Any) -> V:
        found = self._from_store(k, loader, entry)
        if found is not MISSING:
            return found
        previous = self._valid(entry, count_foreign=False)
        load = functools.partial(self._load, k, loader, previous)
        call, leader = self._flight._join(k, load)
        if leader:
            return await self._flight._wait(call, self._wait_timeout)  # type: ignore[no-any-return]
        return await self._join_wait(call)

    async def _join_wait(self, call: Any) -> V:
        """Wait for another caller's load of the key: counted, and timed for the hook."""
        self._counters.coalesced += 1  # before waiting: tests poll it to see waiters
        if self._metrics is None:
            return await self._flight._wait(call, self._wait_timeout)  # type: ignore[no-any-return]
        started = self._clock()
        try:
            return await self._flight._wait(call, self._wait_timeout)  # type: ignore[no-any-return]
        finally:
            self._emit("coalesced", self._clock() - started)

    async def _load(
        self,
        k: Hashable,
        loader: Callable[[], Awaitable[V] | V],
        previous: Entry[V] | None,
        call: _AsyncCall,
        force: bool = False,
        background: bool = False,
        early: bool = False,
    ) -> V:
        if self._distributed:
            local = functools.partial(self._load_here, k, loader, previous, call, force)
            return await _lease.aload(
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
        return await self._load_here(k, loader, previous, call, force)

    async def _load_here(
        self,
        k: Hashable,
        loader: Callable[[], Awaitable[V] | V],
        previous: Entry[V] | None,
        call: _AsyncCall,
        force: bool = False,
    ) -> V:
        if not force:
            current = await self._io_read(k, count_foreign=False)
            found, previous = self._second_look(current, previous)
            if found is not None:
                return self._answer(found)
        started = self._clock()
        try:
            value = await _lease.call_loader(loader)
        except BaseException as exc:
            entry, instead, spent = self._failure(k, call, exc, previous, started)
            if entry is not None:
                await self._io_commit(k, call, entry)
            self._count_load("load_errors", spent)
            if instead is MISSING:
                raise
            return instead
        stored, delta = self._loaded(value, started)
        await self._io_commit(k, call, stored)
        self._count_load("loads", delta)
        return value

    def _refresh(
        self,
        k: Hashable,
        loader: Callable[[], Awaitable[V] | V],
        entry: Entry[V],
        early: bool,
    ) -> None:
        if not self._refresh_wanted(k):
            return
        run = functools.partial(self._run_refresh, k, loader, entry, early)
        if self._flight._reserve(k, run) is not None:
            self._refresh_started(early)

    async def _run_refresh(
        self,
        k: Hashable,
        loader: Callable[[], Awaitable[V] | V],
        entry: Entry[V],
        early: bool,
        call: _AsyncCall,
    ) -> V:
        try:
            return await self._load(k, loader, entry, call, background=True, early=early)
        except Exception:
            log.warning("background refresh of %r failed", k, exc_info=True)
            raise  # callers that joined the refresh share its error

    # -- store I/O: in-memory stores are called directly, remote ones awaited --------

    async def _io_read(self, k: Hashable, count_foreign: bool = True) -> Entry[V] | None:
        if not self._remote:
            return self._read(k, count_foreign)
        try:
            entry = await self._backend.aget(k)  # type: ignore[union-attr]
        except Exception as exc:
            return self._read_failed(exc, count_foreign)
        return self._valid(entry, count_foreign)

    def _alocks_of_loop(self) -> tuple[asyncio.Lock, ...]:
        loop = asyncio.get_running_loop()
        locks = self._alocks.get(loop)
        if locks is None:
            locks = self._alocks.setdefault(loop, tuple(asyncio.Lock() for _ in range(16)))
        return locks

    def _alock_for(self, k: Hashable) -> asyncio.Lock:
        locks = self._alocks_of_loop()
        return locks[hash(k) % len(locks)]

    async def _io_commit(self, k: Hashable, call: _AsyncCall, entry: Entry[Any]) -> bool:
        if not self._remote:
            return self._commit(k, call, entry)
        # The lock spans the write: an invalidate of this key either marks the call
        # forgotten before the check, or deletes after the write has landed.
        failure: Exception | None = None
        async with self._alock_for(k):
            fenced = call.forgotten
            if not fenced:
                try:
                    await self._backend.aset(k, entry)  # type: ignore[union-attr]
                except Exception as exc:
                    failure = exc
        return self._committed(fenced, failure)

    # -- the public API ----------------------------------------------------------------

    async def get(self, key: Hashable, default: Any = None) -> V | Any:
        """The cached value of ``key`` (fresh or still servable stale), else ``default``."""
        return self._looked_up(await self._io_read(self._key(key)), default)

    async def set(self, key: Hashable, value: V, ttl: float | None = None) -> None:
        """Store ``value`` for ``ttl`` seconds; an in-flight load of ``key`` is not stored."""
        k = self._key(key)
        if not self._remote:
            self._set_entry(k, value, ttl)
            return
        entry = self._new_entry(value, ttl, await self._io_read(k))
        async with self._alock_for(k):
            self._flight.forget(k)
            if self._distributed:  # write and fence the fleet's load in one step
                await self._backend.alease_break(str(k), False, entry)  # type: ignore[union-attr]
            else:
                await self._backend.aset(k, entry)  # type: ignore[union-attr]

    async def invalidate(self, key: Hashable) -> None:
        """Drop ``key``'s entry and fence any in-flight load of it."""
        k = self._key(key)
        if not self._remote:
            self._invalidate(k)
            return
        async with self._alock_for(k):
            self._flight.forget(k)
            if self._distributed:
                await self._backend.alease_break(str(k), drop_value=True)  # type: ignore[union-attr]
            else:
                await self._backend.adelete(k)  # type: ignore[union-attr]

    async def refresh(self, key: Hashable, loader: Callable[[], Awaitable[V] | V]) -> V:
        """Load ``key`` now and store the result; see ``CoalescingCache.refresh``."""
        k = self._key(key)
        load = functools.partial(self._load, k, loader, await self._io_read(k), force=True)
        call, leader = self._flight._join(k, load)
        if leader:
            return await self._flight._wait(call, self._wait_timeout)  # type: ignore[no-any-return]
        return await self._join_wait(call)

    async def clear(self) -> None:
        """Drop this cache's entries (its namespace) and fence every in-flight load."""
        if not self._remote:
            self._clear()
            return
        async with contextlib.AsyncExitStack() as stack:
            for lock in self._alocks_of_loop():  # every stripe: no commit runs meanwhile
                await stack.enter_async_context(lock)
            self._flight._forget_all()
            await self._backend.aclear()  # type: ignore[union-attr]

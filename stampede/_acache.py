"""``AsyncCoalescingCache``: the asyncio shell.

The same steps as ``CoalescingCache`` (the load itself is the engine's,
``_async/engine.py``, from which the sync one is generated); what differs is
that every load, foreground or background, runs as its own task in
``AsyncSingleFlight``, and every caller, the first one included, waits for
that task without owning it. So:

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
import functools
import logging
from collections.abc import Awaitable, Callable, Hashable, Iterable, Mapping
from typing import Any, TypeVar

from ._async import engine
from ._base import CacheBase, V
from ._entry import MISSING, Entry
from ._errors import LoadAbandoned
from ._leader import outcome, picked
from ._policy import Decision
from ._primitives import acall_loader
from ._singleflight import AsyncSingleFlight, _AsyncCall, _leading

K = TypeVar("K", bound=Hashable)

log = logging.getLogger("stampede")


class AsyncCoalescingCache(CacheBase[V]):
    """The asyncio twin of ``CoalescingCache``: same parameters, async methods."""

    _asynchronous = True
    _flight: AsyncSingleFlight

    async def get_or_load(
        self,
        key: Hashable,
        loader: Callable[[], Awaitable[V] | V],
        *,
        cache_if: Callable[[V], bool] | None = None,
    ) -> V:
        """The cached value of ``key``, loading it with ``loader()`` when missing.

        See ``CoalescingCache.get_or_load``; a cancelled caller leaves the load
        running for the others.
        """
        make_key = self._make_key
        k = key if make_key is None else make_key(key)
        value = self._peek(k)
        if value is MISSING:
            return await self._slow(k, loader, cache_if)
        return value  # type: ignore[no-any-return]

    async def _slow(
        self,
        k: Hashable,
        loader: Callable[[], Awaitable[V] | V],
        cache_if: Callable[[Any], bool] | None = None,
    ) -> V:
        """Everything but a plain hit: read, decide, serve, refresh, or load."""
        host = self._host
        entry = await engine.read(host, k)
        decision = host.served(entry)  # counted; a negative entry raises its error here
        if decision is Decision.MISS:
            load = functools.partial(engine.load, host, k, loader, entry, cache_if=cache_if)
            call, leader = self._flight._join(k, load)
            if leader:
                return await self._flight._wait(call, self._options.wait_timeout)  # type: ignore[no-any-return]
            return await self._join_wait(call)
        assert entry is not None
        if decision is Decision.REFRESH or decision is Decision.STALE:
            self._refresh(k, loader, entry, decision is Decision.REFRESH, cache_if)
            if decision is Decision.REFRESH and self._near is not None:
                self._near.refreshing(k, entry)
        return entry.value  # type: ignore[return-value]

    async def _join_wait(self, call: _AsyncCall) -> V:
        """Wait for another caller's load of the key: counted, and timed for the hook."""
        self._counters.coalesced += 1  # before waiting: tests poll it to see waiters
        timeout = self._options.wait_timeout
        if self._rec.metrics is None:
            return await self._flight._wait(call, timeout)  # type: ignore[no-any-return]
        started = self._clock()
        try:
            return await self._flight._wait(call, timeout)  # type: ignore[no-any-return]
        finally:
            self._rec.emit("coalesced", self._clock() - started)

    def _refresh(
        self,
        k: Hashable,
        loader: Callable[[], Awaitable[V] | V],
        entry: Entry[V],
        early: bool,
        cache_if: Callable[[Any], bool] | None = None,
    ) -> None:
        """Start one background refresh of ``k`` as a task (unless one runs already)."""
        if not self._host.refresh_wanted(k):
            return
        run = functools.partial(self._run_refresh, k, loader, entry, early, cache_if)
        if self._flight._reserve(k, run) is not None:
            self._host.refresh_started(early)

    async def _run_refresh(
        self,
        k: Hashable,
        loader: Callable[[], Awaitable[V] | V],
        entry: Entry[V],
        early: bool,
        cache_if: Callable[[Any], bool] | None,
        call: _AsyncCall,
    ) -> V:
        try:
            return await engine.load(
                self._host, k, loader, entry, call, background=True, early=early, cache_if=cache_if
            )
        except Exception:
            log.warning("background refresh of %r failed", k, exc_info=True)
            raise  # callers that joined the refresh share its error

    # -- many keys at once ----------------------------------------------------------------

    async def get_or_load_many(
        self,
        keys: Iterable[K],
        load_many: Callable[[list[K]], Awaitable[Mapping[K, V]] | Mapping[K, V]],
        *,
        cache_if: Callable[[V], bool] | None = None,
    ) -> dict[K, V]:
        """The cached values of ``keys``, the missing ones loaded by one
        ``load_many(missing_keys)`` call; see ``CoalescingCache.get_or_load_many``.

        A cancelled caller leaves the loads running for the others.
        """
        return await self._get_or_load_many(self._many(keys), load_many, cache_if)

    async def _get_or_load_many(
        self,
        ks: dict[Any, Hashable],
        load_many: Callable[[list[Any]], Any],
        cache_if: Callable[[Any], bool] | None,
    ) -> dict[Any, Any]:
        """``get_or_load_many`` of the keys in ``ks``, given with their store keys."""
        found: dict[Any, Any] = {}
        todo = self._peek_many(ks, found)
        if todo:
            await self._load_many([(key, ks[key]) for key in todo], load_many, cache_if, found)
        return {key: found[key] for key in ks}

    async def _load_many(
        self,
        todo: list[tuple[Any, Hashable]],
        load_many: Callable[[list[Any]], Any],
        cache_if: Callable[[Any], bool] | None,
        found: dict[Any, Any],
    ) -> None:
        """See ``CoalescingCache._load_many``: every key runs as its own task, and the
        tasks of the keys this caller leads share one batch load."""
        host = self._host
        entries = await engine.read_many(host, [k for _, k in todo])
        one = functools.partial(_one, load_many)
        missing = self._served_many(todo, entries, one, cache_if, found)
        if not missing:
            return
        flight = self._flight
        loop = asyncio.get_running_loop()
        # The batch's outcomes, made before any key's task can run and look for them
        # (an eager task factory runs a task as it is made).
        batch: asyncio.Future[list[Any]] = loop.create_future()
        lead: list[tuple[Any, Hashable, Entry[Any] | None, _AsyncCall]] = []
        calls: list[tuple[Any, _AsyncCall, bool]] = []
        try:
            for key, k, entry in missing:
                part = functools.partial(_batch_part, batch, len(lead))
                call, leader = flight._join(k, part)
                calls.append((key, call, leader))
                if leader:
                    lead.append((key, k, entry, call))
        except Exception as exc:  # RecursiveLoad: the key tasks started so far end with it
            batch.set_exception(exc)
            batch.exception()  # retrieved here: no key task may be left to read it
            raise
        if not lead:
            batch.cancel()
        else:
            # The batch is part of each key's load (recursion is detected).
            load = engine.load_many(
                host,
                [k for _, k, _, _ in lead],
                [key for key, _, _, _ in lead],
                [entry for _, _, entry, _ in lead],
                [call for _, _, _, call in lead],
                load_many,
                cache_if,
            )
            token = _leading.set((*_leading.get(), *(call for _, _, _, call in lead)))
            try:
                task = loop.create_task(load)
            finally:
                _leading.reset(token)
            task.add_done_callback(functools.partial(_settle, batch))
        failure: Exception | None = None
        for key, call, leader in calls:
            try:
                if leader:
                    found[key] = await flight._wait(call, self._options.wait_timeout)
                else:
                    found[key] = await self._join_wait(call)
            except Exception as exc:
                failure = failure or exc
        if failure is not None:
            raise failure

    # -- the public API ----------------------------------------------------------------

    async def get_many(self, keys: Iterable[K]) -> dict[K, V]:
        """The cached values of ``keys`` that are there; see ``CoalescingCache.get_many``."""
        ks = self._many(keys)
        return self._looked_up_many(ks, await engine.read_many(self._host, list(ks.values())))

    async def get(self, key: Hashable, default: Any = None) -> V | Any:
        """The cached value of ``key`` (fresh or still servable stale), else ``default``."""
        return await engine.lookup(self._host, self._key(key), default)

    async def set(self, key: Hashable, value: V, ttl: float | None = None) -> None:
        """Store ``value`` for ``ttl`` seconds; an in-flight load of ``key`` is not stored."""
        await engine.store_value(self._host, self._key(key), value, ttl)

    async def invalidate(self, key: Hashable) -> None:
        """Drop ``key``'s entry and fence any in-flight load of it."""
        await engine.invalidate(self._host, self._key(key))

    async def refresh(self, key: Hashable, loader: Callable[[], Awaitable[V] | V]) -> V:
        """Load ``key`` now and store the result; see ``CoalescingCache.refresh``."""
        k = self._key(key)
        load = functools.partial(engine.reload, self._host, k, loader)
        call, leader = self._flight._join(k, load)
        if leader:
            return await self._flight._wait(call, self._options.wait_timeout)  # type: ignore[no-any-return]
        return await self._join_wait(call)

    async def clear(self) -> None:
        """Drop this cache's entries (its namespace) and fence every in-flight load."""
        await engine.clear(self._host)


async def _batch_part(batch: asyncio.Future[list[Any]], i: int, _call: _AsyncCall) -> Any:
    """A key's task in a batch: the batch load's outcome for its key."""
    outcomes = await asyncio.shield(batch)  # the batch outlives any one key's task
    return outcome(outcomes[i])


def _settle(batch: asyncio.Future[list[Any]], task: asyncio.Task[list[Any]]) -> None:
    """The batch task's end, handed to the keys' tasks."""
    if batch.done():
        return
    if task.cancelled():
        batch.set_exception(LoadAbandoned("the batch load was cancelled"))
    elif task.exception() is not None:
        batch.set_exception(task.exception())  # type: ignore[arg-type]
    else:
        batch.set_result(task.result())


async def _one(load_many: Callable[[list[Any]], Any], key: Any) -> Any:
    """One key's value through the batch loader (a background refresh of the key)."""
    return picked(await acall_loader(functools.partial(load_many, [key])), key)

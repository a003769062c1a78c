"""Distributed single-flight (``distributed=True``): one load per key for the fleet.

Layered: the process's own single-flight first, so one process asks for a
key's lease once whatever its number of threads; then a lease in the shared
store, taken with a random token (Redis ``SET NX PX``, diskcache ``add``).

The leader keeps the lease alive while its loader runs (a renewer thread,
every third of ``lease_ttl``) and writes the value with a script that checks
the token first, frees the lease and wakes the waiters (Redis pub/sub). A
leader that lost its lease (paused, partitioned, fenced by ``invalidate``)
can neither write nor free another's lease: its callers get its value, the
store does not. A leader that dies leaves a lease that expires by itself;
a waiter then takes it over.

Waiters in other processes wait for the wake-up, with a bounded poll as the
fallback, then look again: one round trip both reads the value and tries the
lease, so a waiter sends about three commands per flight. Background
refreshes (XFetch, stale-while-revalidate) try the lease once and, if someone
else holds it, leave the refresh to them: one refresh per key for the fleet.

If the store fails, the load goes on without it (the local single-flight
still holds for this process), or raises ``BackendUnavailable`` when asked to.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import TYPE_CHECKING, Any, TypeVar

from ._entry import MISSING, Entry
from ._errors import BackendUnavailable, LoadTimeout
from .backends._shared import StoreBusy

if TYPE_CHECKING:
    from ._acache import AsyncCoalescingCache
    from ._cache import CoalescingCache
    from ._singleflight import _AsyncCall, _Call

V = TypeVar("V")


class Renewer:
    """Keeps a lease alive while a loader runs; notices when it was lost."""

    def __init__(self, store: Any, key: str, token: str, lease_ttl: float) -> None:
        self.lost = False
        self._store, self._key, self._token, self._ttl = store, key, token, lease_ttl
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stampede-lease", daemon=True)

    def __enter__(self) -> Renewer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(self._ttl)

    def _run(self) -> None:
        while not self._stop.wait(self._ttl / 3):
            try:
                if not self._store.lease_renew(self._key, self._token, self._ttl):
                    self.lost = True  # taken over, or fenced: the write will be refused
                    return
            except Exception:  # the store is away; the lease may still hold
                continue


async def call_loader(loader: Callable[[], Awaitable[V] | V]) -> V:
    """Run ``loader``, a coroutine function or a plain one, and return its value."""
    result = loader()
    if inspect.isawaitable(result):
        return await result
    return result


# -- the decisions both flavours share --------------------------------------------------

ANSWER, LEAD, SKIP, WAIT = "answer", "lead", "skip", "wait"


def look(
    cache: Any,
    k: Hashable,
    taken: bool,
    current: Entry[V] | None,
    previous: Entry[V] | None,
    *,
    force: bool,
    background: bool,
) -> tuple[str, Entry[V] | None, Entry[V] | None]:
    """After a lease attempt: (what to do, the entry that answers, the fallback value).

    ANSWER: ``found`` answers the call (free the lease first if ``taken``);
    LEAD: load; SKIP: a background refresh someone else runs (noted, so that
    this process leaves it alone for a moment); WAIT: wait.
    """
    found, previous = (None, previous) if force else cache._second_look(current, previous)
    if found is not None:
        return ANSWER, found, previous
    if taken:
        return LEAD, None, previous
    if background and previous is not None:
        cache._note_refreshing_elsewhere(k)
        return SKIP, None, previous
    return WAIT, None, previous


class Patience:
    """A waiter's bookkeeping: counts the wait once, bounds it by ``wait_timeout``,
    and tells the metrics hook how long it lasted when it ends (``finish``)."""

    def __init__(self, cache: Any) -> None:
        self._cache = cache
        self.waited = False
        self._since = 0.0
        self._timed = False
        self.poll: float = min(0.25, cache._lease_ttl / 4)
        timeout = cache._wait_timeout
        self._deadline: float | None = None if timeout is None else time.monotonic() + timeout

    def next_wait(self) -> float:
        """Seconds to wait before looking again; ``LoadTimeout`` once out of time."""
        if not self.waited:
            self.waited = True
            self._since = self._cache._clock()
            self._cache._counters.lease_waits += 1  # now; the hook hears of it at the end
        if self._deadline is None:
            return self.poll
        left = min(self.poll, self._deadline - time.monotonic())
        if left <= 0:
            raise LoadTimeout(f"no result after waiting {self._cache._wait_timeout} s for a lease")
        return left

    def finish(self) -> None:
        """The wait is over (a value, a lease, an error): time it for the hook."""
        cache = self._cache
        if self.waited and not self._timed and cache._metrics is not None:
            self._timed = True
            cache._emit("lease_waits", cache._clock() - self._since)

    def leading(self, early: bool) -> None:
        """This process took the lease and loads for the fleet."""
        if self.waited:
            self._cache._count("lease_takeovers")  # the lease waited on ended with no value
        if early:
            self._cache._count("early_refreshes")  # this process's refresh is the fleet's one


def load(
    cache: CoalescingCache[V],
    k: Hashable,
    loader: Callable[[], V],
    previous: Entry[V] | None,
    call: _Call,
    *,
    force: bool,
    background: bool,
    early: bool = False,
    local_load: Callable[[], V],
) -> V:
    """The leader of this process loads ``k`` for the fleet, or waits for who does."""
    store: Any = cache._backend
    key = str(k)
    token = secrets.token_hex(16)
    patience = Patience(cache)
    try:
        while True:
            with store.lease_listen(key) as wake:  # listening before looking: no lost wake-up
                try:
                    taken, data, remaining = store.lease_acquire(key, token, cache._lease_ttl)
                except StoreBusy:
                    wake.wait(patience.poll)  # the client's pool is full for a moment
                    continue
                except BackendUnavailable as exc:
                    cache._read_failed(exc)  # counted; raises when configured to
                    patience.finish()  # not the local load's time
                    return local_load()  # fail open: this process's single-flight only
                current = cache._decoded(key, data, remaining)
                step, found, previous = look(
                    cache, k, taken, current, previous, force=force, background=background
                )
                if step is ANSWER:
                    assert found is not None
                    if taken:
                        _release(cache, key, token)
                    return cache._answer(found)
                if step is LEAD:
                    break
                if step is SKIP:
                    assert previous is not None
                    return previous.value  # type: ignore[return-value] # someone else refreshes
                wake.wait(patience.next_wait())
    finally:
        patience.finish()
    patience.leading(early)
    started = cache._clock()
    with Renewer(store, key, token, cache._lease_ttl) as renewer:
        try:
            value = loader()
        except BaseException as exc:
            entry, instead, spent = cache._failure(k, call, exc, previous, started)
            _commit(cache, key, token, call, entry)
            cache._count_load("load_errors", spent)
            if instead is MISSING:
                raise
            return instead
    stored, delta = cache._loaded(value, started)
    if renewer.lost:
        _release(cache, key, token)
        cache._count("fenced")
    else:
        _commit(cache, key, token, call, stored)
    cache._count_load("loads", delta)
    return value


def _commit(
    cache: CoalescingCache[Any], key: str, token: str, call: _Call, entry: Entry[Any] | None
) -> None:
    """Write ``entry`` and free the lease, if both this process and the fleet allow it."""
    failure: Exception | None = None
    written = False
    with cache._lock_for(key):
        fenced = call.forgotten  # invalidated here meanwhile: only free the lease
        try:
            written = cache._backend.lease_commit(  # type: ignore[union-attr]
                key, token, None if fenced else entry
            )
        except Exception as exc:
            failure = exc
    if cache._committed(fenced, failure) and not written and entry is not None:
        cache._count("fenced")  # the lease was lost: a newer load or an invalidate wins


def _release(cache: CoalescingCache[Any], key: str, token: str) -> None:
    try:
        cache._backend.lease_commit(key, token, None)  # type: ignore[union-attr]
    except Exception as exc:
        cache._write_failed(exc)


class AsyncRenewer:
    """``Renewer`` for asyncio: a task renewing the lease while the loader runs."""

    def __init__(self, store: Any, key: str, token: str, lease_ttl: float) -> None:
        self.lost = False
        self._store, self._key, self._token, self._ttl = store, key, token, lease_ttl
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    async def __aenter__(self) -> AsyncRenewer:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        # The flag too: a client library may swallow the cancel (asyncio.wait_for
        # on Python 3.10 drops one that races its inner call's completion).
        self._stopped = True
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        while not self._stopped:
            await asyncio.sleep(self._ttl / 3)
            try:
                if not await self._store.alease_renew(self._key, self._token, self._ttl):
                    self.lost = True
                    return
            except Exception:
                continue


async def aload(
    cache: AsyncCoalescingCache[V],
    k: Hashable,
    loader: Callable[[], Awaitable[V] | V],
    previous: Entry[V] | None,
    call: _AsyncCall,
    *,
    force: bool,
    background: bool,
    early: bool = False,
    local_load: Callable[[], Awaitable[V]],
) -> V:
    """``load`` for asyncio: the same steps, awaited."""
    store: Any = cache._backend
    key = str(k)
    token = secrets.token_hex(16)
    patience = Patience(cache)
    try:
        while True:
            async with store.alease_listen(key) as wake:
                try:
                    taken, data, remaining = await store.alease_acquire(
                        key, token, cache._lease_ttl
                    )
                except StoreBusy:
                    await wake.wait(patience.poll)
                    continue
                except BackendUnavailable as exc:
                    cache._read_failed(exc)
                    patience.finish()
                    return await local_load()
                current = cache._decoded(key, data, remaining)
                step, found, previous = look(
                    cache, k, taken, current, previous, force=force, background=background
                )
                if step is ANSWER:
                    assert found is not None
                    if taken:
                        await _arelease(cache, key, token)
                    return cache._answer(found)
                if step is LEAD:
                    break
                if step is SKIP:
                    assert previous is not None
                    return previous.value  # type: ignore[return-value] # someone else refreshes
                await wake.wait(patience.next_wait())
    finally:
        patience.finish()
    patience.leading(early)
    started = cache._clock()
    async with AsyncRenewer(store, key, token, cache._lease_ttl) as renewer:
        try:
            value = await call_loader(loader)
        except BaseException as exc:
            entry, instead, spent = cache._failure(k, call, exc, previous, started)
            await _acommit(cache, key, token, call, entry)
            cache._count_load("load_errors", spent)
            if instead is MISSING:
                raise
            return instead
    stored, delta = cache._loaded(value, started)
    if renewer.lost:
        await _arelease(cache, key, token)
        cache._count("fenced")
    else:
        await _acommit(cache, key, token, call, stored)
    cache._count_load("loads", delta)
    return value


async def _acommit(
    cache: AsyncCoalescingCache[Any],
    key: str,
    token: str,
    call: _AsyncCall,
    entry: Entry[Any] | None,
) -> None:
    failure: Exception | None = None
    written = False
    async with cache._alock_for(key):
        fenced = call.forgotten
        try:
            written = await cache._backend.alease_commit(  # type: ignore[union-attr]
                key, token, None if fenced else entry
            )
        except Exception as exc:
            failure = exc
    if cache._committed(fenced, failure) and not written and entry is not None:
        cache._count("fenced")


async def _arelease(cache: AsyncCoalescingCache[Any], key: str, token: str) -> None:
    try:
        await cache._backend.alease_commit(key, token, None)  # type: ignore[union-attr]
    except Exception as exc:
        cache._write_failed(exc)

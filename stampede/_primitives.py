"""What truly differs between the sync and the async flavour, written by hand.

The leader's work is written once (``_async/engine.py``) and its sync twin is
generated (``_sync/engine.py``); the generated code calls only these:

- how a loader is called: ``call_loader`` runs a plain function and refuses
  one that returns an awaitable (a sync cache would store it unawaited);
  ``acall_loader`` awaits whatever needs awaiting;
- how a lease is kept alive while the loader runs: a thread (``Renewer``) or
  a task (``AsyncRenewer``);
- how a key's writes are fenced: striped reentrant thread locks (``Fences``),
  or, for a store reached over the network from asyncio, an ``asyncio.Lock``
  per event loop (``AsyncFences``), which is never held across a thread;
- how a key's concurrent reads share one store read (``_reads``): the fences
  of a shared store hold the read group, and leaving a key's fence (its
  write done) forgets the key's read in flight, so no reader arriving after
  a write gets a read that began before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import threading
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Iterator, Sequence
from typing import Any, Protocol, TypeVar

from ._near import NearTier
from ._reads import AsyncReadGroup, ReadGroup

V = TypeVar("V")

Loader = Callable[[], V]  # what a sync cache loads with
ALoader = Callable[[], Awaitable[V] | V]  # what an async cache loads with: may be a coroutine

STRIPES = 16  # fencing locks per cache: writes of different keys rarely queue


def call_loader(loader: Callable[[], V]) -> V:
    """Run a sync cache's ``loader``; refuse an awaitable result with a clear error."""
    value = loader()
    if inspect.isawaitable(value):
        close = getattr(value, "close", None)  # a coroutine: no "never awaited" warning
        if close is not None:
            close()
        raise TypeError(
            "the loader returned an awaitable, which a sync cache would store "
            "unawaited: use AsyncCoalescingCache (or @cached on the async def)"
        )
    return value


async def acall_loader(loader: Callable[[], Awaitable[V] | V]) -> V:
    """Run ``loader``, a coroutine function or a plain one, and return its value."""
    result = loader()
    if inspect.isawaitable(result):
        return await result
    return result


class _Renews(Protocol):
    def lease_renew(self, key: str, token: str, lease_ttl: float) -> bool: ...


class _ARenews(Protocol):
    async def alease_renew(self, key: str, token: str, lease_ttl: float) -> bool: ...


class Renewer:
    """Keeps leases alive while a loader runs (a thread); notices those that were lost.

    ``key``: one key, or the keys of a batch (``get_or_load_many``) under one token.
    """

    def __init__(
        self, store: _Renews, key: str | Sequence[str], token: str, lease_ttl: float
    ) -> None:
        self.lost_keys: set[str] = set()  # taken over, or fenced: their writes will be refused
        self._store, self._token, self._ttl = store, token, lease_ttl
        self._keys = [key] if isinstance(key, str) else list(key)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stampede-lease", daemon=True)

    @property
    def lost(self) -> bool:
        return bool(self.lost_keys)

    def __enter__(self) -> Renewer:
        if self._keys:  # (a batch may hold no lease at all)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._keys:
            self._thread.join(self._ttl)

    def _run(self) -> None:
        while not self._stop.wait(self._ttl / 3):
            for key in self._keys:
                if key in self.lost_keys or self._stop.is_set():
                    continue
                try:
                    if not self._store.lease_renew(key, self._token, self._ttl):
                        self.lost_keys.add(key)
                except Exception:  # the store is away; the lease may still hold
                    continue
            if len(self.lost_keys) == len(self._keys):
                return


class AsyncRenewer:
    """``Renewer`` for asyncio: a task renewing the leases while the loader runs."""

    def __init__(
        self, store: _ARenews, key: str | Sequence[str], token: str, lease_ttl: float
    ) -> None:
        self.lost_keys: set[str] = set()
        self._store, self._token, self._ttl = store, token, lease_ttl
        self._keys = [key] if isinstance(key, str) else list(key)
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    @property
    def lost(self) -> bool:
        return bool(self.lost_keys)

    async def __aenter__(self) -> AsyncRenewer:
        if self._keys:  # (a batch may hold no lease at all)
            self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is None:
            return
        # The flag too: a client library may swallow the cancel (asyncio.wait_for
        # on Python <= 3.11 drops one that races its inner call's completion).
        self._stopped = True
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        while not self._stopped:
            await asyncio.sleep(self._ttl / 3)
            for key in self._keys:
                if key in self.lost_keys or self._stopped:
                    continue
                try:
                    if not await self._store.alease_renew(key, self._token, self._ttl):
                        self.lost_keys.add(key)
                except Exception:
                    continue
            if len(self.lost_keys) == len(self._keys):
                return


_live_fences: weakref.WeakSet[Fences] = weakref.WeakSet()


def _after_fork() -> None:
    for fences in list(_live_fences):  # a lock held by a parent's thread would stay held here
        fences.locks = tuple(threading.RLock() for _ in fences.locks)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


class Fences:
    """Striped locks: a key's commit and its invalidation never interleave.

    Held only around a check of the call's fenced flag and the store write
    that follows. Reentrant: what runs on the thread meanwhile (a user
    mapping's write, a finalizer, a signal handler) may call the cache again.
    ``reads``: the coalesced reads of a shared store (None for a mapping of
    this process); leaving a key's fence forgets its read in flight.
    """

    def __init__(self, reads: ReadGroup | None = None, near: NearTier | None = None) -> None:
        self.locks = tuple(threading.RLock() for _ in range(STRIPES))
        self.reads = reads
        self.near = near  # a shared store's near cache: leaving a fence drops the key
        _live_fences.add(self)

    def fence(self, k: Hashable) -> contextlib.AbstractContextManager[Any]:
        lock = self.locks[hash(k) % STRIPES]
        return lock if self.reads is None else _Fence(lock, self.reads, k, self.near)

    @contextlib.contextmanager
    def fence_all(self) -> Iterator[None]:
        locks = self.locks
        for lock in locks:
            lock.acquire()
        try:
            yield
        finally:
            try:
                if self.reads is not None:
                    self.reads.forget_all()
                if self.near is not None:
                    self.near.drop_all()
            finally:
                for lock in locks:
                    lock.release()


class _Fence:
    """A key's stripe lock, held around its write; leaving it (the write done, or
    failed) forgets the key's read in flight."""

    __slots__ = ("_lock", "_reads", "_k", "_near")

    def __init__(
        self, lock: threading.RLock, reads: ReadGroup, k: Hashable, near: NearTier | None
    ) -> None:
        self._lock, self._reads, self._k, self._near = lock, reads, k, near

    def __enter__(self) -> None:
        self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        try:
            self._reads.forget(self._k)
            if self._near is not None:
                self._near.drop(self._k)
        finally:
            self._lock.release()


class _HeldOnThread:
    """A thread lock used from a coroutine: for in-process stores, whose
    writes never await, so the lock is never held across a suspension."""

    __slots__ = ("_lock",)

    def __init__(self, lock: threading.RLock) -> None:
        self._lock = lock

    async def __aenter__(self) -> None:
        self._lock.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self._lock.release()


class AsyncFences:
    """``Fences`` for the async cache.

    An in-process store is fenced by the thread locks (its writes do not
    await, and another thread's loop may share the store); a store reached
    over the network by ``asyncio.Lock``s, one set per event loop (an
    asyncio lock binds to one loop), held across the awaited write.
    """

    def __init__(self, local: bool, near: NearTier | None = None) -> None:
        self.threads = Fences() if local else None
        self.reads = None if local else AsyncReadGroup()
        self.near = near
        self._loops: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, tuple[asyncio.Lock, ...]
        ] = weakref.WeakKeyDictionary()

    def _of_loop(self) -> tuple[asyncio.Lock, ...]:
        loop = asyncio.get_running_loop()
        locks = self._loops.get(loop)
        if locks is None:
            locks = self._loops.setdefault(loop, tuple(asyncio.Lock() for _ in range(STRIPES)))
        return locks

    def fence(self, k: Hashable) -> contextlib.AbstractAsyncContextManager[Any]:
        if self.threads is not None:
            return _HeldOnThread(self.threads.locks[hash(k) % STRIPES])  # no reads to forget
        assert self.reads is not None
        return _AsyncFence(self._of_loop()[hash(k) % STRIPES], self.reads, k, self.near)

    @contextlib.asynccontextmanager
    async def fence_all(self) -> AsyncIterator[None]:
        if self.threads is not None:
            with self.threads.fence_all():
                yield
            return
        async with contextlib.AsyncExitStack() as stack:
            for lock in self._of_loop():  # every stripe: no commit runs meanwhile
                await stack.enter_async_context(lock)
            try:
                yield
            finally:
                assert self.reads is not None
                self.reads.forget_all()
                if self.near is not None:
                    self.near.drop_all()


class _AsyncFence:
    """``_Fence`` for a store reached over the network from asyncio."""

    __slots__ = ("_lock", "_reads", "_k", "_near")

    def __init__(
        self, lock: asyncio.Lock, reads: AsyncReadGroup, k: Hashable, near: NearTier | None
    ) -> None:
        self._lock, self._reads, self._k, self._near = lock, reads, k, near

    async def __aenter__(self) -> None:
        await self._lock.acquire()

    async def __aexit__(self, *exc: object) -> None:
        try:
            self._reads.forget(self._k)
            if self._near is not None:
                self._near.drop(self._k)
        finally:
            self._lock.release()

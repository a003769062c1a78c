"""What the stores shared between processes (disk, Redis) have in common.

A ``SharedStore`` keeps entries as bytes (``_envelope``) under text keys
(``_keys.encode_key``), lets the store itself expire them, and turns every
failure of the store's library into ``BackendUnavailable`` (the original as
``__cause__``) behind a circuit breaker, so a dead store costs one fast
exception per call instead of a timeout. Subclasses supply four raw
operations; the cache decides what a failure means (fail open, or raise).

A ``Codec`` is the cache's side of the bargain: its serializer, its clock,
its ``beta`` and ``cache_errors`` types, bound to the store when the cache
is made (``bind``).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import math
import sys
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Any, NoReturn

from .. import _envelope
from .._breaker import Breaker
from .._entry import Entry
from .._errors import BackendUnavailable, SerializationError
from .._keys import encode_key, namespace_prefix
from .._near import NearTier
from .._stats import Recorder

if sys.version_info >= (3, 11):

    def _cancels() -> tuple[asyncio.Task[Any] | None, int]:
        """The current task and how many cancellations it has been asked so far."""
        task = asyncio.current_task()
        return task, 0 if task is None else task.cancelling()

    def _swallowed(task: asyncio.Task[Any] | None, asked: int) -> bool:
        return task is not None and task.cancelling() > asked

else:  # pragma: no cover - Python 3.10 has no Task.cancelling()

    def _cancels() -> tuple[asyncio.Task[Any] | None, int]:
        return None, 0

    def _swallowed(task: asyncio.Task[Any] | None, asked: int) -> bool:
        return False

log = logging.getLogger("stampede")

_KEYS_KEPT = 1024  # text keys of str keys a cache keeps (key_maker)

DEFAULT_MAX_VALUE_SIZE = 1 << 20  # bytes; a larger entry is returned to callers, not stored


class CircuitOpen(BackendUnavailable):
    """The store failed repeatedly; calls fail at once until a probe succeeds."""


class StoreBusy(BackendUnavailable):
    """The client had no free connection (its pool is full): not a sign of a sick store."""


class ValueTooLarge(ValueError):
    """An encoded entry larger than the store's ``max_value_size``."""


class Codec:
    """Entry <-> bytes with the reading cache's serializer, clock, beta and error types."""

    def __init__(
        self,
        serializer: Any,
        *,
        clock: Callable[[], float],
        beta: float,
        error_types: tuple[type[BaseException], ...],
    ) -> None:
        self.serializer = serializer
        self.clock = clock
        self.beta = beta
        self.error_types = error_types
        self.domain: bytes = _envelope.clock_domain(clock)

    def dumps(self, key: str, entry: Entry[Any], now: float) -> bytes:
        return _envelope.encode(key, entry, now, self.serializer, self.domain)

    def loads(self, key: str, data: bytes, remaining: float) -> Entry[Any]:
        return _envelope.decode(
            data,
            key,
            self.serializer,
            self.clock(),
            remaining,
            self.beta,
            self.error_types,
            self.domain,
        )


class SharedStore:
    """Base of the disk and Redis stores; see the module docstring."""

    local = False
    serves_sync = True  # False: an asyncio client, only the a* methods work
    serves_async = True  # False: blocking network I/O, never on an event loop
    errors: tuple[type[BaseException], ...] = ()  # the library's exceptions to wrap
    busy_errors: tuple[type[BaseException], ...] = ()  # client-side exhaustion, not failure
    name = "store"

    def __init__(
        self,
        *,
        max_value_size: int = DEFAULT_MAX_VALUE_SIZE,
        failure_threshold: int = 3,
        cooldown: float = 5.0,
    ) -> None:
        if max_value_size < 1:
            raise ValueError("max_value_size must be positive")
        self.max_value_size = max_value_size
        self.breaker: Breaker = Breaker(failure_threshold, cooldown)
        self.codec: Codec | None = None
        self.namespace = ""
        # The counters of the cache this view is bound to (set by the cache): the
        # breaker is shared by every cache on the store, so a transition counts in
        # the cache whose call saw it.
        self.recorder: Recorder | None = None

    # -- binding to a cache ------------------------------------------------------

    def bind(self, codec: Codec, namespace: str) -> SharedStore:
        """A view of this store for one cache: its codec and namespace (same client, breaker)."""
        view = copy.copy(self)
        view.codec = codec
        view.namespace = namespace
        return view

    def key_maker(self, namespace: str) -> Callable[[Hashable], Hashable]:
        # The text of a str key is kept (a service reads the same keys over and
        # over); only a str's: keys that are equal may encode apart (1, 1.0, True).
        made: dict[str, str] = {}

        def make(key: Hashable) -> Hashable:
            if type(key) is not str:
                return encode_key(namespace, key)
            text = made.get(key)
            if text is None:
                if len(made) >= _KEYS_KEPT:
                    made.clear()
                text = made[key] = encode_key(namespace, key)
            return text

        return make

    # -- the near cache (DESIGN.md section 7) ---------------------------------------------

    # Whether writes are announced on a channel that near caches listen to (Redis);
    # without one (diskcache) a near copy is bounded by near_ttl alone.
    announces = False

    def near_watch(self, near: NearTier) -> None:
        """Keep ``near`` told of every write of this namespace (and of a lost channel).
        Called again at every fill: for an asyncio client, on the running loop."""

    # -- the cache's operations ----------------------------------------------------

    def get(self, key: Hashable) -> Entry[Any] | None:
        """The entry under ``key``, or None; ``CorruptEntry`` for unreadable bytes."""
        assert self.codec is not None and isinstance(key, str)
        data, remaining = self._call(self._get_raw, key)
        return self.decode(key, data, remaining)

    def get_many(self, keys: Sequence[str]) -> list[Entry[Any] | Exception | None]:
        """The entries under ``keys`` in one round trip (None: a miss); in place of an
        entry whose bytes cannot be read, its ``CorruptEntry``."""
        return self._decode_many(keys, self._call(self._get_many_raw, keys))

    def _decode_many(
        self, keys: Sequence[str], found: Sequence[tuple[bytes | int | None, float | None]]
    ) -> list[Entry[Any] | Exception | None]:
        entries: list[Entry[Any] | Exception | None] = []
        for key, (data, remaining) in zip(keys, found, strict=True):
            try:
                entries.append(self.decode(key, data, remaining))
            except _envelope.CorruptEntry as exc:
                entries.append(exc)
        return entries

    def set(self, key: Hashable, entry: Entry[Any]) -> None:
        """Store ``entry``; ``SerializationError`` or ``ValueTooLarge`` if it cannot be."""
        assert isinstance(key, str)
        encoded = self._encoded(key, entry)
        if encoded is not None:
            self._call(self._set_raw, key, *encoded)

    def _payload(self, key: str, entry: Entry[Any] | None) -> tuple[bytes | None, float]:
        """What a lease commit or break writes: nothing (None), or ``entry``'s bytes."""
        encoded = None if entry is None else self._encoded(key, entry)
        return (None, 0.0) if encoded is None else encoded

    def _encoded(self, key: str, entry: Entry[Any]) -> tuple[bytes, float] | None:
        """``entry``'s bytes and lifetime, None if already past serving (nothing to keep)."""
        assert self.codec is not None
        now = self.codec.clock()
        ttl = _envelope.lifetime(entry, now)
        if not ttl > 0:
            return None
        data = self.codec.dumps(key, entry, now)
        if len(data) > self.max_value_size:
            raise ValueTooLarge(
                f"the entry takes {len(data):,} bytes, more than max_value_size "
                f"({self.max_value_size:,}): returned to callers, not stored"
            )
        return data, ttl

    def delete(self, key: Hashable) -> None:
        assert isinstance(key, str)
        self._call(self._delete_raw, key)

    def clear(self, prefix: str | None = None) -> None:
        """Drop every entry of the bound namespace (or whose key rest starts with
        ``prefix``), nothing else."""
        self._call(self._clear_raw, prefix or namespace_prefix(self.namespace))

    # -- leases, for distributed=True (see stampede/distributed) --------------------------

    supports_leases = False

    def decode(
        self, key: str, data: bytes | int | None, remaining: float | None
    ) -> Entry[Any] | None:
        """The entry in ``data`` (None: a miss); ``CorruptEntry`` for unreadable bytes,
        and for an entry too large to read (``data`` is then its size, not fetched)."""
        assert self.codec is not None
        if data is None:
            return None
        if isinstance(data, int):
            raise _envelope.CorruptEntry(
                f"an entry of {data:,} bytes, more than max_value_size "
                f"({self.max_value_size:,}): not written by this cache, left unread"
            )
        if remaining is None:
            raise _envelope.CorruptEntry("an entry without an expiry: not written by stampede")
        if remaining <= 0:
            return None  # expiring this very moment: a plain miss
        return self.codec.loads(key, data, remaining)

    def lease_acquire(
        self, key: str, token: str, lease_ttl: float
    ) -> tuple[bool, bytes | int | None, float | None]:
        """Take the key's lease if free; also read the value: (taken, bytes, remaining)."""
        return self._call(self._lease_acquire_raw, key, token, lease_ttl)  # type: ignore[no-any-return]

    def lease_renew(self, key: str, token: str, lease_ttl: float) -> bool:
        return bool(self._call(self._lease_renew_raw, key, token, lease_ttl))

    def lease_commit(
        self, key: str, token: str, entry: Entry[Any] | None, drop: bool = False
    ) -> bool:
        """Write ``entry`` (None: nothing; with ``drop``: delete the key's value) and
        free the lease, only if ``token`` holds it.

        An entry that cannot be stored (``SerializationError``, ``ValueTooLarge``)
        still frees the lease, so that other processes load instead of waiting
        for it to expire, and the error is raised to be counted and logged.
        """
        data, ttl, refused = self._commit_payload(key, entry)
        written = bool(self._call(self._lease_commit_raw, key, token, data, ttl, *_dropping(drop)))
        if refused is not None:
            raise refused
        return written

    def _commit_payload(
        self, key: str, entry: Entry[Any] | None
    ) -> tuple[bytes | None, float, Exception | None]:
        """What a lease commit writes, and why not when ``entry`` cannot be stored:
        the commit then writes nothing but still frees the lease."""
        try:
            return (*self._payload(key, entry), None)
        except (SerializationError, ValueTooLarge) as exc:
            return None, 0.0, exc

    def lease_break(self, key: str, drop_value: bool, entry: Entry[Any] | None = None) -> None:
        """Free the key's lease whoever holds it (fencing its load) and, in the same
        atomic step, drop the value or write ``entry`` in its place (``set``: a load
        that commits between a write and a separate break would overwrite it)."""
        data, ttl = self._payload(key, entry)
        self._call(self._lease_break_raw, key, drop_value, data, ttl)

    def lease_listen(self, key: str) -> Any:
        """A context manager whose ``wait(timeout)`` returns when the key's lease ends."""
        raise NotImplementedError

    def _lease_acquire_raw(
        self, key: str, token: str, lease_ttl: float
    ) -> tuple[bool, bytes | int | None, float | None]:
        raise NotImplementedError

    def _lease_renew_raw(self, key: str, token: str, lease_ttl: float) -> bool:
        raise NotImplementedError

    def _lease_commit_raw(
        self, key: str, token: str, data: bytes | None, ttl: float, drop: bool = False
    ) -> bool:
        raise NotImplementedError

    def _lease_break_raw(
        self, key: str, drop_value: bool, data: bytes | None = None, ttl: float = 0.0
    ) -> None:
        raise NotImplementedError

    # async leases: a local store (disk) runs the sync ones on a worker thread

    async def alease_acquire(
        self, key: str, token: str, lease_ttl: float
    ) -> tuple[bool, bytes | int | None, float | None]:
        return await self._acall(self._alease_acquire_raw, key, token, lease_ttl)  # type: ignore[no-any-return]

    async def alease_renew(self, key: str, token: str, lease_ttl: float) -> bool:
        return bool(await self._acall(self._alease_renew_raw, key, token, lease_ttl))

    async def alease_commit(
        self, key: str, token: str, entry: Entry[Any] | None, drop: bool = False
    ) -> bool:
        data, ttl, refused = self._commit_payload(key, entry)
        written = bool(
            await self._acall(self._alease_commit_raw, key, token, data, ttl, *_dropping(drop))
        )
        if refused is not None:
            raise refused
        return written

    async def alease_break(
        self, key: str, drop_value: bool, entry: Entry[Any] | None = None
    ) -> None:
        data, ttl = self._payload(key, entry)
        await self._acall(self._alease_break_raw, key, drop_value, data, ttl)

    def alease_listen(self, key: str) -> Any:
        return _AsyncPolling()

    async def _alease_acquire_raw(
        self, key: str, token: str, lease_ttl: float
    ) -> tuple[bool, bytes | int | None, float | None]:
        return await asyncio.to_thread(self._lease_acquire_raw, key, token, lease_ttl)

    async def _alease_renew_raw(self, key: str, token: str, lease_ttl: float) -> bool:
        return await asyncio.to_thread(self._lease_renew_raw, key, token, lease_ttl)

    async def _alease_commit_raw(
        self, key: str, token: str, data: bytes | None, ttl: float, drop: bool = False
    ) -> bool:
        return await asyncio.to_thread(self._lease_commit_raw, key, token, data, ttl, drop)

    async def _alease_break_raw(
        self, key: str, drop_value: bool, data: bytes | None = None, ttl: float = 0.0
    ) -> None:
        await asyncio.to_thread(self._lease_break_raw, key, drop_value, data, ttl)

    # -- the same, for AsyncCoalescingCache ----------------------------------------------

    async def aget(self, key: Hashable) -> Entry[Any] | None:
        assert self.codec is not None and isinstance(key, str)
        data, remaining = await self._acall(self._aget_raw, key)
        return self.decode(key, data, remaining)

    async def aget_many(self, keys: Sequence[str]) -> list[Entry[Any] | Exception | None]:
        return self._decode_many(keys, await self._acall(self._aget_many_raw, keys))

    async def aset(self, key: Hashable, entry: Entry[Any]) -> None:
        assert isinstance(key, str)
        encoded = self._encoded(key, entry)
        if encoded is not None:
            await self._acall(self._aset_raw, key, *encoded)

    async def adelete(self, key: Hashable) -> None:
        assert isinstance(key, str)
        await self._acall(self._adelete_raw, key)

    async def aclear(self, prefix: str | None = None) -> None:
        await self._acall(self._aclear_raw, prefix or namespace_prefix(self.namespace))

    # Each operation on the store goes behind the breaker: the library's errors are
    # wrapped in BackendUnavailable and judged; anything else (cancellation, an
    # exhausted client pool, an error not of the store's doing) frees the probe and
    # judges nothing. Written out in both (no context manager: this is the hit path).

    def _call(self, op: Callable[..., Any], *args: Any) -> Any:
        self._admit()
        try:
            result = op(*args)
        except BaseException as exc:
            self._failed(exc)
        if self.breaker.success():
            self._breaker_moved("breaker_closed")
        return result

    async def _acall(self, op: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        # A cancellation that the client library swallowed is raised here, once the
        # operation is done, so the caller withdraws on time: redis-py awaits
        # asyncio.wait_for, which on Python <= 3.11 returns the inner call's result
        # instead of raising a cancel that arrives as it completes. Python 3.10 has
        # no Task.cancelling(), so a swallowed cancel goes unseen there
        # (docs/guarantees.md).
        task, asked = _cancels()
        self._admit()
        try:
            result = await op(*args)
        except BaseException as exc:
            self._failed(exc)
        if self.breaker.success():
            self._breaker_moved("breaker_closed")
        if _swallowed(task, asked):
            raise asyncio.CancelledError(f"{self.name}'s client library swallowed it")
        return result

    def _admit(self) -> None:
        """Raise unless an operation may go to the store now."""
        self._refuse()
        if not self.breaker.allow():
            raise CircuitOpen(f"{self.name} is failing: circuit open, not trying")

    def _failed(self, exc: BaseException) -> NoReturn:
        """Tell the breaker of an operation that raised ``exc``, and raise what the
        caller sees: ``StoreBusy``, ``BackendUnavailable``, or ``exc`` itself."""
        if isinstance(exc, self.busy_errors):
            self.breaker.release()
            raise StoreBusy(f"{self.name}: no free connection ({exc})") from exc
        if isinstance(exc, self.errors):
            if self.breaker.failure(exc, self):
                self._breaker_moved("breaker_opened")
            raise BackendUnavailable(f"{self.name} failed: {exc}") from exc
        self.breaker.release()
        raise exc

    def _breaker_moved(self, event: str) -> None:
        """Count a breaker transition (the breaker logs it) in this view's cache."""
        if self.recorder is not None:
            self.recorder.count(event)

    # -- what a subclass supplies --------------------------------------------------

    def _refuse(self) -> None:
        """Raise ``BackendUnavailable`` when this process may not use the store at all
        (before any operation; no breaker judges it). Default: it always may."""

    def _get_raw(self, key: str) -> tuple[bytes | int | None, float | None]:
        """The bytes under ``key`` and the seconds the store will keep them; in place of
        the bytes, their size when it exceeds ``max_value_size`` (then never fetched:
        every read's cost is bounded, whatever was planted in the store)."""
        raise NotImplementedError

    def _get_many_raw(self, keys: Sequence[str]) -> list[tuple[bytes | int | None, float | None]]:
        """``_get_raw`` of each key, in one round trip where the store allows it."""
        return [self._get_raw(key) for key in keys]

    def _set_raw(self, key: str, data: bytes, ttl: float) -> None:
        raise NotImplementedError

    def _delete_raw(self, key: str) -> None:
        raise NotImplementedError

    def _clear_raw(self, prefix: str) -> None:
        raise NotImplementedError

    # Async stores override these; a local store (disk) reads inline (a read is
    # short) and writes on a worker thread, so the event loop never waits on a write.

    async def _aget_raw(self, key: str) -> tuple[bytes | int | None, float | None]:
        return self._get_raw(key)

    async def _aget_many_raw(
        self, keys: Sequence[str]
    ) -> list[tuple[bytes | int | None, float | None]]:
        return self._get_many_raw(keys)

    async def _aset_raw(self, key: str, data: bytes, ttl: float) -> None:
        await asyncio.to_thread(self._set_raw, key, data, ttl)

    async def _adelete_raw(self, key: str) -> None:
        await asyncio.to_thread(self._delete_raw, key)

    async def _aclear_raw(self, prefix: str) -> None:
        await asyncio.to_thread(self._clear_raw, prefix)


class _AsyncPolling:
    """Waiting for a lease without notifications: a bounded sleep, then look again."""

    poll_interval = 0.02

    async def __aenter__(self) -> _AsyncPolling:
        return self

    async def __aexit__(self, *exc: object) -> None:
        pass

    async def wait(self, timeout: float) -> None:
        await asyncio.sleep(min(timeout, self.poll_interval))


def _dropping(drop: bool) -> tuple[bool, ...]:
    # ``drop`` reaches _lease_commit_raw only when set: a store written before it
    # existed keeps working for every commit but a refused value's (cache_if).
    return (True,) if drop else ()


def lease_key(key: str) -> str:
    """Where the lease of the entry under ``key`` lives (Redis: the same hash tag, so
    the same Cluster slot as the value)."""
    return key + ":lease"


def ttl_ms(seconds: float) -> int:
    """A positive whole number of milliseconds, rounded up."""
    return max(1, math.ceil(seconds * 1000))

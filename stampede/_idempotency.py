"""``Idempotency`` / ``AsyncIdempotency``: run a keyed piece of work once, replay it after.

A single flight whose outcome is kept (DESIGN.md section 8, items 33-37). In
this process, duplicates of a key (with the same fingerprint) join the first
caller's flight and get its outcome, with no store round trip; across
processes they meet at the key's claim in the store (``_idem_stores``) and the
first one's recorded outcome (``_async/idempotency.py``, the leader's work,
written once). Retries after it finished replay the record for ``retention``.

``replayed`` is True for every caller that did not run the work itself.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Literal, ParamSpec, TypeVar, cast, overload

from ._async import idempotency as async_engine
from ._envelope import CorruptEntry
from ._errors import (
    InFlight,
    KeyReused,
    LoadTimeout,
    ReplayUnavailable,
    SerializationError,
)
from ._idem import (
    DEFAULT_MAX_RECORD_SIZE,
    ERROR,
    UNREPLAYABLE,
    VALUE,
    IdemCounters,
    IdemOptions,
    IdemStats,
    Record,
    Unrecordable,
    decode_record,
    digest,
    encode_record,
    error_payload,
    rebuild_error,
    store_key,
)
from ._idem_stores import resolve_idem_store
from ._keys import CallKey
from ._singleflight import AsyncSingleFlight, SingleFlight
from ._sync import idempotency as sync_engine
from .backends._shared import ValueTooLarge

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")
U = TypeVar("U")

DAY = 24 * 3600.0


class _Core:
    """What both shells hold, and what the leader's work asks of them."""

    def __init__(self, store: Any, options: IdemOptions, local_records: int) -> None:
        self.store = store
        self.options = options
        self.counters = IdemCounters(options.metrics, options.name)
        # Finished records kept in this process (``local_records``), each until a
        # moment before its end in the store: a replay with no round trip, never
        # one the store would no longer give.
        self.local_records = local_records
        self.local: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self._lock = threading.Lock()

    def remember(self, key: str, data: bytes | int | None, seconds: float) -> None:
        if not self.local_records or not isinstance(data, bytes) or seconds <= 0:
            return
        until = time.monotonic() + seconds * 0.99 - 0.05
        with self._lock:
            self.local[key] = (data, until)
            self.local.move_to_end(key)
            while len(self.local) > self.local_records:
                self.local.popitem(last=False)

    def recall(self, key: str) -> bytes | None:
        """A finished record kept here, if it has not ended."""
        if not self.local_records:
            return None
        with self._lock:
            found = self.local.get(key)
            if found is None:
                return None
            if found[1] <= time.monotonic():
                del self.local[key]
                return None
            return found[0]

    def replayed_here(self, key: str, fingerprint: str) -> tuple[bool, Any]:
        """(True, the outcome) when a record kept here answers the call."""
        data = self.recall(key)
        if data is None:
            return False, None
        self.counters.count("replayed")
        return True, self.replay(key, data, fingerprint)

    @staticmethod
    def clock() -> float:
        return time.monotonic()

    def replay(self, key: str, data: bytes | int | None, fingerprint: str) -> Any:
        """The recorded outcome: its value, its exception raised again, or
        ``ReplayUnavailable``; ``KeyReused`` for another fingerprint."""
        if not isinstance(data, bytes):
            raise ReplayUnavailable(
                "this key's record is larger than max_record_size: it ran, and is not run again"
            )
        try:
            record = decode_record(key, data, self.options.serializer)
        except CorruptEntry as exc:
            raise ReplayUnavailable(
                f"this key's record cannot be read ({exc}): it ran, and is not run again"
            ) from None
        if record.fingerprint != fingerprint:
            self.counters.count("key_reused")
            raise KeyReused("this idempotency key was used with another fingerprint")
        if record.kind == VALUE:
            return record.payload
        if record.kind == ERROR:
            try:
                raise rebuild_error(record.payload, self.options.record_errors)
            except CorruptEntry as exc:
                message = f"the recorded error cannot be raised again: {exc}"
                raise ReplayUnavailable(message) from None
        raise ReplayUnavailable(
            "this key's work ran, but its outcome could not be recorded: it is not run again"
        )

    def recorded(self, key: str, fingerprint: str, fence: int, value: Any) -> bytes:
        """The record of a value; "not replayable" when it cannot be kept."""
        if isinstance(value, Unrecordable):
            return self.unreplayable(key, fingerprint, fence)
        return self._encode(key, Record(VALUE, fingerprint, fence, value))

    def recorded_error(self, key: str, fingerprint: str, fence: int, exc: BaseException) -> bytes:
        return self._encode(key, Record(ERROR, fingerprint, fence, error_payload(exc)))

    def unreplayable(self, key: str, fingerprint: str, fence: int) -> bytes:
        """The record of work that ran but whose outcome is not kept: never run again."""
        self.counters.count("unreplayable")
        marker = Record(UNREPLAYABLE, fingerprint, fence, None)
        return encode_record(key, marker, self.options.serializer, None)

    def _encode(self, key: str, record: Record) -> bytes:
        opts = self.options
        try:
            return encode_record(key, record, opts.serializer, opts.max_record_size)
        except (SerializationError, ValueTooLarge) as exc:
            logging.getLogger("stampede").warning(
                "an idempotent outcome cannot be recorded (%s): retries get ReplayUnavailable",
                exc,
            )
            return self.unreplayable(key, record.fingerprint, record.fence)


class _Base:
    _asynchronous = False

    def __init__(
        self,
        store: Any = None,
        *,
        namespace: str = "idem",
        retention: float = 2 * DAY,
        lease_ttl: float = 10.0,
        on_conflict: Literal["wait", "reject"] = "wait",
        wait_timeout: float | None = 10.0,
        on_backend_error: Literal["raise", "fail-open"] = "raise",
        record_errors: tuple[type[BaseException], ...] | type[BaseException] = (),
        serializer: Any = None,
        max_record_size: int = DEFAULT_MAX_RECORD_SIZE,
        local_records: int = 0,
        metrics: Any = None,
    ) -> None:
        """Keep the outcomes of idempotent work in ``store``.

        Args:
            store: a dict (one process), a ``diskcache.Cache``, a ``redis.Redis``
                (``redis.asyncio.Redis`` for ``AsyncIdempotency``) or
                ``RedisCluster`` client, a ``psycopg_pool.ConnectionPool``
                (``AsyncConnectionPool``), or a URL (``memory://``,
                ``disk:///path``, ``redis://...``, ``postgresql://...``).
            namespace: the prefix of this layer's keys in the store.
            retention: seconds a finished execution's record is kept and replayed
                (default 48 h: a 24 h retry window, safely).
            lease_ttl: seconds a claim lives without renewal; it is renewed every
                third of it while the work runs, and taken over after it when the
                owner crashed.
            on_conflict: ``"wait"`` for a running execution's outcome (up to
                ``wait_timeout``, then ``InFlight``), or ``"reject"`` at once.
            wait_timeout: the most seconds a duplicate waits (``None``: no bound).
            on_backend_error: ``"raise"`` (``BackendUnavailable``: the work does
                not run unprotected) or ``"fail-open"`` (it runs, coalesced in this
                process only, counted ``unprotected``).
            record_errors: exception types recorded and raised again to retries
                (others release the key: a retry runs the work again).
            serializer: how outcomes are written (default ``DataSerializer``).
            max_record_size: the largest record in bytes; a larger outcome is
                recorded as ``ReplayUnavailable`` (never run again).
            local_records: finished records also kept in this process (0: none),
                replayed with no store round trip, each until just before the
                store's copy ends.
            metrics: a ``MetricsHook`` told of each counter's events.
        """
        self.options: IdemOptions = IdemOptions(
            namespace=namespace,
            retention=retention,
            lease_ttl=lease_ttl,
            on_conflict=on_conflict,
            wait_timeout=wait_timeout,
            on_backend_error=on_backend_error,
            record_errors=record_errors,
            serializer=serializer,
            max_record_size=max_record_size,
            metrics=metrics,
        )
        if isinstance(local_records, bool) or not isinstance(local_records, int):
            raise TypeError("local_records must be an int")
        if local_records < 0:
            raise ValueError("local_records must be >= 0")
        self._core = _Core(
            resolve_idem_store(store, asynchronous=self._asynchronous),
            self.options,
            local_records,
        )

    def stats(self) -> IdemStats:
        """A frozen snapshot of the counters."""
        return self._core.counters.snapshot()

    def _keys(self, key: Hashable, fingerprint: object) -> tuple[str, str]:
        return store_key(self.options.namespace, key), "" if fingerprint is None else digest(
            fingerprint
        )

    def _in(self, transaction: Any) -> Any:
        """The store's steps in the caller's transaction (PostgreSQL stores only)."""
        in_transaction = getattr(self._core.store, "in_transaction", None)
        if in_transaction is None:
            raise TypeError(
                "transaction= needs a PostgreSQL store (a postgresql:// URL or a psycopg "
                f"pool), not {self._core.store!r}"
            )
        return in_transaction(transaction)

    def _in_flight(self) -> InFlight:
        self._core.counters.count("rejected")
        return InFlight("this idempotency key's first execution is still running")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._core.store!r}, namespace={self.options.namespace!r})"


def _call_fingerprint(
    fn: Callable[..., Any], fingerprint: Callable[..., object] | None
) -> Callable[..., object]:
    if fingerprint is not None:
        return fingerprint
    call_key = CallKey(fn)  # the bound arguments (plain data: see digest)
    return lambda *args, **kwargs: call_key(args, kwargs)


class Idempotency(_Base):
    """Idempotency keys for threads: ``do(key, fn)`` runs ``fn`` at most once per key."""

    def __init__(self, store: Any = None, **options: Any) -> None:
        super().__init__(store, **options)
        self._flight = SingleFlight()

    def do(
        self,
        key: Hashable,
        fn: Callable[[], R],
        *,
        fingerprint: object = None,
        transaction: Any = None,
    ) -> tuple[R, bool]:
        """``fn()``'s outcome for ``key``: (value, replayed).

        The first caller of the key runs ``fn``; callers meanwhile (here or in
        other processes on the store) wait for its outcome, later ones replay
        the record. ``fingerprint`` (bytes, str or plain data: what the call
        is about) must match the first call's, else ``KeyReused``.

        Raises ``InFlight``, ``KeyReused``, ``ReplayUnavailable``,
        ``BackendUnavailable`` (the store down, ``on_backend_error="raise"``),
        or ``fn``'s own exception (a recorded one: a new instance of its type).

        ``transaction``: a ``psycopg.Connection`` in an open transaction, on the
        database of a PostgreSQL store. The key is claimed and the outcome
        written in that transaction: a rollback undoes them with the caller's
        other writes. A duplicate meanwhile sees the key running and waits (up to
        ``wait_timeout``): it replays after a commit, or runs after a rollback.
        """
        k, fp = self._keys(key, fingerprint)
        if transaction is not None:
            return sync_engine.run(self._core, k, fn, fp, self._in(transaction))
        kept, value = self._core.replayed_here(k, fp)
        if kept:
            return value, True
        flight = self._flight
        call, leader = flight._join((k, fp))
        if leader:
            result: tuple[R, bool] = flight._lead(
                (k, fp), call, lambda _call: sync_engine.run(self._core, k, fn, fp)
            )
            return result
        if self.options.reject:
            raise self._in_flight()  # reject mode: a duplicate here is refused too
        try:
            value, _ = flight._wait(call, self.options.wait_timeout_or_none())
        except LoadTimeout:
            raise self._in_flight() from None
        self._core.counters.count("replayed")
        return value, True

    def idempotent(
        self,
        *,
        key: Callable[..., Hashable],
        fingerprint: Callable[..., object] | None = None,
    ) -> Callable[[Callable[P, R]], Callable[P, R]]:
        """Decorate a function (a job, a queue consumer) to run once per key.

        ``key`` and ``fingerprint`` are functions of the call's arguments;
        ``fingerprint=None`` fingerprints the bound arguments. The decorated
        function returns the value (replayed or not).
        """

        def decorate(fn: Callable[P, R]) -> Callable[P, R]:
            if inspect.iscoroutinefunction(fn):
                raise TypeError(
                    f"{fn.__qualname__} is an async function: use AsyncIdempotency.idempotent"
                )
            fingerprint_of = _call_fingerprint(fn, fingerprint)

            @functools.wraps(fn)
            def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
                value, _ = self.do(
                    key(*args, **kwargs),
                    functools.partial(fn, *args, **kwargs),
                    fingerprint=fingerprint_of(*args, **kwargs),
                )
                return value

            return wrapper

        return decorate


class AsyncIdempotency(_Base):
    """Idempotency keys for asyncio: ``await do(key, fn)``; the work runs as its own
    task, so a cancelled caller leaves it running (and recorded) for the others."""

    _asynchronous = True

    def __init__(self, store: Any = None, **options: Any) -> None:
        super().__init__(store, **options)
        self._flight = AsyncSingleFlight()

    @overload
    async def do(
        self,
        key: Hashable,
        fn: Callable[[], Awaitable[U]],
        *,
        fingerprint: object = None,
        transaction: Any = None,
    ) -> tuple[U, bool]: ...

    @overload
    async def do(
        self,
        key: Hashable,
        fn: Callable[[], U],
        *,
        fingerprint: object = None,
        transaction: Any = None,
    ) -> tuple[U, bool]: ...

    async def do(
        self,
        key: Hashable,
        fn: Callable[[], Any],
        *,
        fingerprint: object = None,
        transaction: Any = None,
    ) -> tuple[Any, bool]:
        """See ``Idempotency.do``; ``fn`` may be a coroutine function or a plain one;
        ``transaction``: a ``psycopg.AsyncConnection`` in an open transaction (the
        work then runs in the caller's task, on that transaction)."""
        k, fp = self._keys(key, fingerprint)
        if transaction is not None:
            return await async_engine.run(self._core, k, fn, fp, self._in(transaction))
        kept, local = self._core.replayed_here(k, fp)
        if kept:
            return local, True
        flight = self._flight
        call, leader = flight._join(
            (k, fp), lambda _call: async_engine.run(self._core, k, fn, fp)
        )
        try:
            if not leader and self.options.reject:
                raise self._in_flight()  # reject mode: a duplicate here is refused too
            # wait_timeout bounds a duplicate's wait, never the caller running the work.
            timeout = None if leader else self.options.wait_timeout_or_none()
            value, replayed = await flight._wait(call, timeout)
        except LoadTimeout:
            raise self._in_flight() from None
        if not leader:
            self._core.counters.count("replayed")
            replayed = True
        return value, replayed

    def idempotent(
        self,
        *,
        key: Callable[..., Hashable],
        fingerprint: Callable[..., object] | None = None,
    ) -> Callable[[Callable[P, Awaitable[T]]], Callable[P, Awaitable[T]]]:
        """See ``Idempotency.idempotent``; for ``async def`` functions."""

        def decorate(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
            if not inspect.iscoroutinefunction(fn):
                raise TypeError(f"{fn.__qualname__} is not async: use Idempotency.idempotent")
            fingerprint_of = _call_fingerprint(fn, fingerprint)

            @functools.wraps(fn)
            async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
                work: Callable[[], Any] = functools.partial(fn, *args, **kwargs)
                value, _ = await self.do(
                    key(*args, **kwargs), work, fingerprint=fingerprint_of(*args, **kwargs)
                )
                return cast(T, value)

            return wrapper

        return decorate

"""Idempotency records in PostgreSQL: one table, the database as the serialization point.

The same four steps as the other stores (``_idem_stores``), each one SQL
statement on a pooled connection (psycopg 3), every time from the server's
clock (``statement_timestamp()``, never the transaction's ``now()`` nor this
host's clock):

- claim: ``INSERT ... ON CONFLICT (key) DO UPDATE ... WHERE`` the row is free
  (released, its lease run out, or its record expired) ``RETURNING`` the new
  fence; when the row is not free, the same statement reads it (a record, or
  the running claim's fingerprint and lease). A claim waits for a row another
  transaction holds at most ``CLAIM_LOCK_TIMEOUT`` (then "still running");
- renew: the lease's end moves, if the row is still the token's;
- commit: the record written (or the claim released) if the row is still the
  token's, and ``NOTIFY`` to the key's waiters, in one statement;
- wake-ups: one ``LISTEN`` connection per process and server, on a thread,
  which also deletes expired rows in bounded batches.

Fence numbers come from a sequence: they only grow, for each key and across
keys, even over a rolled-back claim or a deleted row.

In the caller's transaction (``do(..., transaction=conn)``), ``InTransaction``
runs the claim and the commit on the caller's connection: the row is written
with the caller's other rows, and a rollback undoes the claim and the outcome
with the business writes. Each claim there is made under a savepoint, rolled
back unless the key was taken: a claim that found a record or a running claim
never keeps a lock on that row (``ON CONFLICT DO UPDATE`` locks the row even
when its ``WHERE`` is false), a claim that waited too long leaves the
caller's transaction usable, and the ``lock_timeout`` it set is put back.
A duplicate of a transaction still running sees "running": it waits for the
outcome (up to ``wait_timeout``) like any other caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
import weakref
from collections.abc import AsyncIterator
from typing import Any, NoReturn

from ._breaker import Breaker
from ._errors import BackendUnavailable, IdempotencyError
from ._idem_stores import CLAIMED, DONE, RUNNING, Claimed
from .backends._shared import CircuitOpen, StoreBusy

log = logging.getLogger("stampede")

TABLE = "stampede_idempotency"
CHANNEL = "stampede_idempotency"
CLAIM_LOCK_TIMEOUT = "250ms"  # a claim's wait for a row another transaction holds
SWEEP_INTERVAL = 60.0  # seconds between two sweeps of expired rows (per process)
SWEEP_BATCH = 1000  # rows deleted per statement
SWEEP_BATCHES = 20  # statements per sweep at most

DDL = f"""\
CREATE TABLE IF NOT EXISTS {TABLE} (
    key         text PRIMARY KEY,      -- the namespace and the SHA-256 of the caller's key
    fingerprint text NOT NULL,         -- the SHA-256 of what the call is about
    token       text,                  -- the running claim's owner (NULL: recorded or released)
    fence       bigint NOT NULL,       -- the claim's fence number
    lease_until timestamptz,           -- the running claim's lease ends (server clock)
    record      bytea,                 -- the recorded outcome (NULL while running, or released)
    created_at  timestamptz NOT NULL DEFAULT statement_timestamp(),
    expires_at  timestamptz NOT NULL   -- the row is deleted after this, and never read
);
CREATE INDEX IF NOT EXISTS {TABLE}_expires_at ON {TABLE} (expires_at);
CREATE SEQUENCE IF NOT EXISTS {TABLE}_fence;
"""

_FREE = (
    "r.expires_at <= statement_timestamp() OR (r.record IS NULL"
    " AND (r.token IS NULL OR r.lease_until <= statement_timestamp()))"
)


# ``prior`` keeps the caller's lock_timeout (put back after a claim taken in the
# caller's transaction); ``settings`` bounds the wait for a row that another
# transaction holds, for this statement's transaction (or savepoint) only.
CLAIM = f"""
WITH prior AS MATERIALIZED (SELECT current_setting('lock_timeout') AS was),
settings AS MATERIALIZED (
  SELECT set_config('lock_timeout', '{CLAIM_LOCK_TIMEOUT}', true) FROM prior),
old AS (SELECT token IS NOT NULL AND record IS NULL AS open, ({_FREE}) AS free
        FROM {TABLE} AS r WHERE key = %(k)s),
claimed AS (
  INSERT INTO {TABLE} AS r (key, fingerprint, token, fence, lease_until, created_at, expires_at)
  SELECT %(k)s, %(fp)s, %(token)s, nextval('{TABLE}_fence'),
         statement_timestamp() + %(lease)s * interval '1 second', statement_timestamp(),
         statement_timestamp() + %(keep)s * interval '1 second'
  FROM settings
  -- A live record or a running claim, as of this statement: read, not written (no
  -- row lock, no fence number taken); a row freed since is claimed next time.
  WHERE coalesce((SELECT free FROM old), true)
  ON CONFLICT (key) DO UPDATE SET
    fingerprint = excluded.fingerprint, token = excluded.token, fence = excluded.fence,
    lease_until = excluded.lease_until, record = NULL, created_at = excluded.created_at,
    expires_at = excluded.expires_at
  WHERE {_FREE}
  RETURNING r.fence
)
SELECT true, fence, NULL::bytea, 0, '', '',
       0::float8, 0::float8, coalesce((SELECT open FROM old), false), (SELECT was FROM prior)
FROM claimed
UNION ALL
SELECT false, fence, CASE WHEN octet_length(record) <= %(limit)s THEN record END,
       coalesce(octet_length(record), 0), fingerprint, coalesce(token, ''),
       coalesce(extract(epoch FROM lease_until - statement_timestamp())::float8, 0),
       extract(epoch FROM expires_at - statement_timestamp())::float8, false,
       (SELECT was FROM prior)
FROM {TABLE} WHERE key = %(k)s AND NOT EXISTS (SELECT FROM claimed)
"""
CLAIM_TRIES = 5  # statements per claim when rows are freed under it

RENEW = f"""
UPDATE {TABLE} SET
  lease_until = statement_timestamp() + %(lease)s * interval '1 second',
  expires_at = expires_at + (statement_timestamp() + %(lease)s * interval '1 second' - lease_until)
WHERE key = %(k)s AND token = %(token)s AND record IS NULL
"""

COMMIT = f"""
WITH done AS (
  UPDATE {TABLE} SET record = %(data)s, token = NULL, lease_until = NULL,
    expires_at = CASE WHEN %(data)s::bytea IS NULL THEN expires_at
                 ELSE statement_timestamp() + %(retention)s * interval '1 second' END
  WHERE key = %(k)s AND (token = %(token)s AND record IS NULL
    -- (or this same commit again, its first reply lost: the fence is this claim's alone)
    OR fence = %(fence)s AND token IS NULL)
  RETURNING key
)
SELECT pg_notify('{CHANNEL}', key) FROM done
"""

SWEEP = """
DELETE FROM {table} WHERE key IN (
  SELECT key FROM {table} WHERE expires_at <= statement_timestamp()
  ORDER BY expires_at LIMIT %(n)s FOR UPDATE SKIP LOCKED)
"""
# The table as the pool's connections see it (their search_path), schema-qualified:
# the listening connection sweeps it whatever its own settings.
WHERE_IS = """
SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = to_regclass(%s)
"""


def _params(
    key: str, token: str, fingerprint: str, lease_ttl: float, keep: float, limit: int
) -> dict[str, Any]:
    return {
        "k": key,
        "token": token,
        "fp": fingerprint,
        "lease": lease_ttl,
        "keep": keep,
        "limit": limit,
    }


def _found(rows: Any, token: str) -> tuple[Claimed | None, str]:
    """What a claim statement found, and the caller's lock_timeout before it; None
    when the row was freed after the statement's snapshot (look again)."""
    if not rows:
        return None, "0"
    claimed, fence, record, size, fingerprint, holder, lease_left, expires_left, opened, was = rows[
        0
    ]
    if claimed:
        return Claimed(CLAIMED, number=int(fence), takeover=bool(opened)), was
    if expires_left > 0 and size:
        data = bytes(record) if record is not None else int(size)
        return Claimed(DONE, data, number=float(expires_left)), was
    if holder == token:
        # Our own claim, made by an attempt whose reply was lost: it is ours.
        return Claimed(CLAIMED, number=int(fence)), was
    if holder and lease_left > 0 and expires_left > 0:
        return Claimed(RUNNING, holder=fingerprint, number=float(lease_left)), was
    return None, was  # free, but not claimed by this statement: its snapshot was older


def _held(fingerprint: str, lease_ttl: float) -> Claimed:
    """Another transaction holds the row (a claim in its transaction, not yet ended):
    running, as far as anyone else can tell."""
    return Claimed(RUNNING, holder=fingerprint, number=lease_ttl)


def _unavailable(exc: BaseException) -> BackendUnavailable:
    error = BackendUnavailable(f"PostgreSQL idempotency store unavailable: {exc}")
    error.__cause__ = exc
    return error


def _errors() -> tuple[tuple[type[BaseException], ...], type[BaseException]]:
    """(what means the server or the pool is away, what means a lock wait ran out)."""
    import psycopg
    import psycopg_pool

    return (psycopg.OperationalError, psycopg.InterfaceError, psycopg_pool.PoolTimeout), (
        psycopg.errors.LockNotAvailable
    )


def _broken(exc: BaseException) -> bool:
    """A connection lost under the statement (server restarted, backend killed)."""
    import psycopg
    import psycopg_pool

    return isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError)) and not isinstance(
        exc,
        (psycopg.errors.LockNotAvailable, psycopg.errors.QueryCanceled, psycopg_pool.PoolTimeout),
    )


def _rows(conn: Any, sql: str, params: Any) -> Any:
    """The statement's rows as tuples (whatever row factory the caller's connection
    has), or its row count when it returns none."""
    from psycopg.rows import tuple_row

    cur = conn.cursor(row_factory=tuple_row)
    cur.execute(sql, params)
    return cur.fetchall() if cur.description else cur.rowcount


async def _arows(conn: Any, sql: str, params: Any) -> Any:
    from psycopg.rows import tuple_row

    cur = conn.cursor(row_factory=tuple_row)
    await cur.execute(sql, params)
    return await cur.fetchall() if cur.description else cur.rowcount


# -- one listening connection per process and server -------------------------------------------


def _listen_kwargs(conninfo: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The pool's connection settings, for the listening connection."""
    found = {k: v for k, v in kwargs.items() if k not in ("autocommit", "row_factory")}
    if "connect_timeout" not in conninfo:
        found.setdefault("connect_timeout", 5)
    return found


class _Listener:
    """A thread with one ``LISTEN`` connection: wakes the waiters of a key when its
    claim ends, and deletes expired rows every ``SWEEP_INTERVAL`` seconds."""

    def __init__(self, conninfo: str, kwargs: dict[str, Any]) -> None:
        self.conninfo = conninfo
        self.kwargs = _listen_kwargs(conninfo, kwargs)
        self.waiters: dict[str, set[Any]] = {}
        self.lock = threading.Lock()
        self.pid = os.getpid()
        self.thread: threading.Thread | None = None
        self.connected = threading.Event()
        self.swept = 0.0  # time.monotonic() of the last sweep
        self.tables: set[str] = set()  # schema-qualified, found by the stores

    def start(self) -> None:
        with self.lock:
            if self.thread is not None and self.thread.is_alive():
                return
            self.thread = threading.Thread(target=self._run, name="stampede-pg-listen", daemon=True)
            self.thread.start()

    def add(self, key: str, waiter: Any) -> None:
        self.start()
        with self.lock:
            self.waiters.setdefault(key, set()).add(waiter)

    def discard(self, key: str, waiter: Any) -> None:
        with self.lock:
            found = self.waiters.get(key)
            if found is not None:
                found.discard(waiter)
                if not found:
                    del self.waiters[key]

    def _wake(self, key: str | None) -> None:
        with self.lock:
            if key is None:
                waiters = [w for ws in self.waiters.values() for w in ws]
            else:
                waiters = list(self.waiters.get(key, ()))
        for waiter in waiters:
            waiter.wake()

    def _run(self) -> None:
        import psycopg

        pause = 0.2
        while True:
            try:
                with psycopg.connect(self.conninfo, autocommit=True, **self.kwargs) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self.connected.set()
                    pause = 0.2
                    self._wake(None)  # commits while away were missed: look again
                    while True:
                        for note in conn.notifies(timeout=1.0):
                            self._wake(note.payload)
                        if time.monotonic() - self.swept >= SWEEP_INTERVAL:
                            self._sweep(conn)
            except Exception:
                self.connected.clear()
                self._wake(None)
                with self.lock:
                    if not self.waiters:  # no one waits: started again when needed
                        self.thread = None
                        log.debug("idempotency LISTEN connection lost", exc_info=True)
                        return
                log.debug("idempotency LISTEN connection lost; reconnecting", exc_info=True)
                time.sleep(pause)
                pause = min(pause * 2, 5.0)

    def _sweep(self, conn: Any) -> int:
        """Delete expired rows, ``SWEEP_BATCH`` at a time, at most ``SWEEP_BATCHES`` times."""
        self.swept = time.monotonic()
        removed = 0
        for table in sorted(self.tables):
            for _ in range(SWEEP_BATCHES):
                count = conn.execute(SWEEP.format(table=table), {"n": SWEEP_BATCH}).rowcount
                removed += max(0, count)
                if count < SWEEP_BATCH:
                    break
        return removed


_listeners: dict[tuple[str, str], _Listener] = {}
_listeners_lock = threading.Lock()


def _listener_for(conninfo: str, kwargs: dict[str, Any]) -> _Listener:
    ident = (conninfo, repr(sorted(_listen_kwargs(conninfo, kwargs).items())))
    with _listeners_lock:
        found = _listeners.get(ident)
        if found is None or found.pid != os.getpid():  # (a forked child starts its own)
            found = _Listener(conninfo, kwargs)
            _listeners[ident] = found
        return found


class _Waiter:
    def __init__(self) -> None:
        self.event = threading.Event()

    def wake(self) -> None:
        self.event.set()


class _AsyncWaiter:
    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.event = asyncio.Event()

    def wake(self) -> None:
        with contextlib.suppress(RuntimeError):  # (its loop closed)
            self.loop.call_soon_threadsafe(self.event.set)


class _Listening:
    def __init__(self, listener: _Listener, key: str) -> None:
        self.listener, self.key, self.waiter = listener, key, _Waiter()

    def __enter__(self) -> _Listening:
        self.listener.add(self.key, self.waiter)
        return self

    def __exit__(self, *exc: object) -> None:
        self.listener.discard(self.key, self.waiter)

    def wait(self, timeout: float) -> None:
        self.waiter.event.wait(timeout)
        self.waiter.event.clear()


class _AsyncListening:
    def __init__(self, listener: _Listener, key: str) -> None:
        self.listener, self.key = listener, key
        self.waiter: _AsyncWaiter | None = None

    async def __aenter__(self) -> _AsyncListening:
        self.waiter = _AsyncWaiter()
        self.listener.add(self.key, self.waiter)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.waiter is not None:
            self.listener.discard(self.key, self.waiter)

    async def wait(self, timeout: float) -> None:
        assert self.waiter is not None
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.waiter.event.wait(), timeout)
        self.waiter.event.clear()


# -- connections for an AsyncIdempotency made from a URL ---------------------------------------


class _LoopConnections:
    """The async connections a store made from a URL keeps, for each event loop.

    A psycopg_pool ``AsyncConnectionPool`` runs worker tasks that must be closed in
    their own loop: one left open when ``asyncio.run`` ends can hang the loop's
    shutdown, and one opened in a loop since gone never refills. These are plain
    connections, kept idle per loop (at most ``max_size`` in use per loop, waited
    for up to ``timeout`` seconds), with nothing running in the background.
    """

    def __init__(self, conninfo: str, *, max_size: int = 10, timeout: float = 2.0) -> None:
        self.conninfo = conninfo
        self.kwargs: dict[str, Any] = {"autocommit": True}  # (read by the listener)
        self._connect = {**_listen_kwargs(conninfo, {}), "autocommit": True}
        self.max_size, self.timeout = max_size, timeout
        self._loops: weakref.WeakKeyDictionary[Any, tuple[list[Any], asyncio.Semaphore]] = (
            weakref.WeakKeyDictionary()
        )
        self.busy = 0

    def _of_loop(self) -> tuple[list[Any], asyncio.Semaphore]:
        loop = asyncio.get_running_loop()
        found = self._loops.get(loop)
        if found is None:
            found = self._loops.setdefault(loop, ([], asyncio.Semaphore(self.max_size)))
        return found

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Any]:
        import psycopg
        import psycopg_pool

        idle, slots = self._of_loop()
        try:
            await asyncio.wait_for(slots.acquire(), self.timeout)
        except asyncio.TimeoutError:
            raise psycopg_pool.PoolTimeout(f"no connection free within {self.timeout} s") from None
        self.busy += 1
        try:
            conn = idle.pop() if idle else None
            if conn is None:
                conn = await psycopg.AsyncConnection.connect(self.conninfo, **self._connect)
            try:
                yield conn
            except BaseException:
                await self._close(conn)
                raise
            if conn.closed or conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                await self._close(conn)
            else:
                idle.append(conn)
        finally:
            self.busy -= 1
            slots.release()

    @staticmethod
    async def _close(conn: Any) -> None:
        with contextlib.suppress(Exception):
            await conn.close()

    async def check(self) -> None:
        """Close the idle connections (a restart broke them)."""
        idle, _ = self._of_loop()
        while idle:
            await self._close(idle.pop())

    def __repr__(self) -> str:
        return "connections per event loop"


# -- the store -------------------------------------------------------------------------------


class PostgresIdemStore:
    """Records in one PostgreSQL table, through a psycopg pool (``ConnectionPool`` for
    ``Idempotency``, ``AsyncConnectionPool`` for ``AsyncIdempotency``)."""

    local = False
    transactional = False

    def __init__(self, pool: Any, *, asynchronous: bool) -> None:
        self.pool = pool
        self.asynchronous = asynchronous
        self._ready = False  # the table is there
        self._ready_lock = threading.Lock()
        self._alock: weakref.WeakKeyDictionary[Any, asyncio.Lock] = weakref.WeakKeyDictionary()
        self.listener = _listener_for(pool.conninfo, dict(pool.kwargs or {}))
        self.breaker = Breaker()  # a dead server costs one fast refusal, not a pool timeout

    # setup: the table (created on first use unless a migration made it), and the
    # process's listening connection, started before anyone waits

    def ensure(self) -> None:
        if self._ready:
            return
        self.listener.start()
        away, _ = _errors()
        with self._ready_lock:
            if self._ready:
                return
            try:
                with self.pool.connection() as conn:
                    found = _rows(conn, WHERE_IS, (TABLE,))
                    if not found:
                        # Concurrent CREATE ... IF NOT EXISTS can still collide: one at a time.
                        with conn.transaction():
                            _rows(conn, "SELECT pg_advisory_xact_lock(hashtext(%s))", (TABLE,))
                            conn.execute(DDL)
                        found = _rows(conn, WHERE_IS, (TABLE,))
            except away as exc:
                raise _unavailable(exc) from exc
            self._located(found)

    def _located(self, found: Any) -> None:
        """The table is there: its schema-qualified name is swept by the listener."""
        self.listener.tables.add(found[0][0])
        self._ready = True

    async def aensure(self) -> None:
        if self._ready:
            return
        self.listener.start()
        away, _ = _errors()
        loop = asyncio.get_running_loop()
        lock = self._alock.get(loop)
        if lock is None:
            lock = self._alock.setdefault(loop, asyncio.Lock())
        async with lock:
            if self._ready:
                return
            try:
                async with self.pool.connection() as conn:
                    found = await _arows(conn, WHERE_IS, (TABLE,))
                    if not found:
                        async with conn.transaction():
                            await _arows(
                                conn, "SELECT pg_advisory_xact_lock(hashtext(%s))", (TABLE,)
                            )
                            await conn.execute(DDL)
                        found = await _arows(conn, WHERE_IS, (TABLE,))
            except away as exc:
                raise _unavailable(exc) from exc
            self._located(found)

    # each statement: on a pooled connection, behind the breaker; a connection lost
    # under it is retried once on a checked one (each statement is safe to run
    # twice: by its token and fence)

    def _run(self, sql: str, params: dict[str, Any]) -> Any:
        away, lock_wait = _errors()
        self._admit()
        try:
            self.ensure()
            try:
                result = self._once(sql, params)
            except away as exc:
                if not _broken(exc):
                    raise
                self.pool.check()  # drop the other connections the restart broke
                result = self._once(sql, params)
        except BaseException as exc:
            self._judge(exc, away, lock_wait)
        self.breaker.success()
        return result

    def _once(self, sql: str, params: dict[str, Any]) -> Any:
        with self.pool.connection() as conn:
            return _rows(conn, sql, params)

    async def _arun(self, sql: str, params: dict[str, Any]) -> Any:
        away, lock_wait = _errors()
        self._admit()
        try:
            await self.aensure()
            try:
                result = await self._aonce(sql, params)
            except away as exc:
                if not _broken(exc):
                    raise
                await self.pool.check()
                result = await self._aonce(sql, params)
        except BaseException as exc:
            self._judge(exc, away, lock_wait)
        self.breaker.success()
        return result

    async def _aonce(self, sql: str, params: dict[str, Any]) -> Any:
        async with self.pool.connection() as conn:
            return await _arows(conn, sql, params)

    def _admit(self) -> None:
        if not self.breaker.allow():
            raise CircuitOpen("the PostgreSQL idempotency store is failing: circuit open")

    def _judge(
        self,
        exc: BaseException,
        away: tuple[type[BaseException], ...],
        lock_wait: type[BaseException],
    ) -> NoReturn:
        """Tell the breaker, and raise what the caller sees."""
        import psycopg_pool

        if isinstance(exc, BackendUnavailable) and exc.__cause__ is not None:  # (ensure)
            exc = exc.__cause__
        if isinstance(exc, psycopg_pool.PoolTimeout) and self._has_connections():
            self.breaker.release()  # every connection busy: not a sick server
            raise StoreBusy(f"the PostgreSQL idempotency store's pool is full: {exc}") from exc
        if isinstance(exc, away) and not isinstance(exc, lock_wait):
            self.breaker.failure(exc, self)
        else:
            self.breaker.release()
        if isinstance(exc, away):
            raise _unavailable(exc) from exc
        raise exc

    def _has_connections(self) -> bool:
        """Whether the pool holds connections (all busy), not none (the server away)."""
        try:
            return int(self.pool.get_stats().get("pool_size", 0)) > 0
        except Exception:
            return bool(getattr(self.pool, "busy", 0))

    # sync

    def claim(
        self, key: str, token: str, fingerprint: str, lease_ttl: float, fence_ttl: float, limit: int
    ) -> Claimed:
        params = _params(key, token, fingerprint, lease_ttl, fence_ttl, limit)
        _, lock_wait = _errors()
        for _ in range(CLAIM_TRIES):
            try:
                found, _was = _found(self._run(CLAIM, params), token)
            except BackendUnavailable as exc:
                if isinstance(exc.__cause__, lock_wait):  # another transaction holds the row
                    return _held(fingerprint, lease_ttl)
                raise
            if found is not None:
                return found
        return _held(fingerprint, lease_ttl)

    def lease_renew(self, key: str, token: str, lease_ttl: float) -> bool:
        return bool(self._run(RENEW, {"k": key, "token": token, "lease": lease_ttl}))

    def commit(
        self, key: str, token: str, data: bytes | None, retention: float, fence: int
    ) -> bool:
        params = {"k": key, "token": token, "data": data, "retention": retention, "fence": fence}
        done = bool(self._run(COMMIT, params))
        self.listener.start()  # (its thread also deletes expired rows)
        return done

    def lease_listen(self, key: str) -> _Listening:
        return _Listening(self.listener, key)

    # async

    async def aclaim(
        self, key: str, token: str, fingerprint: str, lease_ttl: float, fence_ttl: float, limit: int
    ) -> Claimed:
        params = _params(key, token, fingerprint, lease_ttl, fence_ttl, limit)
        _, lock_wait = _errors()
        for _ in range(CLAIM_TRIES):
            try:
                found, _was = _found(await self._arun(CLAIM, params), token)
            except BackendUnavailable as exc:
                if isinstance(exc.__cause__, lock_wait):
                    return _held(fingerprint, lease_ttl)
                raise
            if found is not None:
                return found
        return _held(fingerprint, lease_ttl)

    async def alease_renew(self, key: str, token: str, lease_ttl: float) -> bool:
        return bool(await self._arun(RENEW, {"k": key, "token": token, "lease": lease_ttl}))

    async def acommit(
        self, key: str, token: str, data: bytes | None, retention: float, fence: int
    ) -> bool:
        params = {"k": key, "token": token, "data": data, "retention": retention, "fence": fence}
        done = bool(await self._arun(COMMIT, params))
        self.listener.start()
        return done

    def alease_listen(self, key: str) -> _AsyncListening:
        return _AsyncListening(self.listener, key)

    # the caller's transaction

    def in_transaction(self, conn: Any) -> InTransaction:
        """This store's steps on ``conn``, the caller's open transaction."""
        import psycopg

        kind = psycopg.AsyncConnection if self.asynchronous else psycopg.Connection
        if not isinstance(conn, kind):
            raise TypeError(
                f"transaction= takes a {kind.__module__}.{kind.__qualname__} "
                f"(for this {'AsyncIdempotency' if self.asynchronous else 'Idempotency'}), "
                f"got {type(conn).__name__}"
            )
        status = conn.info.transaction_status
        TS = psycopg.pq.TransactionStatus
        if status == TS.INERROR:
            raise ValueError("transaction= got a failed transaction: roll it back first")
        if status == TS.IDLE and conn.autocommit:
            raise ValueError(
                "transaction= needs a connection in a transaction: open one "
                "(`with conn.transaction():`) or use a connection with autocommit off"
            )
        return InTransaction(self, conn)

    def sweep(self) -> int:
        """Delete expired rows now, in bounded batches (the listener's thread does it
        every ``SWEEP_INTERVAL`` seconds); how many."""
        import psycopg

        listener = self.listener
        with psycopg.connect(listener.conninfo, autocommit=True, **listener.kwargs) as conn:
            return listener._sweep(conn)

    def __repr__(self) -> str:
        return f"PostgresIdemStore({type(self.pool).__name__}, table={TABLE!r})"


_SAVEPOINT = "SAVEPOINT stampede_claim"
_ROLLBACK_TO = "ROLLBACK TO SAVEPOINT stampede_claim; RELEASE SAVEPOINT stampede_claim"


def _ended(found: Claimed | None, was: str) -> Any:
    """How a claim's savepoint ends: kept when the key was taken (the caller's
    lock_timeout put back), else rolled back (a row lock the statement took is let go;
    the lock_timeout it set goes with it)."""
    from psycopg import sql

    if found is None or found.state != CLAIMED:
        return _ROLLBACK_TO
    return sql.SQL(
        "SELECT set_config('lock_timeout', {}, true); RELEASE SAVEPOINT stampede_claim"
    ).format(sql.Literal(was))


class InTransaction:
    """The store's steps on the caller's connection, inside its transaction.

    The row is the lease: until the transaction ends no one else sees the claim,
    and their claims find the row held ("running"). Each claim is made under a
    savepoint, kept only when the key was taken: a claim that found a record or a
    running claim releases the row lock its statement took, and one that waited
    too long leaves the caller's transaction usable. Renewal is not needed; the
    record (or the release) is written in the transaction, and its ``NOTIFY`` is
    sent when the transaction commits. A transaction already failed (the work's
    own SQL error) is not written to: the caller's rollback frees the key.
    """

    local = False
    transactional = True

    def __init__(self, store: PostgresIdemStore, conn: Any) -> None:
        self.store, self.conn = store, conn

    def _failed(self) -> bool:
        import psycopg

        return bool(self.conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR)

    def claim(
        self, key: str, token: str, fingerprint: str, lease_ttl: float, fence_ttl: float, limit: int
    ) -> Claimed:
        self.store.ensure()
        params = _params(key, token, fingerprint, lease_ttl, fence_ttl, limit)
        _, lock_wait = _errors()
        conn = self.conn
        for _ in range(CLAIM_TRIES):
            conn.execute(_SAVEPOINT)
            try:
                found, was = _found(_rows(conn, CLAIM, params), token)
            except lock_wait:
                conn.execute(_ROLLBACK_TO)  # held by another transaction, still running
                return _held(fingerprint, lease_ttl)
            except BaseException:
                if not conn.closed:
                    conn.execute(_ROLLBACK_TO)
                raise
            conn.execute(_ended(found, was))
            if found is not None:
                return found
        return _held(fingerprint, lease_ttl)

    def lease_renew(self, key: str, token: str, lease_ttl: float) -> bool:
        return True  # the transaction holds the row

    def commit(
        self, key: str, token: str, data: bytes | None, retention: float, fence: int
    ) -> bool:
        if self._failed():
            return True  # nothing can be written; the caller's rollback frees the key
        params = {"k": key, "token": token, "data": data, "retention": retention, "fence": fence}
        return _written(bool(_rows(self.conn, COMMIT, params)))

    def lease_listen(self, key: str) -> _Listening:
        return self.store.lease_listen(key)

    async def aclaim(
        self, key: str, token: str, fingerprint: str, lease_ttl: float, fence_ttl: float, limit: int
    ) -> Claimed:
        await self.store.aensure()
        params = _params(key, token, fingerprint, lease_ttl, fence_ttl, limit)
        _, lock_wait = _errors()
        conn = self.conn
        for _ in range(CLAIM_TRIES):
            await conn.execute(_SAVEPOINT)
            try:
                found, was = _found(await _arows(conn, CLAIM, params), token)
            except lock_wait:
                await conn.execute(_ROLLBACK_TO)
                return _held(fingerprint, lease_ttl)
            except BaseException:
                if not conn.closed:
                    await conn.execute(_ROLLBACK_TO)
                raise
            await conn.execute(_ended(found, was))
            if found is not None:
                return found
        return _held(fingerprint, lease_ttl)

    async def alease_renew(self, key: str, token: str, lease_ttl: float) -> bool:
        return True

    async def acommit(
        self, key: str, token: str, data: bytes | None, retention: float, fence: int
    ) -> bool:
        if self._failed():
            return True
        params = {"k": key, "token": token, "data": data, "retention": retention, "fence": fence}
        return _written(bool(await _arows(self.conn, COMMIT, params)))

    def alease_listen(self, key: str) -> _AsyncListening:
        return self.store.alease_listen(key)


def _written(done: bool) -> bool:
    """In the caller's transaction the claim's row is held until it ends: finding it
    gone means the work itself rolled the transaction back."""
    if not done:
        raise IdempotencyError(
            "the transaction given to do() was rolled back while the work ran: its "
            "claim is gone and nothing was recorded (do not end that transaction in the work)"
        )
    return True


def postgres_store(store: Any, *, asynchronous: bool) -> PostgresIdemStore | None:
    """A PostgreSQL store for a ``postgresql://`` URL or a psycopg pool; None otherwise."""
    is_url = isinstance(store, str) and store.startswith(("postgresql://", "postgres://"))
    module = type(store).__module__
    if not is_url and not module.startswith("psycopg"):
        return None
    try:
        import psycopg  # noqa: F401
        import psycopg_pool
    except ImportError as exc:
        raise ImportError(
            "PostgreSQL idempotency records need psycopg 3 and psycopg-pool: "
            "pip install 'stampede[postgres]'"
        ) from exc
    if is_url:
        if asynchronous:
            return PostgresIdemStore(_LoopConnections(store), asynchronous=True)
        pool = psycopg_pool.ConnectionPool(
            store,
            min_size=1,
            max_size=10,
            timeout=2.0,
            kwargs={"autocommit": True},
            open=True,
            name="stampede-idempotency",
        )
        return PostgresIdemStore(pool, asynchronous=False)
    wanted = psycopg_pool.AsyncConnectionPool if asynchronous else psycopg_pool.ConnectionPool
    if isinstance(store, wanted):
        return PostgresIdemStore(store, asynchronous=asynchronous)
    other = "AsyncIdempotency" if not asynchronous else "Idempotency"
    raise TypeError(
        f"{'AsyncIdempotency' if asynchronous else 'Idempotency'} takes a psycopg_pool."
        f"{wanted.__name__} or a postgresql:// URL, got {type(store).__name__}"
        + (
            f" (that one is for {other})"
            if isinstance(store, (psycopg_pool.ConnectionPool, psycopg_pool.AsyncConnectionPool))
            else ""
        )
    )

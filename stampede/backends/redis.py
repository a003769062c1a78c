"""Redis: wrap a ``redis.Redis`` (or ``RedisCluster``) as it is.

A read is one round trip: ``GETRANGE`` of the entry's first bytes and its
``PTTL``, pipelined (see ``_PREFIX``); only an entry longer than that prefix
takes a second one, a Lua script that refuses anything past
``max_value_size`` by its length. A write is one ``SET ... PX``: Redis drops
the entry by itself once nobody may serve it (``ttl + stale_ttl``). The
client must return bytes (``decode_responses`` off): entries are binary.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import math
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from .._keys import key_namespace, key_rest
from .._near import CLEAR_MARK, NearTier
from ._shared import SharedStore, lease_key, ttl_ms

# The read (``_Link.get``): two plain read commands, pipelined, on one connection
# of the client's pool, without redis-py's command machinery (a hit's client-side
# cost is then about a GET's):
#
#   GETRANGE key 0 prefix-1    the entry, if shorter than the prefix
#   PTTL key                   how long Redis keeps it: how the reader places the
#                              write on its own monotonic clock (_envelope), never
#                              comparing wall clocks of two hosts
#
# Measured on Redis 7.0 (INFO commandstats, usec per hit): GET 0.4-0.6; these two
# 0.55-0.6; MULTI/EXEC around them 1.0-1.4; EVALSHA of a GET + PTTL script 4.6-5.3
# (the script call itself, whatever it runs). Not a transaction: a write landing
# between the two commands pairs the value read with the next one's PTTL, which
# only misjudges the age of a value that was current a moment before (a delete
# in between answers PTTL -2: a miss). Redis runs one client's pipelined commands
# back to back anyway when they arrive in one read, as these ~100 bytes do.
# GETRANGE of a missing key is b"" (PTTL -2 tells it from an empty string), of a
# non-string a WRONGTYPE error: a foreign entry. Both commands are reads, so
# reads go on during CLIENT PAUSE WRITE and on read-only replicas, on any version.
#
# An entry as long as the prefix or longer is read again by the script below,
# which answers the length of one past max_value_size instead of its bytes: a
# planted giant costs at most the prefix, and is never fetched whole.
PREFIX_MAX = 64 * 1024  # bytes
_PACKED_KEPT = 1024  # packed hits a client keeps (_Link.packed)


def _prefix(max_value_size: int) -> int:
    """The bytes a read fetches at once: an eighth of ``max_value_size``, at most
    ``PREFIX_MAX``, so refusing a giant allocates a small fraction of the limit."""
    return max(1, min(max_value_size // 8, PREFIX_MAX))


def _value_read(limit: str) -> str:
    """Lua setting ``v`` (the bytes, or their length when past ``limit``; false when
    missing) and ``t`` (the PTTL) of KEYS[1]: the read and the lease scripts' one
    rule for what a read may fetch."""
    return f"""
local n = redis.pcall('STRLEN', KEYS[1])
local v, t = false, -2
if type(n) == 'table' then
  if not string.find(n.err, 'WRONGTYPE', 1, true) then return n end
  v = '' t = -1
elseif n > tonumber({limit}) then v = n t = redis.call('PTTL', KEYS[1])
else
  v = redis.call('GET', KEYS[1])
  if v then t = redis.call('PTTL', KEYS[1]) else v = false end
end
"""


# The whole entry and its PTTL, for an entry at least as long as the read's prefix
# (and the read alongside a lease below). A Lua table stops at its first nil, so a
# missing key answers nil rather than {nil, -2}; something that is not a string
# under the key (WRONGTYPE) answers {'', -1}: a foreign entry, a counted miss
# (any other error, e.g. an ACL refusal, is raised: a store failure). A
# value longer than ARGV[1] (the store's max_value_size) is never sent: its
# length comes back in its place, so a planted giant costs one STRLEN. Flagged
# no-writes, so that reads go on during CLIENT PAUSE WRITE (a failover) and on
# read-only replicas (Redis 7.0 and later; older servers run it unflagged).
_READ_BODY = _value_read("ARGV[1]") + "if v == false then return nil end\nreturn {v, t}\n"
_READ = "#!lua flags=no-writes\n" + _READ_BODY.lstrip("\n")

# Leases (distributed=True). KEYS[1] is the value, KEYS[2] its lease: one hash
# slot (the key's own hash tag). Every change is conditional on the token, so a
# leader that lost its lease can neither write nor free someone else's lease.
# A lease without an expiry was not taken by stampede (its leases always have
# one) and would hold the key forever: acquiring replaces it. The value is read
# as by _READ (ARGV[3]: max_value_size).
_ACQUIRE = (
    """
local got = redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2])
if not got and redis.call('PTTL', KEYS[2]) == -1 then
  got = redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
end
"""
    + _value_read("ARGV[3]")
    + "return {got and 1 or 0, v, t}\n"
)
_RENEW = """
if redis.call('GET', KEYS[2]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[2], ARGV[2])
end
return 0
"""
_COMMIT = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
if ARGV[2] ~= '' then redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
elseif ARGV[5] == '1' then redis.call('DEL', KEYS[1]) end
redis.call('DEL', KEYS[2])
redis.call('PUBLISH', ARGV[4], KEYS[1])
return 1
"""
_BREAK = """
redis.call('DEL', KEYS[2])
if ARGV[3] ~= '' then
  redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
elseif ARGV[1] == '1' then
  redis.call('DEL', KEYS[1])
end
redis.call('PUBLISH', ARGV[2], KEYS[1])
return 1
"""

# A write, announced: near caches (and waiters) of the namespace hear of it. One
# round trip, and the write is done before the message goes (a Cluster refuses
# PUBLISH in a pipeline; inside a script it is fine, as the commit's).
_SET = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('PUBLISH', ARGV[3], KEYS[1])
return 1
"""
_DELETE = """
redis.call('DEL', KEYS[1])
redis.call('PUBLISH', ARGV[1], KEYS[1])
return 1
"""

# Wake-ups. The commit and break scripts PUBLISH the value key on the channel of
# its namespace (ARGV), and a process subscribes to the channels of the
# namespaces it waits on: it hears no other namespace's commits. A plain
# PUBLISH, which a Redis Cluster delivers to subscribers on every node.
CHANNEL_PREFIX = "stampede:lease-done:"


def namespace_channel(namespace: str) -> str:
    """The channel of ``namespace``'s lease-done messages: ``stampede:lease-done:<namespace>``.

    The namespace as it is, whatever its text: channels are subscribed with
    SUBSCRIBE, which takes a name literally (``*``, ``?``, ``[`` are plain
    characters there), and a name can be any bytes (UTF-8 here) of any length.
    """
    return CHANNEL_PREFIX + namespace


def _channel_of(key: str) -> str:
    """The channel of ``key``'s lease: its namespace's, read from the key itself, so
    the scripts that publish and the waiters that listen cannot disagree. A key not
    made by a cache (``encode_key``) counts as the empty namespace's."""
    return namespace_channel(key_namespace(key) or "")


SCHEMES = ("redis", "rediss", "unix")

log: logging.Logger = logging.getLogger("stampede")


def _redis() -> Any:
    try:
        import redis
    except ImportError:  # pragma: no cover - exercised without the extra
        raise ImportError(
            "the Redis backend needs redis-py: pip install 'stampede[redis]'"
        ) from None
    return redis


def _busy(redis: Any) -> tuple[type[BaseException], ...]:
    busy = getattr(redis.exceptions, "MaxConnectionsError", None)  # redis-py >= 5.1
    return (busy,) if busy is not None else ()


def is_redis_client(obj: object) -> bool:
    module = type(obj).__module__
    if not module.startswith("redis"):
        return False
    redis = _redis()
    cluster = getattr(getattr(redis, "cluster", None), "RedisCluster", ())
    return isinstance(obj, (redis.Redis, cluster)) if cluster else isinstance(obj, redis.Redis)


def _check_bytes(client: Any) -> None:
    kwargs: dict[str, Any] = {}
    get_kwargs: Callable[[], dict[str, Any]] | None = getattr(client, "get_connection_kwargs", None)
    if callable(get_kwargs):
        kwargs = get_kwargs()
    elif getattr(client, "connection_pool", None) is not None:
        kwargs = client.connection_pool.connection_kwargs
    if kwargs.get("decode_responses"):
        raise ValueError(
            "stampede stores binary entries: give it a Redis client made with "
            "decode_responses=False (a second client on the same pool settings is fine)"
        )


# What a client stampede makes from a URL looks like: bytes (entries are binary),
# one-second timeouts, no retries (see _without_retries).
_URL_CLIENT: dict[str, Any] = {
    "socket_timeout": 1.0,
    "socket_connect_timeout": 1.0,
    "decode_responses": False,
    "retry": None,
}


def _retries(client: Any) -> int:
    """How many times the client repeats a failed command (redis-py's ``Retry``)."""
    get_retry: Any = getattr(client, "get_retry", None)
    retry: Any = get_retry() if callable(get_retry) else None
    get_retries: Any = getattr(retry, "get_retries", None)
    count: Any = get_retries() if callable(get_retries) else 0
    return int(count)


def _without_retries(client: Any, asynchronous: bool) -> Any:
    """A client for stampede's own commands: the given client's connection settings
    (host, TLS, auth, timeouts, pool size), in a pool of its own that never retries.

    redis-py retries a failed command by default (10 times with backoff in 8.x):
    with the server paused, one call blocked ~28 s, longer than any bound
    stampede documents (``wait_timeout``, the breaker). stampede fails open on
    the first failure instead, so its commands go through a pool without
    retries; the given client, used elsewhere by its owner, is left as it is.
    A client whose pool stampede cannot copy (Sentinel, Cluster) is used as it
    is, with a warning.
    """
    retries = _retries(client)
    if retries == 0:
        return client
    redis = _redis()
    module = redis.asyncio if asynchronous else redis
    pool: Any = getattr(client, "connection_pool", None)
    if type(pool) not in (module.ConnectionPool, module.BlockingConnectionPool):
        log.warning(
            "%r retries failed commands (%d times): a paused or unreachable Redis then "
            "holds a cache call for every retry, beyond wait_timeout. Give stampede a "
            "client made with retry=None (or Retry(NoBackoff(), 0)).",
            client,
            retries,
        )
        return client
    retry_module = redis.asyncio.retry if asynchronous else redis.retry
    kwargs = dict(pool.connection_kwargs)
    kwargs["retry"] = retry_module.Retry(redis.backoff.NoBackoff(), 0)
    if type(pool) is module.BlockingConnectionPool:  # keep its wait for a free connection
        kwargs["timeout"] = pool.timeout
    own = type(pool)(
        connection_class=pool.connection_class, max_connections=pool.max_connections, **kwargs
    )
    return module.Redis(connection_pool=own)


def _borrowable_pool(client: Any) -> Any:
    """The pool a read may take a connection from and give it back to (a plain
    client's), or None: the read then goes through redis-py's pipeline (a Cluster,
    a Sentinel or a single-connection client, client-side caching)."""
    if getattr(client, "connection", None) is not None:  # single_connection_client
        return None
    redis = _redis()
    pool: Any = getattr(client, "connection_pool", None)
    kinds = (
        redis.ConnectionPool,
        redis.BlockingConnectionPool,
        redis.asyncio.ConnectionPool,
        redis.asyncio.BlockingConnectionPool,
    )
    if type(pool) not in kinds or getattr(pool, "cache", None) is not None:
        return None
    if _version(redis) < (5, 3):  # get_connection() needed a command name before 5.3
        return None
    return pool


def _version(redis: Any) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in str(redis.__version__).split(".")[:2])
    except ValueError:  # a development version: assume a recent one
        return (99,)


def _reply(conn: Any, refused: type[Exception]) -> Any:
    """The next reply on ``conn``; an error reply (``refused``: redis-py's
    ``ResponseError``) is returned, not raised, so that the replies after it are
    read too (the connection stays in step)."""
    try:
        return conn.read_response()
    except refused as exc:
        return exc


async def _areply(conn: Any, refused: type[Exception], timeout: float | None = None) -> Any:
    try:
        return await conn.read_response(timeout=timeout)
    except refused as exc:
        return exc


async def _areplies(conn: Any, refused: type[Exception], limit: float) -> tuple[Any, Any]:
    """A hit's two replies within one ``limit`` (redis-py 8 reads with no timeout
    of its own when told ``math.inf``: one timer for the pair, not one each)."""
    if sys.version_info < (3, 11):  # pragma: no cover - no asyncio.timeout
        return await _areply(conn, refused), await _areply(conn, refused)
    try:
        async with asyncio.timeout(limit):
            data = await _areply(conn, refused, math.inf)
            return data, await _areply(conn, refused, math.inf)
    except TimeoutError:
        raise _redis().TimeoutError("Timeout reading the replies of a read") from None


def _found(data: Any, pttl: Any, prefix: int) -> tuple[bytes | None, float | None] | None:
    """What the ``GETRANGE`` and ``PTTL`` replies say: (bytes, seconds left), (None,
    None) for a miss, or None when the entry may be longer than the prefix."""
    if isinstance(data, Exception):
        if "WRONGTYPE" in str(data):
            return b"", None  # not a string: a foreign entry (a counted miss)
        raise data  # an ACL refusal, ...: a store failure
    if isinstance(pttl, Exception):
        raise pttl
    if pttl == -2:
        return None, None  # missing (or deleted between the two commands)
    if len(data) >= prefix:
        return None
    return data, _seconds(pttl)


# What both stores send and make of the replies (RedisBackend, AsyncRedisBackend).


def _seconds(pttl: int) -> float | None:
    """A PTTL reply in seconds; None for a key without an expiry."""
    return pttl / 1000.0 if pttl >= 0 else None


def _whole(found: Any) -> tuple[bytes | int | None, float | None]:
    """The read script's reply: (bytes or the length past the limit, seconds left)."""
    if found is None:
        return None, None
    data, pttl = found
    return data, _seconds(pttl)


def _keys(key: str) -> list[str]:
    """A lease script's KEYS: the value and its lease (one hash slot)."""
    return [key, lease_key(key)]


def _commit_args(
    key: str, token: str, data: bytes | None, ttl: float, drop: bool = False
) -> list[Any]:
    return [token, data or b"", ttl_ms(ttl), _channel_of(key), "1" if drop else "0"]


def _break_args(key: str, drop_value: bool, data: bytes | None, ttl: float) -> list[Any]:
    return ["1" if drop_value else "0", _channel_of(key), data or b"", ttl_ms(ttl) if data else 0]


class _Link:
    """A client, the pool a read borrows from, and stampede's scripts on the client."""

    __slots__ = (
        "client",
        "pool",
        "refused",
        "read",
        "acquire",
        "renew",
        "commit",
        "break_",
        "write",
        "delete",
        "packed",
        "timed",
    )

    def __init__(self, client: Any) -> None:
        self.client = client
        self.pool = _borrowable_pool(client)
        # The packed hit of a key, kept: the same bytes go out on every read of it
        # (a pool's connections share their encoder). Emptied when full.
        self.packed: dict[tuple[str, int], Any] = {}
        self.timed = _version(_redis()) >= (8, 0)  # see _areplies
        self.refused: type[Exception] = _redis().ResponseError  # an error reply
        self.read = client.register_script(_READ)  # unflagged() may replace it
        self.acquire = client.register_script(_ACQUIRE)
        self.renew = client.register_script(_RENEW)
        self.commit = client.register_script(_COMMIT)
        self.break_ = client.register_script(_BREAK)
        self.write = client.register_script(_SET)
        self.delete = client.register_script(_DELETE)

    def get(self, key: str, prefix: int) -> tuple[Any, Any]:
        """The ``GETRANGE key 0 prefix-1`` and ``PTTL key`` replies, errors as values."""
        pool = self.pool
        if pool is None:
            pipe = self.client.pipeline(transaction=False)
            pipe.getrange(key, 0, prefix - 1)
            pipe.pttl(key)
            data, pttl = pipe.execute(raise_on_error=False)
            return data, pttl
        conn = pool.get_connection()
        try:
            conn.send_packed_command(self._packed(conn, key, prefix))
            return _reply(conn, self.refused), _reply(conn, self.refused)
        except BaseException:
            conn.disconnect()  # a reply may be left unread: the connection is out of step
            raise
        finally:
            pool.release(conn)

    async def aget(self, key: str, prefix: int) -> tuple[Any, Any]:
        """``get`` for a ``redis.asyncio`` client."""
        pool = self.pool
        if pool is None:
            pipe = self.client.pipeline(transaction=False)
            pipe.getrange(key, 0, prefix - 1)
            pipe.pttl(key)
            data, pttl = await pipe.execute(raise_on_error=False)
            return data, pttl
        conn = await pool.get_connection()
        try:
            await conn.send_packed_command(self._packed(conn, key, prefix))
            limit = conn.socket_timeout
            if limit is None or not self.timed:
                return await _areply(conn, self.refused), await _areply(conn, self.refused)
            return await _areplies(conn, self.refused, limit)
        except BaseException:
            # Cancelled or failed mid-exchange: never reuse the connection.
            await conn.disconnect(nowait=True)
            raise
        finally:
            await pool.release(conn)

    def get_many(self, keys: Sequence[str], prefix: int) -> list[Any]:
        """The ``GETRANGE`` and ``PTTL`` replies of each key, in order, errors as values:
        one write of the kept packed reads, one round trip (a Cluster: a pipeline)."""
        pool = self.pool
        if pool is None:
            return self._pipelined(keys, prefix).execute(raise_on_error=False)  # type: ignore[no-any-return]
        conn = pool.get_connection()
        try:
            # One write: a list would go out as one send per command.
            conn.send_packed_command(
                [b"".join(c for key in keys for c in self._packed(conn, key, prefix))]
            )
            return [_reply(conn, self.refused) for _ in range(2 * len(keys))]
        except BaseException:
            conn.disconnect()  # a reply may be left unread
            raise
        finally:
            pool.release(conn)

    async def aget_many(self, keys: Sequence[str], prefix: int) -> list[Any]:
        """``get_many`` for a ``redis.asyncio`` client."""
        pool = self.pool
        if pool is None:
            return await self._pipelined(keys, prefix).execute(raise_on_error=False)  # type: ignore[no-any-return]
        conn = await pool.get_connection()
        try:
            await conn.send_packed_command(
                [c for key in keys for c in self._packed(conn, key, prefix)]
            )
            limit = conn.socket_timeout
            if limit is not None:  # one timer for the batch: the more replies, the longer
                limit *= max(1.0, len(keys) / 64)
            if limit is None or not self.timed or sys.version_info < (3, 11):
                return [await _areply(conn, self.refused) for _ in range(2 * len(keys))]
            try:  # one timer for every reply (see _areplies), not one each
                async with asyncio.timeout(limit):
                    return [
                        await _areply(conn, self.refused, math.inf) for _ in range(2 * len(keys))
                    ]
            except TimeoutError:
                raise _redis().TimeoutError("Timeout reading the replies of a read") from None
        except BaseException:
            await conn.disconnect(nowait=True)
            raise
        finally:
            await pool.release(conn)

    def _pipelined(self, keys: Sequence[str], prefix: int) -> Any:
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.getrange(key, 0, prefix - 1)
            pipe.pttl(key)
        return pipe

    def _packed(self, conn: Any, key: str, prefix: int) -> Any:
        packed = self.packed.get((key, prefix))
        if packed is None:
            if len(self.packed) >= _PACKED_KEPT:
                self.packed.clear()
            packed = conn.pack_commands([("GETRANGE", key, 0, prefix - 1), ("PTTL", key)])
            self.packed[key, prefix] = packed
        return packed

    def unflagged(self, exc: BaseException) -> bool:
        """Whether ``exc`` says the server predates script flags (Redis before 7.0
        reads ``#!lua`` as a syntax error): the read is then the same script without
        its flag, so it works, but waits out a write pause like any script."""
        text = str(exc)
        if self.read.script == _READ_BODY or not ("near '#'" in text or "shebang" in text):
            return False
        log.warning("%r predates script flags: reads wait during CLIENT PAUSE WRITE", self.client)
        self.read = self.client.register_script(_READ_BODY)
        return True


class _RedisStore(SharedStore):
    """What both Redis stores keep of their client: it, its errors, its scripts."""

    name = "Redis"
    supports_leases = True
    announces = True  # every write is published on its namespace's channel
    more_errors: tuple[type[BaseException], ...] = ()
    _asynchronous = False

    def __init__(self, client: Any, **options: Any) -> None:
        super().__init__(**options)
        redis = _redis()
        _check_bytes(client)
        self.given = client  # as its owner made it
        self._link = _Link(_without_retries(client, self._asynchronous))
        self._read_prefix = _prefix(self.max_value_size)  # what a hit fetches at once
        self.errors: tuple[type[BaseException], ...] = (
            redis.RedisError,
            OSError,
            *self.more_errors,
        )
        self.busy_errors: tuple[type[BaseException], ...] = _busy(redis)
        self.script_errors: tuple[type[BaseException], ...] = (redis.ResponseError,)

    def _here(self) -> _Link:
        """The client (and scripts) to use on this thread or event loop."""
        return self._link

    @property
    def client(self) -> Any:
        """The client stampede sends its commands through (see ``_without_retries``)."""
        return self._here().client

    def __str__(self) -> str:
        """The server, for the breaker's log lines (redis-py's repr runs long)."""
        pool: Any = getattr(self.given, "connection_pool", None)
        where: Any = getattr(pool, "connection_kwargs", None) or {}
        if "path" in where:
            return f"Redis at unix:{where['path']}/{where.get('db', 0)}"
        if "host" in where:
            return f"Redis at {where['host']}:{where.get('port', 6379)}/{where.get('db', 0)}"
        return repr(self)


class RedisBackend(_RedisStore):
    """Entries in Redis, through a sync ``redis.Redis`` / ``RedisCluster`` client."""

    serves_async = False

    def _lease_acquire_raw(
        self, key: str, token: str, lease_ttl: float
    ) -> tuple[bool, bytes | int | None, float | None]:
        keys, args = _keys(key), [token, ttl_ms(lease_ttl), self.max_value_size]
        got, data, pttl = self._here().acquire(keys=keys, args=args)
        return bool(got), data, _seconds(pttl)

    def _lease_renew_raw(self, key: str, token: str, lease_ttl: float) -> bool:
        return bool(self._here().renew(keys=_keys(key), args=[token, ttl_ms(lease_ttl)]))

    def _lease_commit_raw(
        self, key: str, token: str, data: bytes | None, ttl: float, drop: bool = False
    ) -> bool:
        args = _commit_args(key, token, data, ttl, drop)
        return bool(self._here().commit(keys=_keys(key), args=args))

    def _lease_break_raw(
        self, key: str, drop_value: bool, data: bytes | None = None, ttl: float = 0.0
    ) -> None:
        args = _break_args(key, drop_value, data, ttl)
        self._here().break_(keys=_keys(key), args=args)

    def lease_listen(self, key: str) -> _Listening:
        return _Listening(_notifier_for(self.client), key)

    def near_watch(self, near: NearTier) -> None:
        _notifier_for(self.client).watch(namespace_channel(self.namespace), near)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RedisBackend:
        redis = _redis()
        client = redis.Redis.from_url(url, **_URL_CLIENT)
        return cls(client, **options)

    def _get_raw(self, key: str) -> tuple[bytes | int | None, float | None]:
        link = self._here()
        prefix = self._read_prefix
        found = _found(*link.get(key, prefix), prefix)
        if found is not None:
            return found
        return self._get_whole(link, key)  # longer than the prefix: a second round trip

    def _get_many_raw(self, keys: Sequence[str]) -> list[tuple[bytes | int | None, float | None]]:
        # One write (one round trip; a Cluster's pipeline is split by node) of the
        # same GETRANGE + PTTL pairs a single read sends; an entry longer than the
        # prefix is then read whole, alone.
        link = self._here()
        prefix = self._read_prefix
        replies = link.get_many(keys, prefix)
        found = [_found(replies[2 * i], replies[2 * i + 1], prefix) for i in range(len(keys))]
        pairs = zip(keys, found, strict=True)
        return [self._get_whole(link, key) if f is None else f for key, f in pairs]

    def _get_whole(self, link: _Link, key: str) -> tuple[bytes | int | None, float | None]:
        try:
            found = link.read(keys=[key], args=[self.max_value_size])
        except self.script_errors as exc:
            if not link.unflagged(exc):
                raise
            found = link.read(keys=[key], args=[self.max_value_size])
        return _whole(found)

    def _set_raw(self, key: str, data: bytes, ttl: float) -> None:
        self._here().write(keys=[key], args=[data, ttl_ms(ttl), _channel_of(key)])

    def _delete_raw(self, key: str) -> None:
        self._here().delete(keys=[key], args=[_channel_of(key)])

    def _clear_raw(self, prefix: str) -> None:
        batch: list[bytes] = []
        for key in self.client.scan_iter(match=_pattern(prefix), count=500):
            if not _ours(key, prefix):
                continue
            batch.append(key)
            if len(batch) >= 500:
                self.client.unlink(*batch)
                batch.clear()
        if batch:
            self.client.unlink(*batch)
        self.client.publish(namespace_channel(self.namespace), CLEAR_MARK)

    def __repr__(self) -> str:
        return f"RedisBackend({self.client!r})"


class AsyncRedisBackend(_RedisStore):
    """Entries in Redis, through a ``redis.asyncio.Redis`` / ``RedisCluster`` client."""

    serves_sync = False
    _asynchronous = True

    # RuntimeError: a redis.asyncio client used from another event loop than the
    # one its connections belong to ("Event loop is closed", "attached to a
    # different loop"): this store is then unusable from here, as if down.
    more_errors: tuple[type[BaseException], ...] = (asyncio.TimeoutError, RuntimeError)

    # Made from a URL: a client per event loop (a redis.asyncio client belongs to
    # the loop that opened its connections), so a cache declared at import time
    # works under any loop, one after another or several at once. A client given
    # by its owner is used as it is, from the loop it belongs to.
    _url: str | None = None
    _links: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Link] | None = None

    def _here(self) -> _Link:
        if self._links is None:
            return self._link
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a repr, a test): the first client
            return self._link
        link = self._links.get(loop)
        if link is None:
            link = self._links.setdefault(loop, _Link(self._connect(self._url or "")))
        return link

    @staticmethod
    def _connect(url: str) -> Any:
        return _redis().asyncio.Redis.from_url(url, **_URL_CLIENT)

    async def _alease_acquire_raw(
        self, key: str, token: str, lease_ttl: float
    ) -> tuple[bool, bytes | int | None, float | None]:
        keys, args = _keys(key), [token, ttl_ms(lease_ttl), self.max_value_size]
        got, data, pttl = await self._here().acquire(keys=keys, args=args)
        return bool(got), data, _seconds(pttl)

    async def _alease_renew_raw(self, key: str, token: str, lease_ttl: float) -> bool:
        return bool(await self._here().renew(keys=_keys(key), args=[token, ttl_ms(lease_ttl)]))

    async def _alease_commit_raw(
        self, key: str, token: str, data: bytes | None, ttl: float, drop: bool = False
    ) -> bool:
        args = _commit_args(key, token, data, ttl, drop)
        return bool(await self._here().commit(keys=_keys(key), args=args))

    async def _alease_break_raw(
        self, key: str, drop_value: bool, data: bytes | None = None, ttl: float = 0.0
    ) -> None:
        args = _break_args(key, drop_value, data, ttl)
        await self._here().break_(keys=_keys(key), args=args)

    def alease_listen(self, key: str) -> _AsyncListening:
        return _AsyncListening(_async_notifier_for(self.client), key)

    def near_watch(self, near: NearTier) -> None:
        _async_notifier_for(self.client).watch(namespace_channel(self.namespace), near)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> AsyncRedisBackend:
        store = cls(cls._connect(url), **options)
        store._url = url
        store._links = weakref.WeakKeyDictionary()
        return store

    async def _aget_raw(self, key: str) -> tuple[bytes | int | None, float | None]:
        link = self._here()
        prefix = self._read_prefix
        found = _found(*await link.aget(key, prefix), prefix)
        if found is not None:
            return found
        return await self._aget_whole(link, key)  # longer than the prefix

    async def _aget_many_raw(
        self, keys: Sequence[str]
    ) -> list[tuple[bytes | int | None, float | None]]:
        link = self._here()  # see RedisBackend._get_many_raw
        prefix = self._read_prefix
        replies = await link.aget_many(keys, prefix)
        found = [_found(replies[2 * i], replies[2 * i + 1], prefix) for i in range(len(keys))]
        pairs = zip(keys, found, strict=True)
        return [await self._aget_whole(link, key) if f is None else f for key, f in pairs]

    async def _aget_whole(self, link: _Link, key: str) -> tuple[bytes | int | None, float | None]:
        try:
            found = await link.read(keys=[key], args=[self.max_value_size])
        except self.script_errors as exc:
            if not link.unflagged(exc):
                raise
            found = await link.read(keys=[key], args=[self.max_value_size])
        return _whole(found)

    async def _aset_raw(self, key: str, data: bytes, ttl: float) -> None:
        await self._here().write(keys=[key], args=[data, ttl_ms(ttl), _channel_of(key)])

    async def _adelete_raw(self, key: str) -> None:
        await self._here().delete(keys=[key], args=[_channel_of(key)])

    async def _aclear_raw(self, prefix: str) -> None:
        batch: list[bytes] = []
        async for key in self.client.scan_iter(match=_pattern(prefix), count=500):
            if not _ours(key, prefix):
                continue
            batch.append(key)
            if len(batch) >= 500:
                await self.client.unlink(*batch)
                batch.clear()
        if batch:
            await self.client.unlink(*batch)
        await self.client.publish(namespace_channel(self.namespace), CLEAR_MARK)

    def _get_raw(self, key: str) -> tuple[bytes | int | None, float | None]:
        raise TypeError("an asyncio Redis client serves AsyncCoalescingCache only")

    _set_raw = _delete_raw = _clear_raw = _get_raw  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"AsyncRedisBackend({self.client!r})"


def is_async_redis_client(obj: object) -> bool:
    if not type(obj).__module__.startswith("redis"):
        return False
    redis = _redis()
    cluster = getattr(getattr(redis.asyncio, "cluster", None), "RedisCluster", None)
    kinds = (redis.asyncio.Redis, cluster) if cluster else (redis.asyncio.Redis,)
    return isinstance(obj, kinds)


# One pub/sub connection per client and process (per event loop for asyncio),
# whatever the number of caches and namespaces on it.
_notifiers: weakref.WeakKeyDictionary[Any, _Notifier] = weakref.WeakKeyDictionary()
_notifiers_lock = threading.RLock()  # reentrant, as every lock here: a finalizer may call in

# How long a listener reads before it looks at its flags again: when it stops, and
# when it subscribes to a channel asked for meanwhile (a namespace's first waiter
# then waits at most this long for its subscription, no longer than one poll).
_READ_SLICE = 0.25


def _notifier_for(client: Any) -> _Notifier:
    notifier = _notifiers.get(client)
    if notifier is None:
        with _notifiers_lock:
            notifier = _notifiers.get(client)
            if notifier is None:
                notifier = _notifiers[client] = _Notifier(client)
    return notifier


class _NearWatchers:
    """The near caches a listener tells of its channels' messages and of its losses
    (both notifiers keep one: the decisions live here once)."""

    def __init__(self) -> None:
        self._by_channel: dict[bytes, weakref.WeakSet[NearTier]] = {}

    def add(self, listener: object, channel: bytes, near: NearTier, subscribed: bool) -> None:
        near.watching.add(listener)
        self._by_channel.setdefault(channel, weakref.WeakSet()).add(near)
        if subscribed:  # messages reach it from now on
            near.found()

    def on(self, channel: bytes) -> list[NearTier]:
        return list(self._by_channel.get(channel, ()))

    def lost(self, listener: object) -> list[NearTier]:
        """Every near cache, no longer watched by ``listener`` (watched again at its
        next fill: by the same listener once reconnected, or by a new one)."""
        watchers = [near for group in self._by_channel.values() for near in group]
        for near in watchers:
            near.watching.discard(listener)
        return watchers


class _AsyncNotifier:
    """``_Notifier`` for asyncio: one listener task per client and event loop."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self._waiters: dict[bytes, set[asyncio.Event]] = {}
        # The channels asked for, each with its event set once subscribed: a commit
        # on the channel from then on wakes its waiters.
        self._channels: dict[bytes, asyncio.Event] = {}
        self._asked = asyncio.Event()  # a channel was added: the listener subscribes
        self._near = _NearWatchers()
        self._stopped = False
        self._task = asyncio.get_running_loop().create_task(self._guard())

    def _ready(self, channel: bytes) -> asyncio.Event:
        """The channel's ready event, set once subscribed; asks for it if new."""
        ready = self._channels.get(channel)
        if ready is None:
            ready = self._channels[channel] = asyncio.Event()
            self._asked.set()
        return ready

    def watch(self, channel_name: str, near: NearTier) -> None:
        """Tell ``near`` of every write announced on the channel, and of its loss."""
        if self in near.watching:
            return
        channel = channel_name.encode()
        self._near.add(self, channel, near, self._ready(channel).is_set())

    def _lost(self) -> None:
        for ready in self._channels.values():
            ready.clear()
        for near in self._near.lost(self):
            near.lost()

    def register(self, key: str, event: asyncio.Event) -> asyncio.Event:
        """Set ``event`` when ``key``'s lease ends; returns its channel's ready event."""
        self._waiters.setdefault(key.encode(), set()).add(event)
        return self._ready(_channel_of(key).encode())

    def unregister(self, key: str, event: asyncio.Event) -> None:
        events = self._waiters.get(key.encode())
        if events is not None:
            events.discard(event)
            if not events:
                del self._waiters[key.encode()]

    async def _guard(self) -> None:
        """Run the listener as a child task, and stop it for sure when cancelled.

        A listener that outlived its cancellation would hang ``asyncio.run()`` at
        its end, and the client library can swallow a cancel: redis-py awaits
        ``asyncio.wait_for``, which on Python <= 3.11 drops a cancel that races its
        inner call's completion. ``asyncio.wait`` here never drops one, and the
        listener also stops on a flag.
        """
        listener = asyncio.get_running_loop().create_task(self._listen())
        try:
            await asyncio.wait([listener])
        finally:
            self._stopped = True
            self._lost()  # nobody hears this loop's messages any more
            listener.cancel()
            # Bounded: the listener sees the flag within one read slice.
            await asyncio.wait([listener], timeout=2.0)

    def _running(self) -> bool:
        return not self._stopped and not _cancelling()

    async def _listen(self) -> None:
        while self._running():
            try:
                pubsub = self._client.pubsub()
                subscribed: set[bytes] = set()
                try:
                    while self._running():
                        self._asked.clear()
                        new = [c for c in self._channels if c not in subscribed]
                        if new:
                            await pubsub.subscribe(*new)
                            subscribed.update(new)
                        if not subscribed:  # nothing to read from yet
                            with contextlib.suppress(asyncio.TimeoutError):
                                await asyncio.wait_for(self._asked.wait(), _READ_SLICE)
                            continue
                        message = await pubsub.get_message(timeout=_READ_SLICE)
                        if message is None:
                            continue
                        if message.get("type") == "subscribe":
                            # The server confirmed the subscription.
                            ready = self._channels.get(message["channel"])
                            if ready is not None:
                                ready.set()
                            for near in self._near.on(message["channel"]):
                                near.found()
                        if message.get("type") != "message":
                            continue
                        for near in self._near.on(message["channel"]):
                            near.message(message["data"])
                        for event in list(self._waiters.get(message["data"], ())):
                            event.set()
                finally:
                    # Bounded and quiet: at loop shutdown this runs while cancelled,
                    # and a close stuck on a half-read connection must not hang exit.
                    with contextlib.suppress(Exception, asyncio.CancelledError):
                        await asyncio.wait_for(pubsub.aclose(), 1.0)
            except asyncio.CancelledError:
                raise
            except Exception:  # Redis away: waiters poll meanwhile; try again soon
                self._lost()
                log.debug("lease notifications interrupted", exc_info=True)
                await asyncio.sleep(0.5)


def _cancelling() -> bool:
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)  # Python 3.11+
    return bool(cancelling is not None and cancelling())


_async_notifiers: weakref.WeakKeyDictionary[
    Any, weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _AsyncNotifier]
] = weakref.WeakKeyDictionary()


def _async_notifier_for(client: Any) -> _AsyncNotifier:
    loop = asyncio.get_running_loop()
    per_loop = _async_notifiers.get(client)
    if per_loop is None:
        per_loop = _async_notifiers.setdefault(client, weakref.WeakKeyDictionary())
    notifier = per_loop.get(loop)
    if notifier is None or notifier._task.done():
        notifier = per_loop[loop] = _AsyncNotifier(client)
    return notifier


class _AsyncListening:
    def __init__(self, notifier: _AsyncNotifier, key: str) -> None:
        self._notifier = notifier
        self._key = key
        self._event = asyncio.Event()
        self._ready: asyncio.Event | None = None  # the key's channel's, once registered

    async def __aenter__(self) -> _AsyncListening:
        self._ready = self._notifier.register(self._key, self._event)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._notifier.unregister(self._key, self._event)

    async def wait(self, timeout: float) -> None:
        """Until the key's lease ends (or ``timeout``); then the caller looks again."""
        ready = self._ready
        assert ready is not None, "wait() inside the async with block only"
        # Not subscribed to the key's channel yet (the first wait of its namespace
        # in this process, or after a reconnect): a commit now would wake no one.
        # Wait for the subscription instead, so that the caller's next look is
        # followed by a wait that a commit does end (not the poll interval).
        waited_for = self._event if ready.is_set() else ready
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(waited_for.wait(), timeout)
        self._event.clear()


def _after_fork() -> None:
    global _notifiers_lock
    _notifiers.clear()  # their listener threads stayed in the parent
    _listeners.clear()
    _notifiers_lock = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


class _Notifier:
    """One pub/sub connection per client and process, waking the local waiters.

    A listener thread owns the connection (a redis-py ``PubSub`` is not safe to
    share between threads). It subscribes to a namespace's channel when the
    first waiter of that namespace registers, and stays subscribed: a
    namespace waited on once is likely waited on again, and unsubscribing
    would reopen the not-yet-subscribed window at every flight. It reads
    lease-done messages and sets the events of the keys this process waits
    for. Messages can be lost (a reconnect, a full buffer): waiters poll as a
    fallback, so a lost message costs a delay, never a hang.
    """

    def __init__(self, client: Any) -> None:
        # A weak reference: the listener ends once the client is gone, and a
        # client dropped by its owner does not keep a thread alive forever.
        self._client_ref = weakref.ref(client)
        self._lock = threading.RLock()  # reentrant: a finalizer run under it may wait too
        self._waiters: dict[bytes, set[threading.Event]] = {}  # guarded by _lock
        # The channels asked for (guarded by _lock), each with its event set once
        # subscribed: a commit on the channel from then on wakes its waiters.
        self._channels: dict[bytes, threading.Event] = {}
        self._asked = threading.Event()  # a channel was added: the listener subscribes
        self._near = _NearWatchers()  # guarded by _lock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stampede-lease-done", daemon=True)
        _listeners.add(self)
        self._thread.start()

    def _ready(self, channel: bytes) -> threading.Event:
        """The channel's ready event, set once subscribed; asks for it if new (under
        _lock)."""
        ready = self._channels.get(channel)
        if ready is None:
            ready = self._channels[channel] = threading.Event()
            self._asked.set()
        return ready

    def register(self, key: str, event: threading.Event) -> threading.Event:
        """Set ``event`` when ``key``'s lease ends; returns its channel's ready event."""
        with self._lock:
            self._waiters.setdefault(key.encode(), set()).add(event)
            return self._ready(_channel_of(key).encode())

    def watch(self, channel_name: str, near: NearTier) -> None:
        """Tell ``near`` of every write announced on the channel, and of its loss."""
        if self in near.watching:
            return
        channel = channel_name.encode()
        with self._lock:
            self._near.add(self, channel, near, self._ready(channel).is_set())

    def unregister(self, key: str, event: threading.Event) -> None:
        with self._lock:
            events = self._waiters.get(key.encode())
            if events is not None:
                events.discard(event)
                if not events:
                    del self._waiters[key.encode()]

    def _running(self) -> bool:
        return not self._stop.is_set() and self._client_ref() is not None

    def _lost(self) -> None:
        """The connection is gone: messages may be missed until it is back."""
        with self._lock:
            for ready in self._channels.values():
                ready.clear()
            watchers = self._near.lost(self)
        for near in watchers:
            near.lost()

    def _run(self) -> None:
        while self._running():
            pubsub = None
            subscribed: set[bytes] = set()  # on this connection
            try:
                client = self._client_ref()
                if client is None:
                    return
                pubsub = client.pubsub()
                del client
                while self._running():
                    self._asked.clear()
                    with self._lock:
                        new = [c for c in self._channels if c not in subscribed]
                    if new:
                        pubsub.subscribe(*new)
                        subscribed.update(new)
                    if not subscribed:  # nothing to read from yet
                        self._asked.wait(_READ_SLICE)
                        continue
                    message = pubsub.get_message(timeout=_READ_SLICE)
                    if message is None:
                        continue
                    if message.get("type") == "subscribe":
                        with self._lock:  # the server confirmed the subscription
                            ready = self._channels.get(message["channel"])
                            if ready is not None:
                                ready.set()
                            watchers = self._near.on(message["channel"])
                        for near in watchers:
                            near.found()
                    if message.get("type") != "message":
                        continue
                    with self._lock:
                        events = list(self._waiters.get(message["data"], ()))
                        watchers = self._near.on(message["channel"])
                    for near in watchers:
                        near.message(message["data"])
                    for event in events:
                        event.set()
            except Exception:  # Redis away: waiters poll meanwhile; try again soon
                self._lost()
                log.debug("lease notifications interrupted", exc_info=True)
                self._stop.wait(0.5)
            finally:
                if not self._running():
                    self._lost()  # nobody hears the messages any more
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        pubsub.close()


# Every live listener, so that they can be stopped before the interpreter exits:
# a daemon thread frozen at shutdown while it holds the client's connection-pool
# lock (reconnecting) deadlocks the pool's finalizers (seen on Python 3.13).
_listeners: weakref.WeakSet[_Notifier] = weakref.WeakSet()


def _stop_listeners(timeout: float = 1.0) -> None:
    listeners = list(_listeners)
    for listener in listeners:
        listener._stop.set()
        listener._asked.set()  # out of an idle wait at once
    deadline = time.monotonic() + timeout
    for listener in listeners:
        listener._thread.join(max(0.0, deadline - time.monotonic()))


atexit.register(_stop_listeners)


class _Listening:
    def __init__(self, notifier: _Notifier, key: str) -> None:
        self._notifier = notifier
        self._key = key
        self._event = threading.Event()
        self._ready: threading.Event | None = None  # the key's channel's, once registered

    def __enter__(self) -> _Listening:
        self._ready = self._notifier.register(self._key, self._event)
        return self

    def __exit__(self, *exc: object) -> None:
        self._notifier.unregister(self._key, self._event)

    def wait(self, timeout: float) -> None:
        """Until the key's lease ends (or ``timeout``); then the caller looks again."""
        ready = self._ready
        assert ready is not None, "wait() inside the with block only"
        # Not subscribed to the key's channel yet: wait for the subscription, then
        # look again (see _AsyncListening.wait).
        (self._event if ready.is_set() else ready).wait(timeout)
        self._event.clear()


def _pattern(rest_prefix: str) -> str:
    """A SCAN pattern for the keys whose rest (after the 16-digit hash tag) starts so."""
    return "stampede:{" + "?" * 16 + "}:" + _glob_escape(rest_prefix) + "*"


def _ours(key: bytes, rest_prefix: str) -> bool:
    return key_rest(key.decode("utf-8", "replace")).startswith(rest_prefix)


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)

"""Where idempotency records live: the stores the cache takes, with claim and commit.

Each store gives the engine (``_async/idempotency.py``) four atomic steps on a
key, with the same meaning everywhere:

- ``claim(key, token, fingerprint, lease_ttl, fence_ttl)``: the record if the
  key has one (``DONE``); else the running claim's fingerprint and the seconds
  its lease still holds (``RUNNING``); else a new lease for ``token`` and the
  key's next fence number (``CLAIMED``; ``takeover``: the last claim neither
  committed nor released, its lease ran out). A lease whose holder stopped
  renewing it is free again after ``lease_ttl``; a fence number never goes
  down while the key has a record or a lease.
- ``lease_renew(key, token, lease_ttl)``: keep the lease, if still ``token``'s.
- ``commit(key, token, data, retention, fence)``: if the lease is still
  ``token``'s, or it ran out with no one claiming the key since (no lease, no
  record, and ``fence`` still the key's latest: the store was away while the
  work ran), write the record (``data``; None: release without a record),
  drop the lease and wake the key's waiters; False when another claim took it.
- ``lease_listen(key)``: a wake-up for waiters (Redis: the namespace's pub/sub
  channel; elsewhere a bounded poll).

Redis does each step in one script (one round trip; record, lease and fence
share a hash tag, so a Cluster keeps them on one node). diskcache does each in
one SQLite transaction, reading rows raw (never unpickling). In process, one
lock.
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from collections.abc import MutableMapping
from typing import Any, NamedTuple

from .backends import resolve
from .backends._shared import SharedStore, lease_key

CLAIMED, RUNNING, DONE = 0, 1, 2


class Claimed(NamedTuple):
    """What a claim found: ``state`` (CLAIMED, RUNNING, DONE) and its details."""

    state: int
    data: bytes | int | None = None  # DONE: the record (its size when too large)
    holder: str = ""  # RUNNING: the running claim's fingerprint
    number: float = 0.0  # CLAIMED: the fence; RUNNING: seconds the lease still holds;
    # DONE: seconds the store still keeps the record (0: not known)
    takeover: bool = False  # CLAIMED: the previous claim's owner vanished


def fence_key(key: str) -> str:
    return key + ":fence"


# -- Redis ---------------------------------------------------------------------------------

# KEYS: record, lease, fence (one hash tag). The lease holds "<token> <fingerprint>".
_CLAIM = """
local size = redis.call('STRLEN', KEYS[1])
if size > 0 then
  if size > tonumber(ARGV[4]) then return {2, size, '', 0, 0} end
  return {2, redis.call('GET', KEYS[1]), '', redis.call('PTTL', KEYS[1]), 0}
end
local holder = redis.call('GET', KEYS[2])
if holder then
  local ttl = redis.call('PTTL', KEYS[2])
  if ttl > 0 then return {1, '', holder, ttl, 0} end
end
local open = redis.call('HGET', KEYS[3], 'open')
local fence = redis.call('HINCRBY', KEYS[3], 'n', 1)
redis.call('HSET', KEYS[3], 'open', 1, 'ttl', ARGV[5])
redis.call('PEXPIRE', KEYS[3], ARGV[5])
redis.call('SET', KEYS[2], ARGV[1] .. ' ' .. ARGV[3], 'PX', ARGV[2])
return {0, '', '', fence, open == '1' and 1 or 0}
"""
_RENEW = """
local v = redis.call('GET', KEYS[2])
if v and string.sub(v, 1, #ARGV[1] + 1) == ARGV[1] .. ' ' then
  local t = redis.call('HGET', KEYS[3], 'ttl')
  if t then redis.call('PEXPIRE', KEYS[3], t) end
  return redis.call('PEXPIRE', KEYS[2], ARGV[2])
end
return 0
"""
_COMMIT = """
local v = redis.call('GET', KEYS[2])
if not v or string.sub(v, 1, #ARGV[1] + 1) ~= ARGV[1] .. ' ' then
  if v or redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
  if redis.call('HGET', KEYS[3], 'n') ~= ARGV[5] then return 0 end
end
if ARGV[2] ~= '' then redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) end
redis.call('DEL', KEYS[2])
local t = redis.call('HGET', KEYS[3], 'ttl') or ARGV[3]
redis.call('HSET', KEYS[3], 'open', 0, 'ttl', t)
redis.call('PEXPIRE', KEYS[3], t)
redis.call('PUBLISH', ARGV[4], KEYS[1])
return 1
"""


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _claimed(reply: Any) -> Claimed:
    state, data, holder, number, takeover = reply
    if state == DONE:
        return Claimed(DONE, data, number=max(0, int(number)) / 1000)
    if state == RUNNING:
        text = holder.decode("utf-8", "replace") if isinstance(holder, bytes) else str(holder)
        return Claimed(RUNNING, holder=text.partition(" ")[2], number=int(number) / 1000)
    return Claimed(CLAIMED, number=int(number), takeover=bool(takeover))


class RedisIdemStore:
    """Records in Redis, through the cache's Redis store (its client, breaker, wake-ups)."""

    local = False
    transactional = False

    def __init__(self, backend: Any) -> None:
        self.backend = backend  # a RedisBackend or AsyncRedisBackend
        self._scripts: weakref.WeakKeyDictionary[Any, tuple[Any, Any, Any]] = (
            weakref.WeakKeyDictionary()
        )

    def _of(self, client: Any) -> tuple[Any, Any, Any]:
        scripts = self._scripts.get(client)
        if scripts is None:
            claim, renew, commit = (client.register_script(s) for s in (_CLAIM, _RENEW, _COMMIT))
            scripts = (claim, renew, commit)
            self._scripts[client] = scripts
        return scripts

    def _args(self, key: str) -> list[str]:
        return [key, lease_key(key), fence_key(key)]

    def _channel(self, key: str) -> str:
        from .backends.redis import _channel_of

        return _channel_of(key)

    # sync

    def claim(
        self, key: str, token: str, fingerprint: str, lease_ttl: float, fence_ttl: float, limit: int
    ) -> Claimed:
        def raw() -> Any:
            client = self.backend.client
            args = [token, _ms(lease_ttl), fingerprint, limit, _ms(fence_ttl)]
            return self._of(client)[0](keys=self._args(key), args=args, client=client)

        return _claimed(self.backend._call(raw))

    def lease_renew(self, key: str, token: str, lease_ttl: float) -> bool:
        def raw() -> Any:
            client = self.backend.client
            return self._of(client)[1](keys=self._args(key), args=[token, _ms(lease_ttl)])

        return bool(self.backend._call(raw))

    def commit(
        self, key: str, token: str, data: bytes | None, retention: float, fence: int
    ) -> bool:
        def raw() -> Any:
            client = self.backend.client
            args = [token, data or b"", _ms(retention), self._channel(key), str(fence)]
            return self._of(client)[2](keys=self._args(key), args=args)

        return bool(self.backend._call(raw))

    def lease_listen(self, key: str) -> Any:
        return self.backend.lease_listen(key)

    # async

    async def aclaim(
        self, key: str, token: str, fingerprint: str, lease_ttl: float, fence_ttl: float, limit: int
    ) -> Claimed:
        async def raw() -> Any:
            client = self.backend.client
            args = [token, _ms(lease_ttl), fingerprint, limit, _ms(fence_ttl)]
            return await self._of(client)[0](keys=self._args(key), args=args, client=client)

        return _claimed(await self.backend._acall(raw))

    async def alease_renew(self, key: str, token: str, lease_ttl: float) -> bool:
        async def raw() -> Any:
            client = self.backend.client
            return await self._of(client)[1](keys=self._args(key), args=[token, _ms(lease_ttl)])

        return bool(await self.backend._acall(raw))

    async def acommit(
        self, key: str, token: str, data: bytes | None, retention: float, fence: int
    ) -> bool:
        async def raw() -> Any:
            client = self.backend.client
            args = [token, data or b"", _ms(retention), self._channel(key), str(fence)]
            return await self._of(client)[2](keys=self._args(key), args=args)

        return bool(await self.backend._acall(raw))

    def alease_listen(self, key: str) -> Any:
        return self.backend.alease_listen(key)

    def __repr__(self) -> str:
        return f"RedisIdemStore({self.backend!r})"


# -- diskcache -------------------------------------------------------------------------------


class DiskIdemStore:
    """Records in a diskcache folder: each step one transaction, rows read raw."""

    local = False
    transactional = False
    poll_interval = 0.02

    def __init__(self, backend: Any) -> None:
        self.backend = backend  # a DiskBackend
        self.cache = backend.cache

    def _row(self, key: str, limit: int) -> tuple[Any, float | None] | None:
        from .backends.disk import _read_row

        return _read_row(self.backend._shard(key), key, limit)

    def _claim_raw(
        self, key: str, token: str, fingerprint: str, lease_ttl: float, fence_ttl: float, limit: int
    ) -> Claimed:
        with self.cache.transact():
            found = self._row(key, limit)
            if found is not None:
                data, expires = found
                left = 0.0 if expires is None else max(0.0, expires - time.time())
                return Claimed(DONE, data if isinstance(data, (bytes, int)) else b"", number=left)
            held = self._row(lease_key(key), 512)
            if held is not None and isinstance(held[0], str) and held[1] is not None:
                remaining = held[1] - time.time()
                if remaining > 0:
                    return Claimed(RUNNING, holder=held[0].partition(" ")[2], number=remaining)
            opened = self._row(fence_key(key) + ":open", 16)
            fence = self._row(fence_key(key), 64)
            number = 1
            if fence is not None and isinstance(fence[0], str):
                head = fence[0].partition(" ")[0]
                number = int(head) + 1 if head.isdigit() else 1
            self.cache.set(fence_key(key), f"{number} {fence_ttl}", expire=fence_ttl)
            self.cache.set(fence_key(key) + ":open", "1", expire=fence_ttl)
            self.cache.set(lease_key(key), f"{token} {fingerprint}", expire=lease_ttl)
            takeover = opened is not None and opened[0] == "1"
            return Claimed(CLAIMED, number=number, takeover=takeover)

    def _holds(self, key: str, token: str) -> bool:
        held = self._row(lease_key(key), 512)
        return (
            held is not None
            and isinstance(held[0], str)
            and held[0].startswith(token + " ")
            and (held[1] is None or held[1] > time.time())
        )

    def _fence_ttl(self, key: str) -> float | None:
        fence = self._row(fence_key(key), 64)
        if fence is None or not isinstance(fence[0], str):
            return None
        try:
            return float(fence[0].partition(" ")[2])
        except ValueError:
            return None

    def _keep_fence(self, key: str, ttl: float | None) -> None:
        """The fence outlives the lease and the record it numbers."""
        if ttl is not None:
            self.cache.touch(fence_key(key), expire=ttl)
            self.cache.touch(fence_key(key) + ":open", expire=ttl)

    def _renew_raw(self, key: str, token: str, lease_ttl: float) -> bool:
        with self.cache.transact():
            if not self._holds(key, token):
                return False
            self._keep_fence(key, self._fence_ttl(key))
            return bool(self.cache.touch(lease_key(key), expire=lease_ttl))

    def _latest(self, key: str, fence: int) -> bool:
        """No lease, no record, and ``fence`` still the key's latest claim."""
        if self._row(lease_key(key), 512) is not None or self._row(key, 16) is not None:
            return False
        row = self._row(fence_key(key), 64)
        head = row[0].partition(" ")[0] if row is not None and isinstance(row[0], str) else ""
        return head == str(fence)

    def _commit_raw(
        self, key: str, token: str, data: bytes | None, retention: float, fence: int
    ) -> bool:
        with self.cache.transact():
            if not self._holds(key, token) and not self._latest(key, fence):
                return False
            if data:
                self.cache.set(key, data, expire=retention)
            self.cache.delete(lease_key(key))
            ttl = self._fence_ttl(key) or retention + 60
            self.cache.set(fence_key(key) + ":open", "0", expire=ttl)
            self._keep_fence(key, ttl)
            return True

    def claim(self, *args: Any) -> Claimed:
        return self.backend._call(self._claim_raw, *args)  # type: ignore[no-any-return]

    def lease_renew(self, key: str, token: str, lease_ttl: float) -> bool:
        return bool(self.backend._call(self._renew_raw, key, token, lease_ttl))

    def commit(
        self, key: str, token: str, data: bytes | None, retention: float, fence: int
    ) -> bool:
        return bool(self.backend._call(self._commit_raw, key, token, data, retention, fence))

    def lease_listen(self, key: str) -> Any:
        return self.backend.lease_listen(key)

    async def aclaim(self, *args: Any) -> Claimed:
        return await asyncio.to_thread(self.claim, *args)

    async def alease_renew(self, key: str, token: str, lease_ttl: float) -> bool:
        return await asyncio.to_thread(self.lease_renew, key, token, lease_ttl)

    async def acommit(
        self, key: str, token: str, data: bytes | None, retention: float, fence: int
    ) -> bool:
        return await asyncio.to_thread(self.commit, key, token, data, retention, fence)

    def alease_listen(self, key: str) -> Any:
        return self.backend.alease_listen(key)

    def __repr__(self) -> str:
        return f"DiskIdemStore({self.backend!r})"


# -- in process --------------------------------------------------------------------------------


class MemoryIdemStore:
    """Records in a mapping of this process (one process only), under one lock."""

    local = True
    transactional = False
    poll_interval = 0.01

    def __init__(self, mapping: MutableMapping[Any, Any] | None = None) -> None:
        self.mapping: MutableMapping[Any, Any] = {} if mapping is None else mapping
        self._lock = threading.Condition(threading.RLock())
        self._claims = 0

    def _get(self, key: str, now: float) -> Any:
        found = self.mapping.get(key)
        if found is None:
            return None
        value, until = found
        if until <= now:
            self.mapping.pop(key, None)
            return None
        return value

    def _purge(self, now: float) -> None:
        # Expired rows are dropped when read; a sweep now and then bounds the rest.
        for key in [k for k, (_, until) in list(self.mapping.items()) if until <= now]:
            self.mapping.pop(key, None)

    def claim(
        self, key: str, token: str, fingerprint: str, lease_ttl: float, fence_ttl: float, limit: int
    ) -> Claimed:
        with self._lock:
            now = time.monotonic()
            self._claims += 1
            if self._claims % 1024 == 0:
                self._purge(now)
            data = self._get(key, now)
            if data is not None:
                left = self.mapping[key][1] - now
                return Claimed(DONE, data if len(data) <= limit else len(data), number=left)
            held = self.mapping.get(lease_key(key))
            if held is not None and held[1] > now:
                return Claimed(RUNNING, holder=held[0][1], number=held[1] - now)
            fence = self._get(fence_key(key), now) or (0, False, fence_ttl)
            number, opened = fence[0] + 1, fence[1]
            self.mapping[fence_key(key)] = ((number, True, fence_ttl), now + fence_ttl)
            self.mapping[lease_key(key)] = ((token, fingerprint), now + lease_ttl)
            return Claimed(CLAIMED, number=number, takeover=opened)

    def lease_renew(self, key: str, token: str, lease_ttl: float) -> bool:
        with self._lock:
            now = time.monotonic()
            held = self.mapping.get(lease_key(key))
            if held is None or held[0][0] != token or held[1] <= now:
                return False
            self.mapping[lease_key(key)] = (held[0], now + lease_ttl)
            fence = self._get(fence_key(key), now)
            if fence is not None:  # the fence outlives the lease and the record
                self.mapping[fence_key(key)] = (fence, now + fence[2])
            return True

    def commit(
        self, key: str, token: str, data: bytes | None, retention: float, fence: int
    ) -> bool:
        with self._lock:
            now = time.monotonic()
            held = self.mapping.get(lease_key(key))
            ours = held is not None and held[0][0] == token and held[1] > now
            if not ours:
                latest = self._get(fence_key(key), now)
                lapsed = (held is None or held[1] <= now) and self._get(key, now) is None
                if not (lapsed and latest is not None and latest[0] == fence):
                    return False
            if data:
                self.mapping[key] = (data, now + retention)
            self.mapping.pop(lease_key(key), None)
            kept = self._get(fence_key(key), now)
            if kept is not None:
                self.mapping[fence_key(key)] = ((kept[0], False, kept[2]), now + kept[2])
            self._lock.notify_all()
            return True

    def lease_listen(self, key: str) -> _MemoryListening:
        return _MemoryListening(self._lock)

    async def aclaim(self, *args: Any) -> Claimed:
        return self.claim(*args)

    async def alease_renew(self, key: str, token: str, lease_ttl: float) -> bool:
        return self.lease_renew(key, token, lease_ttl)

    async def acommit(
        self, key: str, token: str, data: bytes | None, retention: float, fence: int
    ) -> bool:
        return self.commit(key, token, data, retention, fence)

    def alease_listen(self, key: str) -> _AsyncPolling:
        return _AsyncPolling(self.poll_interval)

    def __repr__(self) -> str:
        return f"MemoryIdemStore({type(self.mapping).__name__})"


class _MemoryListening:
    def __init__(self, lock: threading.Condition) -> None:
        self._lock = lock

    def __enter__(self) -> _MemoryListening:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def wait(self, timeout: float) -> None:
        with self._lock:
            self._lock.wait(min(timeout, 0.25))


class _AsyncPolling:
    def __init__(self, interval: float) -> None:
        self._interval = interval

    async def __aenter__(self) -> _AsyncPolling:
        return self

    async def __aexit__(self, *exc: object) -> None:
        pass

    async def wait(self, timeout: float) -> None:
        await asyncio.sleep(min(timeout, self._interval))


def resolve_idem_store(store: Any, *, asynchronous: bool) -> Any:
    """The idempotency store for what ``Idempotency(store)`` was given."""
    if store is None or (isinstance(store, str) and store.startswith("memory://")):
        return MemoryIdemStore()
    if isinstance(store, MutableMapping) and not isinstance(store, SharedStore):
        return MemoryIdemStore(store)
    from ._idem_pg import postgres_store

    found = postgres_store(store, asynchronous=asynchronous)
    if found is not None:
        return found
    try:
        backend = resolve(store, asynchronous=asynchronous)
    except TypeError:
        backend = None
    from .backends.disk import DiskBackend
    from .backends.redis import AsyncRedisBackend, RedisBackend

    if isinstance(backend, (RedisBackend, AsyncRedisBackend)):
        return RedisIdemStore(backend.bind(_no_codec(), ""))
    if isinstance(backend, DiskBackend):
        if not backend.supports_leases:
            raise ValueError(
                f"idempotency records need one diskcache Cache, not {backend!r} "
                "(a FanoutCache spreads a record and its lease over shards)"
            )
        return DiskIdemStore(backend.bind(_no_codec(), ""))
    raise TypeError(
        f"cannot keep idempotency records in {store!r}: pass a dict (one process), a "
        "diskcache.Cache, a redis.Redis / redis.asyncio.Redis client, a psycopg_pool "
        "pool, or a URL"
    )


def _no_codec() -> Any:
    # The records are encoded by the idempotency layer (_idem); the store's codec is unused.
    from .backends._shared import Codec

    return Codec(None, clock=time.monotonic, beta=0.0, error_types=())

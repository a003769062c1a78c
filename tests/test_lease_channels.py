"""Lease wake-ups on Redis travel on one pub/sub channel per namespace.

The commit and break scripts publish the value key; a process subscribes to
the channels of the namespaces it waits on, so it does not receive the
commits of every namespace on the server. Each test runs on a server of its
own (``fresh_redis_server``): ``PUBSUB CHANNELS`` then lists exactly what the
test's clients subscribed to, and nothing left over by other tests.

Waits get 60 s timeouts under a shorter test timeout: a wait that a message
does not end fails the test instead of passing on the poll fallback.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict
from typing import Any, cast

import pytest
import redis
import redis.asyncio

from stampede import AsyncCoalescingCache, CoalescingCache
from stampede.backends import redis as redis_backend
from stampede.backends.redis import namespace_channel
from stampede.testing import Gate, wait_until
from tests.helpers import in_thread
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.timeout(30)

# (the namespace a process waits on, another namespace that commits meanwhile)
NAMESPACES = [
    ("tenant-a", "tenant-b"),
    ("*", "tenant-b"),  # a glob as a namespace: SUBSCRIBE takes it literally
    ("tenant-[ab]?", "tenant-a"),
    ("äöü:{x}", "äöü:{y}"),  # unicode, a colon, braces
    ("n" * 300, "n" * 299),  # long, one a prefix of the other
]


def heard(pubsub: Any, until: bytes) -> list[bytes]:
    """The messages ``pubsub`` receives, up to and including ``until``."""
    got: list[bytes] = []
    end = time.monotonic() + 20
    while until not in got:
        assert time.monotonic() < end, f"{until!r} not heard; heard {got!r}"
        message = pubsub.get_message(timeout=1.0)
        if message is not None and message["type"] == "message":
            got.append(message["data"])
    return got


def subscribed_to(server: RedisServer, channels: list[bytes]) -> Any:
    """A plain pub/sub client on ``channels``, once the server confirmed them."""
    pubsub = server.client().pubsub(ignore_subscribe_messages=False)  # type: ignore[no-untyped-call]
    pubsub.subscribe(*channels)
    confirmed = 0
    end = time.monotonic() + 20
    while confirmed < len(channels):
        assert time.monotonic() < end, "the subscription was not confirmed"
        message = pubsub.get_message(timeout=1.0)
        if message is not None and message["type"] == "subscribe":
            confirmed += 1
    return pubsub


@pytest.mark.parametrize(("mine", "other"), NAMESPACES, ids=range(len(NAMESPACES)))
def test_a_process_waiting_in_one_namespace_hears_none_of_anothers_commits(
    fresh_redis_server: RedisServer, mine: str, other: str
) -> None:
    """What a process waiting on namespace A subscribes to carries A's commits, not B's.

    Before per-namespace channels, every commit and break of every namespace was
    published on one channel (``stampede:lease-done``), which every waiting
    process subscribed to: each process received the whole server's commits.
    A plain client subscribes to whatever channels the waiting process
    subscribed to (``PUBSUB CHANNELS``) and counts what arrives there.
    """
    server = fresh_redis_server
    waiting: CoalescingCache[str] = CoalescingCache(
        server.client(), ttl=60, distributed=True, namespace=mine
    )
    writer_a: CoalescingCache[str] = CoalescingCache(
        server.client(), ttl=60, distributed=True, namespace=mine
    )
    writer_b: CoalescingCache[str] = CoalescingCache(
        server.client(), ttl=60, distributed=True, namespace=other
    )
    store = waiting.backend
    assert isinstance(store, redis_backend.RedisBackend)
    a_key = waiting._key("report")
    assert isinstance(a_key, str)
    b_keys = {writer_b._key(("report", i)) for i in range(3)}
    admin = server.client()

    with store.lease_listen(a_key) as wake:
        wake.wait(60)  # the first wait returns once the process is subscribed
        channels = cast("list[bytes]", admin.pubsub_channels())  # what the waiting process hears
        assert channels
        spy = subscribed_to(server, channels)
        for i in range(3):
            assert writer_b.get_or_load(("report", i), lambda i=i: f"b{i}") == f"b{i}"  # type: ignore[misc]
        writer_b.invalidate(("report", 0))  # a break publishes too
        assert writer_a.get_or_load("report", lambda: "a") == "a"  # A's commit
        wake.wait(60)  # ended by A's commit (the 60 s would outlast the test)

    # Messages on one connection arrive in order: B's, had they been sent on
    # these channels, would have come before A's.
    assert heard(spy, until=a_key.encode()) == [a_key.encode()]
    assert not b_keys & set(channels)
    assert channels == [namespace_channel(mine).encode()]
    assert waiting.get("report") == "a"
    spy.close()


def test_an_asyncio_process_waiting_in_one_namespace_hears_none_of_anothers_commits(
    fresh_redis_server: RedisServer,
) -> None:
    """The same for a ``redis.asyncio`` client (a listener task per event loop)."""
    server = fresh_redis_server

    async def main() -> tuple[list[bytes], bytes]:
        def cache(namespace: str) -> AsyncCoalescingCache[str]:
            client = redis.asyncio.Redis.from_url(server.url, socket_timeout=5.0)
            return AsyncCoalescingCache(client, ttl=60, distributed=True, namespace=namespace)

        waiting, writer_a, writer_b = cache("tenant-a"), cache("tenant-a"), cache("tenant-b")
        store = waiting.backend
        assert isinstance(store, redis_backend.AsyncRedisBackend)
        a_key = waiting._key("report")
        assert isinstance(a_key, str)
        admin = redis.asyncio.Redis.from_url(server.url)
        async with store.alease_listen(a_key) as wake:
            await wake.wait(60)  # returns once subscribed
            channels = cast("list[bytes]", await admin.pubsub_channels())
            spy = await asyncio.to_thread(subscribed_to, server, channels)
            for i in range(3):
                assert await writer_b.get_or_load(i, lambda i=i: f"b{i}") == f"b{i}"  # type: ignore[misc]
            await writer_b.invalidate(0)
            assert await writer_a.get_or_load("report", lambda: "a") == "a"
            await wake.wait(60)  # ended by A's commit
        messages = await asyncio.to_thread(heard, spy, a_key.encode())
        spy.close()
        for c in (waiting, writer_a, writer_b):
            assert isinstance(c.backend, redis_backend.AsyncRedisBackend)
            await c.backend.client.aclose()
        await admin.aclose()
        return messages, a_key.encode()

    messages, a_key = asyncio.run(main())
    assert messages == [a_key]


@pytest.fixture
def woken(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[bool]]:
    """Per key, how each lease wait made after its channel's subscription ended:
    True for a wait ended by the key's message, False for one that ran out (a poll)."""
    seen: dict[str, list[bool]] = defaultdict(list)
    lock = threading.Lock()
    real = redis_backend._Listening.wait

    def wait(self: Any, timeout: float) -> None:
        if self._ready is None or not self._ready.is_set():
            real(self, timeout)  # waiting for the subscription: not counted
            return
        message = self._event.wait(timeout)
        self._event.clear()
        with lock:
            seen[self._key].append(message)

    monkeypatch.setattr(redis_backend._Listening, "wait", wait)
    return seen


def test_two_namespaces_at_once_each_woken_by_its_own_commit(
    fresh_redis_server: RedisServer, woken: dict[str, list[bool]]
) -> None:
    """Waiters of two namespaces in one process (one client, so one pub/sub
    connection subscribed to both channels) are each woken by their own
    namespace's commit, and the other namespace's waiter keeps waiting."""
    server = fresh_redis_server
    leader_client, waiter_client = server.client(), server.client()

    def cache(client: redis.Redis, namespace: str) -> CoalescingCache[str]:
        return CoalescingCache(client, ttl=60, distributed=True, namespace=namespace, lease_ttl=30)

    leaders = {ns: cache(leader_client, ns) for ns in ("orders", "users")}
    waiters = {ns: cache(waiter_client, ns) for ns in ("orders", "users")}
    gates = {ns: Gate(f"{ns} value") for ns in ("orders", "users")}
    loading = {ns: in_thread(lambda ns=ns: leaders[ns].get_or_load("k", gates[ns])) for ns in gates}  # type: ignore[misc]
    for gate in gates.values():
        assert gate.entered.wait(10)
    waiting = {ns: in_thread(lambda ns=ns: waiters[ns].get_or_load("k", gates[ns])) for ns in gates}  # type: ignore[misc]
    wait_until(lambda: all(c.stats().lease_waits == 1 for c in waiters.values()), deadline=10)
    admin = server.client()
    channels = [namespace_channel(ns).encode() for ns in ("orders", "users")]
    # Every process that missed listens (the leaders too, registered before
    # they looked): two clients, each one pub/sub connection on both channels.
    wait_until(lambda: admin.pubsub_numsub(*channels) == [(c, 2) for c in channels], deadline=10)
    assert [c["sub"] for c in admin.client_list(_type="pubsub")] == ["2", "2"]

    keys = {ns: str(waiters[ns]._key("k")) for ns in gates}
    gates["orders"].open()
    thread, got = waiting["orders"]
    thread.join(10)
    assert got == ["orders value"]
    assert woken[keys["orders"]][-1] is True  # the commit's message ended its wait
    users_thread, users_got = waiting["users"]
    assert users_thread.is_alive() and not users_got  # its lease is still held
    assert True not in woken[keys["users"]]  # no message for it yet

    gates["users"].open()
    users_thread.join(10)
    assert users_got == ["users value"]
    assert woken[keys["users"]][-1] is True
    for ns, (t, out) in loading.items():
        t.join(10)
        assert out == [f"{ns} value"]
        assert gates[ns].calls == 1
        assert waiters[ns].stats().loads == 0 and waiters[ns].stats().backend_errors == 0

"""The Redis backend on a real Redis Cluster (DESIGN.md item 24).

"Works on Redis Cluster: all keys one script touches share a hash slot, and
user text cannot choose the slot." A private 3-master cluster
(``LocalCluster``, the ``redis_cluster`` fixture) is reached through
``redis.cluster.RedisCluster``; what the cluster stores is read back node by
node with plain clients, so a key found on a node is really in that node's slots.

The cache swallows store errors (it counts them in ``backend_errors`` and
carries on as a plain in-process cache), so every test checks that counter:
a green round trip must have gone through the cluster.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from redis.cluster import RedisCluster

from stampede import CoalescingCache
from stampede._keys import encode_key
from stampede.backends import redis as redis_backend
from stampede.testing import Gate, wait_until
from tests.support.redis_server import LocalCluster

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def cluster(redis_cluster: LocalCluster) -> LocalCluster:
    """The session cluster, emptied for this test."""
    redis_cluster.reset()
    return redis_cluster


@pytest.fixture
def client(cluster: LocalCluster) -> Iterator[RedisCluster]:
    c = RedisCluster(
        host=cluster.host,
        port=cluster.ports[0],
        decode_responses=False,
        socket_timeout=10.0,
        socket_connect_timeout=2.0,
    )
    try:
        yield c
    finally:
        c.close()


def stored(cluster: LocalCluster) -> dict[bytes, int]:
    """Every key in the cluster, with the index of the node that holds it."""
    found: dict[bytes, int] = {}
    for index, node in enumerate(cluster.nodes):
        direct = node.client(socket_timeout=10, socket_connect_timeout=10)
        try:
            for key in direct.scan_iter(count=500):
                assert key not in found, f"{key!r} is on two nodes"
                found[key] = index
        finally:
            direct.close()
    return found


def slot_of(client: RedisCluster, key: bytes | str) -> int:
    """``CLUSTER KEYSLOT key`` as the cluster answers it."""
    text = key.decode() if isinstance(key, bytes) else key
    return int(client.cluster_keyslot(text))


def owner(cluster: LocalCluster, slot: int) -> int:
    """The index of the node whose slot range holds ``slot``."""
    for index, (first, last) in enumerate(cluster.slot_ranges()):
        if first <= slot <= last:
            return index
    raise AssertionError(f"slot {slot} is nobody's")


def no_store_errors(*caches: CoalescingCache[Any]) -> None:
    for cache in caches:
        assert cache.stats().backend_errors == 0, cache.stats()


# -- the harness --------------------------------------------------------------------


def test_the_cluster_is_up_and_private(cluster: LocalCluster, client: RedisCluster) -> None:
    assert len(cluster.nodes) == 3 and 6379 not in cluster.ports
    assert cluster.startup_nodes == [(cluster.host, port) for port in cluster.ports]
    info = client.cluster_info()
    assert info["cluster_state"] == "ok" and int(info["cluster_slots_assigned"]) == 16384
    assert cluster.slot_ranges() == [(0, 5460), (5461, 10921), (10922, 16383)]
    via_url = RedisCluster.from_url(cluster.url)
    try:
        assert via_url.ping()
    finally:
        via_url.close()


# -- (a) a plain cache on the cluster -------------------------------------------------


def test_round_trips(cluster: LocalCluster, client: RedisCluster) -> None:
    cache: CoalescingCache[Any] = CoalescingCache(client, ttl=60, namespace="rt")
    assert cache.get_or_load("a", lambda: {"v": 1}) == {"v": 1}
    assert cache.get_or_load("a", lambda: pytest.fail("loaded twice")) == {"v": 1}
    assert cache.get("a") == {"v": 1}
    cache.set("b", b"bytes")
    assert cache.get("b") == b"bytes"
    assert cache.get("missing", "dflt") == "dflt"
    cache.invalidate("a")
    assert cache.get("a") is None
    assert cache.get_or_load("a", lambda: "again") == "again"
    # A second cache (no local state of its own) reads what the first wrote.
    other: CoalescingCache[Any] = CoalescingCache(client, ttl=60, namespace="rt")
    assert other.get("a") == "again" and other.get("b") == b"bytes"
    assert len(stored(cluster)) == 2
    no_store_errors(cache, other)


def test_keys_spread_over_the_slots_and_nodes(cluster: LocalCluster, client: RedisCluster) -> None:
    cache: CoalescingCache[int] = CoalescingCache(client, ttl=60, namespace="spread")
    for i in range(300):
        cache.set(("user", i), i)
    keys = stored(cluster)
    assert len(keys) == 300
    slots = {key: slot_of(client, key) for key in keys}
    assert len(set(slots.values())) > 250  # 300 keys in 16384 slots: nearly all distinct
    assert set(keys.values()) == {0, 1, 2}  # every node holds some
    for key, node in keys.items():
        assert owner(cluster, slots[key]) == node
        assert key.startswith(b"stampede:{") and key[26:28] == b"}:"
    assert [cache.get(("user", i)) for i in range(300)] == list(range(300))
    no_store_errors(cache)


def test_user_text_cannot_choose_the_slot(cluster: LocalCluster, client: RedisCluster) -> None:
    cache: CoalescingCache[str] = CoalescingCache(client, ttl=60, namespace="tags")
    target = slot_of(client, "user1000")
    texts = ["{user1000}", "{user1000}:profile", "x{user1000}", ("{user1000}", 1)]
    for text in texts:
        cache.set(text, "v")
    keys = stored(cluster)
    assert len(keys) == len(texts)
    for text in texts:
        key = encode_key("tags", text).encode()
        assert key in keys and b"{user1000}" in key
        slot = slot_of(client, key)
        assert slot != target
        assert slot == slot_of(client, key[9:27])  # its own {digest} tag
    assert all(cache.get(text) == "v" for text in texts)
    no_store_errors(cache)


def test_clear_empties_every_node_but_only_its_namespace(
    cluster: LocalCluster, client: RedisCluster
) -> None:
    mine: CoalescingCache[int] = CoalescingCache(client, ttl=60, namespace="mine")
    theirs: CoalescingCache[int] = CoalescingCache(client, ttl=60, namespace="theirs")
    for i in range(200):
        mine.set(i, i)
        theirs.set(i, i)
    client.set(b"foreign", b"x")
    before = stored(cluster)
    assert len(before) == 401 and set(before.values()) == {0, 1, 2}
    mine.clear()
    after = stored(cluster)
    assert len(after) == 201 and b"foreign" in after
    assert mine.get(5) is None and theirs.get(5) == 5
    no_store_errors(mine, theirs)


# -- (b) distributed=True on the cluster ------------------------------------------


def run_threads(targets: list[Callable[[], None]]) -> list[threading.Thread]:
    threads = [threading.Thread(target=t, daemon=True) for t in targets]
    for t in threads:
        t.start()
    return threads


def join_all(threads: list[threading.Thread], deadline: float = 30.0) -> None:
    end = time.monotonic() + deadline
    for t in threads:
        t.join(max(0.0, end - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "callers still blocked"


@pytest.fixture
def wake_ups(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Spy on lease waits: True for a wait ended by a lease-done message, False
    for one that ran out (the poll fallback)."""
    seen: list[bool] = []
    lock = threading.Lock()

    def wait(self: Any, timeout: float) -> None:
        woken = self._event.wait(timeout)
        self._event.clear()
        with lock:
            seen.append(woken)

    monkeypatch.setattr(redis_backend._Listening, "wait", wait)
    return seen


def test_a_cold_key_is_loaded_once_by_20_threads(
    cluster: LocalCluster, client: RedisCluster, wake_ups: list[bool]
) -> None:
    # A cache per thread, as if each were a process of its own: nothing
    # coalesces in memory, only the lease in the cluster keeps it to one load.
    caches: list[CoalescingCache[str]] = [
        CoalescingCache(client, ttl=60, distributed=True, namespace="cold", lease_ttl=30)
        for _ in range(20)
    ]
    gate: Gate[str] = Gate("value")
    got: list[str] = []

    def call(cache: CoalescingCache[str]) -> Callable[[], None]:
        return lambda: got.append(cache.get_or_load("k", gate))

    threads = run_threads([call(c) for c in caches])
    assert gate.entered.wait(10)
    wait_until(lambda: sum(c.stats().lease_waits for c in caches) >= 19, deadline=10)
    started = time.monotonic()
    gate.open()
    join_all(threads)
    elapsed = time.monotonic() - started
    assert got == ["value"] * 20 and gate.calls == 1
    assert sum(c.stats().loads for c in caches) == 1
    assert True in wake_ups, "no waiter was woken by a lease-done message"
    assert elapsed < 10, f"waiters took {elapsed:.2f} s after the load"
    assert not [k for k in stored(cluster) if k.endswith(b":lease")]
    no_store_errors(*caches)


def test_the_lease_and_its_value_share_a_slot(cluster: LocalCluster, client: RedisCluster) -> None:
    cache: CoalescingCache[str] = CoalescingCache(
        client, ttl=60, distributed=True, namespace="lease"
    )
    gate: Gate[str] = Gate("v")
    got: list[str] = []
    threads = run_threads([lambda: got.append(cache.get_or_load("{user1000}", gate))])
    assert gate.entered.wait(10)
    leases = [k for k in stored(cluster) if k.endswith(b":lease")]
    assert len(leases) == 1
    lease = leases[0]
    value_key = encode_key("lease", "{user1000}").encode()
    assert lease == value_key + b":lease"
    lease_slot = slot_of(client, lease)
    assert lease_slot == slot_of(client, value_key)
    assert lease_slot != slot_of(client, "user1000")
    gate.open()
    join_all(threads)
    assert got == ["v"]
    keys = stored(cluster)
    assert list(keys) == [value_key]
    assert keys[value_key] == owner(cluster, lease_slot)
    no_store_errors(cache)


def test_invalidate_fences_a_gated_load(cluster: LocalCluster, client: RedisCluster) -> None:
    leader: CoalescingCache[str] = CoalescingCache(
        client, ttl=60, distributed=True, namespace="fence"
    )
    other: CoalescingCache[str] = CoalescingCache(
        client, ttl=60, distributed=True, namespace="fence"
    )
    gate: Gate[str] = Gate("stale")
    got: list[str] = []
    threads = run_threads([lambda: got.append(leader.get_or_load("k", gate))])
    assert gate.entered.wait(10)
    other.invalidate("k")  # breaks the lease (and drops the value) in the cluster
    assert not stored(cluster)
    gate.open()
    join_all(threads)
    assert got == ["stale"]  # its caller gets what it loaded ...
    assert leader.stats().fenced == 1  # ... but the cluster refused the write
    assert other.get("k") is None and not stored(cluster)
    assert other.get_or_load("k", lambda: "fresh") == "fresh"
    assert leader.get("k") == "fresh"
    no_store_errors(leader, other)


def test_lease_done_messages_reach_a_cluster_subscriber(
    cluster: LocalCluster, client: RedisCluster
) -> None:
    """The scripts PUBLISH on the node of the key's slot; a plain (non-sharded)
    PUBLISH reaches subscribers on every node of the cluster."""
    cache: CoalescingCache[str] = CoalescingCache(client, ttl=60, distributed=True, namespace="pub")
    keys = {encode_key("pub", i).encode(): i for i in range(6)}
    assert len({owner(cluster, slot_of(client, k)) for k in keys}) > 1
    subscribers = [node.client() for node in cluster.nodes]
    pubsubs = [s.pubsub(ignore_subscribe_messages=True) for s in subscribers]  # type: ignore[no-untyped-call]
    try:
        for p in pubsubs:
            p.subscribe(redis_backend.namespace_channel("pub"))
        for i in keys.values():
            assert cache.get_or_load(i, lambda i=i: f"v{i}") == f"v{i}"  # type: ignore[misc]
        for p in pubsubs:
            heard: set[bytes] = set()
            end = time.monotonic() + 30
            while not set(keys) <= heard and time.monotonic() < end:
                message = p.get_message(timeout=0.5)
                if message is not None and message["type"] == "message":
                    heard.add(message["data"])
            assert set(keys) <= heard
    finally:
        for p in pubsubs:
            p.close()
        for s in subscribers:
            s.close()
    no_store_errors(cache)


def test_asyncio_cluster_round_trips_and_one_load(cluster: LocalCluster) -> None:
    """The same on ``redis.asyncio.cluster.RedisCluster`` with AsyncCoalescingCache."""
    import asyncio

    from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

    from stampede import AsyncCoalescingCache
    from stampede.testing import AsyncGate

    async def main() -> None:
        aclient = AsyncRedisCluster(
            host=cluster.host, port=cluster.ports[0], decode_responses=False, socket_timeout=10.0
        )
        try:
            cache: AsyncCoalescingCache[Any] = AsyncCoalescingCache(aclient, ttl=60, namespace="a")
            assert await cache.get_or_load("x", lambda: "X") == "X"
            assert await cache.get("x") == "X"
            await cache.invalidate("x")
            assert await cache.get("x") is None
            for i in range(60):
                await cache.set(i, i)
            assert {node for node in stored(cluster).values()} == {0, 1, 2}
            await cache.clear()
            assert not stored(cluster)
            caches: list[AsyncCoalescingCache[str]] = [
                AsyncCoalescingCache(aclient, ttl=60, distributed=True, namespace="d")
                for _ in range(10)
            ]
            gate: AsyncGate[str] = AsyncGate("v")
            tasks = [asyncio.create_task(c.get_or_load("k", gate)) for c in caches]
            await asyncio.wait_for(gate.entered.wait(), 10)
            end = time.monotonic() + 30
            while sum(c.stats().lease_waits for c in caches) < 9:
                assert time.monotonic() < end, "the other callers never waited on the lease"
                await asyncio.sleep(0.005)
            gate.open()
            assert await asyncio.wait_for(asyncio.gather(*tasks), 20) == ["v"] * 10
            assert gate.calls == 1
            for c in [cache, *caches]:
                assert c.stats().backend_errors == 0, c.stats()
        finally:
            await aclient.aclose()

    asyncio.run(main())


def test_near_caches_on_a_cluster_hear_writes_made_through_any_node(
    cluster: LocalCluster, client: RedisCluster
) -> None:
    """Near caches on a Redis Cluster: a write announced by one client (its PUBLISH
    runs in the slot owner's script) reaches a near cache listening through another."""
    other = RedisCluster(host=cluster.host, port=cluster.ports[-1], socket_timeout=10.0)
    try:
        reader: CoalescingCache[str] = CoalescingCache(
            other, ttl=60, near_maxsize=100, near_ttl=600, namespace="near"
        )
        writer: CoalescingCache[str] = CoalescingCache(client, ttl=60, namespace="near")
        near = reader._near
        assert near is not None
        wait_until(lambda: near.ready, 10, "the near cache's subscription")
        keys = [f"user:{i}" for i in range(6)]  # over several slots and nodes
        for key in keys:
            heard = near.heard
            writer.set(key, "v1")
            wait_until(lambda heard=heard: near.heard > heard, 10, "the write's announcement")
            assert reader.get(key) == "v1"
        assert len(near) == len(keys)
        for key in keys:
            writer.set(key, "v2")
            wait_until(lambda key=key: reader.get(key) == "v2", 10, f"{key}'s new value")
    finally:
        other.close()

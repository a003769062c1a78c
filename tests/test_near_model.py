"""A stateful model of two caches with near tiers sharing one store (contract 29-30).

Two ``CoalescingCache`` objects on one store, each with its own near tier,
share a ``FakeClock``; a hypothesis state machine writes, invalidates, reads,
clears, writes behind stampede's back, and moves the clock. The property: a
read never returns a value older than the bounds allow.

- diskcache (no channel): a cache's read returns the store's current value, or
  the value it read itself less than ``near_ttl`` ago, if the store changed
  since through the *other* cache or behind stampede's back; its own writes are
  seen at once.
- Redis: each write through a cache is followed by a wait until the other
  cache's listener has heard it (a bounded wait, as the contract puts it);
  from then on both read the current value. A write behind stampede's back
  (not announced) may be hidden by a copy for less than ``near_ttl``.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import diskcache
import pytest
import redis
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    rule,
    run_state_machine_as_test,
)

import stampede
from stampede.testing import FakeClock, wait_until

NEAR_TTL = 5.0
KEYS = st.sampled_from(["a", "b"])
WHO = st.sampled_from([0, 1])
VALUES = st.integers(0, 3)


class _Possible:
    """What one cache may still return for a key: the current value, or an older
    one it read itself while its copy may live (until ``until`` on the clock)."""

    def __init__(self) -> None:
        self.copies: dict[str, tuple[Any, float]] = {}  # key -> (value read, copy's end)

    def allows(self, key: str, got: Any, current: Any, now: float) -> bool:
        if got == current:
            return True
        copy = self.copies.get(key)
        return copy is not None and copy[0] == got and now < copy[1]


class NearModel(RuleBasedStateMachine):
    """Shared logic; subclasses make the store and say how writes reach the other."""

    announced = False  # writes through stampede reach the other cache's tier (Redis)

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.current: dict[str, Any] = {}  # the store's value of each key (None: none)
        self.possible = [_Possible(), _Possible()]
        self.caches = self.make_caches()

    def make_caches(self) -> list[stampede.CoalescingCache[Any]]:
        raise NotImplementedError

    def raw_key(self, key: str) -> str:
        made = self.caches[0]._key(key)
        assert isinstance(made, str)
        return made

    def raw_delete(self, key: str) -> None:
        raise NotImplementedError

    def heard(self, writer: int) -> None:
        """After a write by ``writer``: wait until the other cache heard it (Redis)."""

    # -- rules ---------------------------------------------------------------------------

    @rule(who=WHO, key=KEYS, value=VALUES)
    def set(self, who: int, key: str, value: int) -> None:
        self.caches[who].set(key, value)
        self.current[key] = value
        self.after_write(who, key)

    @rule(who=WHO, key=KEYS)
    def invalidate(self, who: int, key: str) -> None:
        self.caches[who].invalidate(key)
        self.current[key] = None
        self.after_write(who, key)

    @rule(who=WHO)
    def clear(self, who: int) -> None:
        self.caches[who].clear()
        self.current.clear()
        for key in ("a", "b"):
            self.possible[who].copies.pop(key, None)
        if self.announced:
            self.heard(who)
            self.possible[1 - who].copies.clear()

    @rule(key=KEYS)
    def behind_our_back(self, key: str) -> None:
        """A write no stampede cache announces (a raw ``DEL``)."""
        self.raw_delete(key)
        self.current[key] = None

    @rule(who=WHO, key=KEYS)
    def read(self, who: int, key: str) -> None:
        now = self.clock()
        got = self.caches[who].get(key)
        current = self.current.get(key)
        assert self.possible[who].allows(key, got, current, now), (
            f"cache {who} read {got!r} for {key!r}; the store holds {current!r}, "
            f"its copy may be {self.possible[who].copies.get(key)!r} at {now}"
        )
        if got is not None:  # it may keep what it read, for near_ttl from now
            self.possible[who].copies[key] = (got, now + NEAR_TTL)

    @rule(seconds=st.sampled_from([0.5, 2.0, NEAR_TTL]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    def after_write(self, who: int, key: str) -> None:
        self.possible[who].copies.pop(key, None)  # its own write: seen at once
        if self.announced:
            self.heard(who)
            self.possible[1 - who].copies.pop(key, None)

    @invariant()
    def bounded(self) -> None:
        for cache in self.caches:
            near = cache._near
            assert near is not None and len(near) <= 10


class DiskNearModel(NearModel):
    def make_caches(self) -> list[stampede.CoalescingCache[Any]]:
        self.folder = Path(tempfile.mkdtemp(prefix="stampede-near-model-"))
        self.store = diskcache.Cache(str(self.folder))
        return [
            stampede.CoalescingCache(
                self.store, ttl=600, near_maxsize=10, near_ttl=NEAR_TTL, clock=self.clock
            )
            for _ in range(2)
        ]

    def raw_delete(self, key: str) -> None:
        self.store.delete(self.raw_key(key))

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.folder, ignore_errors=True)


class RedisNearModel(NearModel):
    announced = True
    url = ""  # set by the test, from the private server's fixture

    def make_caches(self) -> list[stampede.CoalescingCache[Any]]:
        namespace = f"model-{uuid.uuid4().hex}"
        self.clients = [redis.Redis.from_url(self.url) for _ in range(2)]
        caches: list[stampede.CoalescingCache[Any]] = [
            stampede.CoalescingCache(
                client,
                ttl=600,
                near_maxsize=10,
                near_ttl=NEAR_TTL,
                clock=self.clock,
                namespace=namespace,
            )
            for client in self.clients
        ]
        for cache in caches:
            wait_until(lambda cache=cache: cache._near is not None and cache._near.ready, 10)
        return caches

    def heard(self, writer: int) -> None:
        other = self.caches[1 - writer]._near
        assert other is not None
        # The writer's message is the last one sent; the other tier has heard it once
        # its count reaches what was sent to the channel so far.
        self.sent += 1
        wait_until(lambda: other.heard >= self.sent, 10, "the other cache to hear the write")

    sent = 0

    def raw_delete(self, key: str) -> None:
        self.clients[0].delete(self.raw_key(key))

    def teardown(self) -> None:
        for client in self.clients:
            client.close()


TestDiskNearModel = DiskNearModel.TestCase
TestDiskNearModel.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)


@pytest.mark.timeout(300)
def test_redis_near_model(redis_url: str) -> None:
    RedisNearModel.url = redis_url
    run_state_machine_as_test(
        RedisNearModel, settings=settings(max_examples=60, stateful_step_count=25, deadline=None)
    )

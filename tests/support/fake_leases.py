"""An in-memory store with leases, for unit tests of the leader's work.

``DictLeaseStore`` is a ``SharedStore`` (bytes, envelopes, the codec, the
breaker: everything a real shared store goes through) whose raw operations
are on dicts of this process, under one condition variable. Two caches on one
``DictLeaseStore`` behave like two processes on one Redis: they share values
and leases, a commit wakes the other's waiters, a lease expires by itself.
``down = True`` makes every operation fail as a dead store would. It proves
itself against the same lease conformance suite as Redis and diskcache
(``tests/test_leases.py``).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

from stampede._keys import key_rest
from stampede.backends import SharedStore


class DictLeaseStore(SharedStore):
    name = "DictLeaseStore"
    supports_leases = True
    errors: tuple[type[BaseException], ...] = (ConnectionError,)

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._values: dict[str, tuple[bytes, float]] = {}  # key -> (bytes, expiry)
        self._leases: dict[str, tuple[str, float]] = {}  # key -> (token, expiry)
        self._cond = threading.Condition()
        self._ended: dict[str, int] = {}  # key -> leases ended so far (wakes listeners)
        self._down = threading.Event()  # shared by the views caches bind (copies)
        self.calls: Counter[str] = Counter()  # raw operations, by name

    @property
    def down(self) -> bool:
        """True: every operation fails as a dead store's would (a ConnectionError)."""
        return self._down.is_set()

    @down.setter
    def down(self, value: bool) -> None:
        if value:
            self._down.set()
        else:
            self._down.clear()

    @staticmethod
    def _now() -> float:
        return time.monotonic()

    def _enter(self, op: str) -> None:
        self.calls[op] += 1
        if self._down.is_set():
            raise ConnectionError(f"{self.name} is down")

    def _live_value(self, key: str) -> tuple[bytes, float] | None:
        found = self._values.get(key)
        if found is not None and found[1] <= self._now():
            del self._values[key]
            return None
        return found

    def _holder(self, key: str) -> str | None:
        found = self._leases.get(key)
        if found is None:
            return None
        if found[1] <= self._now():
            del self._leases[key]
            return None
        return found[0]

    # -- entries --------------------------------------------------------------------

    def _get_raw(self, key: str) -> tuple[bytes | int | None, float | None]:
        self._enter("get")
        with self._cond:
            found = self._live_value(key)
        if found is None:
            return None, None
        return found[0], found[1] - self._now()

    def _set_raw(self, key: str, data: bytes, ttl: float) -> None:
        self._enter("set")
        with self._cond:
            self._values[key] = (data, self._now() + ttl)

    def _delete_raw(self, key: str) -> None:
        self._enter("delete")
        with self._cond:
            self._values.pop(key, None)

    def _clear_raw(self, prefix: str) -> None:
        self._enter("clear")
        with self._cond:
            for key in [k for k in self._values if key_rest(k).startswith(prefix)]:
                del self._values[key]

    # -- leases -----------------------------------------------------------------------

    def _lease_acquire_raw(
        self, key: str, token: str, lease_ttl: float
    ) -> tuple[bool, bytes | int | None, float | None]:
        self._enter("lease_acquire")
        with self._cond:
            taken = self._holder(key) is None
            if taken:
                self._leases[key] = (token, self._now() + lease_ttl)
            found = self._live_value(key)
        if found is None:
            return taken, None, None
        return taken, found[0], found[1] - self._now()

    def _lease_renew_raw(self, key: str, token: str, lease_ttl: float) -> bool:
        self._enter("lease_renew")
        with self._cond:
            if self._holder(key) != token:
                return False
            self._leases[key] = (token, self._now() + lease_ttl)
            return True

    def _lease_commit_raw(
        self, key: str, token: str, data: bytes | None, ttl: float, drop: bool = False
    ) -> bool:
        self._enter("lease_commit")
        with self._cond:
            if self._holder(key) != token:
                return False
            if data:
                self._values[key] = (data, self._now() + ttl)
            elif drop:
                self._values.pop(key, None)
            del self._leases[key]
            self._wake(key)
            return True

    def _lease_break_raw(
        self, key: str, drop_value: bool, data: bytes | None = None, ttl: float = 0.0
    ) -> None:
        self._enter("lease_break")
        with self._cond:
            self._leases.pop(key, None)
            if data:
                self._values[key] = (data, self._now() + ttl)
            elif drop_value:
                self._values.pop(key, None)
            self._wake(key)

    def _wake(self, key: str) -> None:
        self._ended[key] = self._ended.get(key, 0) + 1
        self._cond.notify_all()

    def lease_listen(self, key: str) -> _Listening:
        return _Listening(self, key)

    def holder(self, key: str) -> str | None:
        """The token holding ``key``'s lease now (a store key), for assertions."""
        with self._cond:
            return self._holder(key)

    def __repr__(self) -> str:
        return "DictLeaseStore()"


class _Listening:
    """Listening for the end of a key's lease, from before the caller looks (as
    a Redis subscription does): an end that comes before ``wait`` is not lost."""

    def __init__(self, store: DictLeaseStore, key: str) -> None:
        self._store = store
        self._key = key
        self._seen = 0

    def __enter__(self) -> _Listening:
        with self._store._cond:
            self._seen = self._store._ended.get(self._key, 0)
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def wait(self, timeout: float) -> None:
        """Until the key's lease ends (or ``timeout``); then the caller looks again."""
        store = self._store
        with store._cond:
            store._cond.wait_for(lambda: store._ended.get(self._key, 0) != self._seen, timeout)
            self._seen = store._ended.get(self._key, 0)

"""The near cache: copies of a shared store's entries kept in this process.

A near copy is an entry as read from the shared store (Redis, diskcache),
with the shared entry's timing on this process's clock, kept for at most
``near_ttl`` seconds after the read that brought it, and never past the
entry's own stale end. The hit path serves it with no I/O; anything the hit
path does not serve (a refresh due, a stale or negative entry) goes to the
slow path, which decides on the same copy with the same rules as on an entry
just read (DESIGN.md section 7, contract items 28-32).

Coherence. Every write through a cache on the store (``set``,
``invalidate``, ``clear``, a committed load or refresh), in any process,
announces the key on its namespace's channel; each process with a near tier
listens there and drops the key (``drop``). A process's own writes drop the
key as their fence is left. Loads never put their value here: the next read
brings it from the store, so a fenced load cannot reach a near cache.

What a read brings is kept only if no drop of its key, and no ``drop_all``,
came after the read began (``begin`` returns the generation the read saw):
a read that raced an invalidation cannot put back the value it replaced.

While the channel is down (not yet subscribed, the connection lost), the tier
is not ``ready``: it is emptied and keeps nothing, so every read goes to the
store; messages missed meanwhile cannot leave a stale copy. A store without a
channel (diskcache) is always ready; there ``near_ttl`` is the only bound on
another process's write.

Copies are evicted oldest-kept first when ``maxsize`` is reached.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable, Hashable
from typing import Any

from ._entry import Entry


class _Copy:
    """A near copy: what the hit path reads (``value``, ``check_at``), the shared
    entry for the slow path, and the end of the copy's life."""

    __slots__ = ("value", "check_at", "entry", "until")

    def __init__(self, entry: Entry[Any], until: float) -> None:
        self.value = entry.value
        # The hit path serves the copy while its clock is before this: the entry's
        # refresh point or the copy's end, whichever comes first (-inf for an error).
        self.check_at = min(entry.check_at, until)
        self.entry = entry
        self.until = until


class NearTier:
    """Near copies of one cache's entries; see the module docstring."""

    def __init__(
        self, maxsize: int, ttl: float, clock: Callable[[], float], *, watched: bool
    ) -> None:
        self.maxsize: int = maxsize
        self.ttl: float = ttl
        self._clock = clock
        self._copies: dict[Hashable, _Copy] = {}
        # The hit path's read (a dict's own get: no Python frame).
        self.get: Callable[[Hashable], _Copy | None] = self._copies.get
        # Reentrant: a finalizer run while it is held may read through the cache.
        self._lock = threading.RLock()
        self._generation: int = 0  # bumped by every drop
        self._floor: int = 0  # reads begun before this generation keep nothing
        self._dropped: dict[Hashable, int] = {}  # key -> the generation of its last drop
        self.watched: bool = watched  # its store announces writes on a channel (Redis)
        self.ready: bool = not watched  # a tier with a channel waits for its subscription
        self.watching: set[Any] = set()  # the listeners it is registered with (by the store)
        self.heard: int = 0  # messages heard (tests wait on it)
        _tiers.add(self)

    def __len__(self) -> int:
        return len(self._copies)

    # -- reads ---------------------------------------------------------------------

    def entry(self, k: Hashable, now: float) -> Entry[Any] | None:
        """The shared entry of ``k``'s near copy, if it has one still within its life."""
        copy = self._copies.get(k)
        if copy is None:
            return None
        if now < copy.until:
            return copy.entry
        with self._lock:
            if self._copies.get(k) is copy:
                del self._copies[k]
        return None

    def refreshing(self, k: Hashable, entry: Entry[Any]) -> None:
        """``entry``'s early refresh is started (here, or by the process holding its
        lease): its copy is served by the hit path again, until the entry's fresh end
        (or the copy's), rather than deciding again on every read until the refresh's
        announcement drops it."""
        copy = self._copies.get(k)
        if copy is not None and copy.entry is entry:
            copy.check_at = min(entry.fresh_until, copy.until)

    def begin(self) -> int:
        """The generation a store read begins at (give it to ``keep``)."""
        return self._generation

    def keep(self, k: Hashable, entry: object, began: int) -> None:
        """Keep what a store read that began at ``began`` brought, unless it may be stale."""
        if type(entry) is not Entry or not self.ready:
            return
        now = self._clock()
        until = min(now + self.ttl, entry.stale_until)
        if not until > now:
            return
        copy = _Copy(entry, until)
        with self._lock:
            if not self.ready or began < self._floor or self._dropped.get(k, -1) > began:
                return  # dropped (or the channel lost) since the read began
            copies = self._copies
            if k not in copies and len(copies) >= self.maxsize:
                del copies[next(iter(copies))]  # the oldest kept (changed only under _lock)
            copies.pop(k, None)  # kept again: now the newest
            copies[k] = copy

    # -- drops ---------------------------------------------------------------------

    def drop(self, k: Hashable) -> None:
        """``k`` was written (here or in another process): forget its copy."""
        with self._lock:
            self._generation += 1
            self._copies.pop(k, None)
            dropped = self._dropped
            if len(dropped) >= 4 * self.maxsize + 1024:
                # Bounded: forget the keys dropped so far, and refuse every read
                # begun before now instead (a few copies not kept, never a stale one).
                dropped.clear()
                self._floor = self._generation
            dropped[k] = self._generation

    def drop_all(self) -> None:
        """Forget every copy, and keep nothing a read begun before now brings."""
        with self._lock:
            self._generation += 1
            self._floor = self._generation
            self._copies.clear()
            self._dropped.clear()

    def lost(self) -> None:
        """The channel is down: empty the tier and keep nothing until it is back."""
        with self._lock:
            self.ready = False
            self.drop_all()

    def found(self) -> None:
        """The channel is (back) up: messages reach this process from now on."""
        with self._lock:
            self.drop_all()  # whatever a read begun while it was down brings is refused
            self.ready = True

    def message(self, data: bytes | str) -> None:
        """A write announced on the channel: the key, or ``*`` for a clear."""
        key = data.decode("utf-8", "surrogatepass") if isinstance(data, bytes) else data
        if key == CLEAR_MARK:
            self.drop_all()
        else:
            self.drop(key)
        self.heard += 1


CLEAR_MARK = "*"  # what a clear announces (no store key is "*")


# Every tier, so that a forked child starts with none of its parent's copies and
# no listener: the parent's listener threads and tasks do not exist there.
_tiers: weakref.WeakSet[NearTier] = weakref.WeakSet()


def _after_fork() -> None:
    for tier in list(_tiers):
        tier._lock = threading.RLock()
        tier.watching.clear()
        if tier.watched:
            tier.ready = False
        tier.drop_all()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)

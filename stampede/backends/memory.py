"""The in-process backend: entries kept as objects in a mapping.

Any ``MutableMapping`` works, cachetools caches included, used as they are
(their own ``maxsize``/``ttl`` still evict). The default store is cachebox's
``LRUCache``: bounded, implemented in Rust, thread-safe, and about as cheap to
read as a dict, which the hit-path target needs (cachetools' ``LRUCache`` is
pure Python and alone costs more than that budget). Without cachebox the
default falls back to a locked cachetools ``LRUCache``.

Plain dicts and cachebox caches are safe to share between threads; other
mappings (cachetools caches reorder or expire items on a read) are guarded by
a lock of this backend's own, unless ``lock=False`` says the mapping is safe.

A mapping the user gives may hold the application's own values too. stampede
keeps its own ``Entry`` objects there and touches nothing else: a write or a
delete of a key whose value is not an ``Entry`` leaves that value in place
(warned about once per key), and ``clear()`` drops entries only. The check is
one extra read per write, never on the hit path, and only for a mapping that
is not the default store (whose keys only stampede writes). Against another
thread writing the same key at the same instant without this backend's lock
(a ``dict``, a cachebox cache) it is best effort: the later write wins.
"""

from __future__ import annotations

import copy
import datetime
import logging
import reprlib
import sys
import threading
import warnings
from collections.abc import Callable, Hashable, MutableMapping
from typing import Any

from .._entry import Entry

DEFAULT_MAXSIZE = 4096

NS_MARK = object()  # first item of a namespaced key: no user key can contain it

_ABSENT = object()  # what ``mapping.get`` answers for a key with no value at all

_WARNED_MAX = 1024  # keys warned about per mapping; then one last warning, then silence

_log = logging.getLogger("stampede")


def _default_store(maxsize: int) -> tuple[Any, bool]:
    """The default bounded store and whether it needs our lock."""
    try:
        import cachebox
    except ImportError:  # pragma: no cover - cachebox is a core dependency
        import cachetools

        return cachetools.LRUCache(maxsize), True
    return cachebox.LRUCache(maxsize), False


def _thread_safe(mapping: object) -> bool:
    if type(mapping) is dict:
        return True
    try:
        import cachebox
    except ImportError:  # pragma: no cover
        return False
    return isinstance(mapping, cachebox.BaseCacheImpl)


def is_mapping(obj: object) -> bool:
    """Can ``MemoryBackend`` wrap ``obj``?"""
    if isinstance(obj, MutableMapping):
        return True
    return all(callable(getattr(obj, name, None)) for name in ("get", "__setitem__", "pop"))


def _warn(message: str) -> None:
    """A ``UserWarning`` shown at the first caller outside stampede: the line that
    made the cache, however many of stampede's frames lie between."""
    frame: Any = sys._getframe(0)
    level = 1
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] == "stampede":
        frame = frame.f_back
        level += 1
    warnings.warn(message, UserWarning, stacklevel=level)


def _shared_elsewhere(mapping: object) -> str | None:
    """Why ``mapping`` keeps its items outside this process, when that is plain
    from its type (a facade over Redis or Django's cache is not: see the docs)."""
    if type(mapping).__module__.split(".")[0] == "diskcache":
        return f"a diskcache {type(mapping).__name__} keeps its items in a folder"
    shelve = sys.modules.get("shelve")
    if shelve is not None and isinstance(mapping, shelve.Shelf):
        return "a shelf keeps its items in a file"
    return None


def _lifetime(mapping: object) -> float | None:
    """The seconds ``mapping`` keeps an item, when it says so publicly: cachetools'
    ``TTLCache.ttl``, cachebox's ``TTLCache.global_ttl``."""
    for name in ("ttl", "global_ttl"):
        value = getattr(mapping, name, None)
        if isinstance(value, datetime.timedelta):
            return value.total_seconds()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def check_lifetime(store: object, seconds: float | None) -> None:
    """Warn when ``store`` wraps a mapping that expires items sooner than ``seconds``
    (the cache's ``ttl + stale_ttl``; None: not known, no check)."""
    if seconds is None or not isinstance(store, MemoryBackend) or store.owned:
        return
    kept = _lifetime(store.mapping)
    if kept is not None and kept < seconds:
        _warn(
            f"the wrapped {type(store.mapping).__name__} expires items after {kept:g} s, "
            f"before this cache's ttl + stale_ttl ({seconds:g} s): entries will vanish "
            f"early and load again. Give the mapping a ttl of at least {seconds:g} s, or "
            f"wrap a mapping without one (an LRUCache)"
        )


class MemoryBackend:
    """Entries held as Python objects in a mapping of this process.

    Args:
        mapping: the store to use as it is; ``None`` builds a bounded LRU. Values
            that stampede did not write there are left alone (see the module).
        maxsize: the size of the LRU built when ``mapping`` is ``None``.
        lock: guard the mapping with a lock; ``None`` decides by its type.
    """

    local = True  # entries are objects of this process: no serialization

    get: Callable[[Hashable], Entry[Any] | None]
    set: Callable[[Hashable, Entry[Any]], None]
    mapping: Any  # the mapping entries live in
    owned: bool  # the default store, built here: nobody else writes its keys

    def __init__(
        self,
        mapping: Any = None,
        *,
        maxsize: int = DEFAULT_MAXSIZE,
        lock: bool | None = None,
    ) -> None:
        self.owned = mapping is None
        if mapping is None:
            if maxsize < 1:
                raise ValueError(f"maxsize must be at least 1, got {maxsize!r}")
            mapping, needs_lock = _default_store(maxsize)
        else:
            if not is_mapping(mapping):
                raise TypeError(
                    f"MemoryBackend keeps stampede's entries in a mutable mapping of this "
                    f"process; got {type(mapping).__name__}, which is not one"
                )
            needs_lock = not _thread_safe(mapping)
            elsewhere = _shared_elsewhere(mapping)
            if elsewhere is not None:
                _warn(
                    f"{elsewhere}, outside this process, but stampede wraps it as an "
                    f"in-process mapping: its entries carry this process's monotonic "
                    f"deadlines, which mean nothing to another process or after a reboot. "
                    f"For a store shared between processes pass a diskcache.Cache, "
                    f"'disk:///path' or a Redis client"
                )
        if lock is not None:
            needs_lock = lock
        self.mapping = mapping
        self._warned: dict[Hashable, None] = {}  # keys whose foreign value was reported
        self._guard: threading.RLock | None = None
        owned = self.owned
        write = self._write
        if needs_lock:
            # Reentrant: the mapping's own code, a finalizer or a signal handler
            # run on this thread may call the cache (and so the mapping) again.
            guard = self._guard = threading.RLock()

            def get(key: Hashable) -> Entry[Any] | None:
                with guard:
                    return mapping.get(key)  # type: ignore[no-any-return]

            def set_(key: Hashable, entry: Entry[Any]) -> None:
                with guard:
                    write(key, entry)

            def delete(key: Hashable) -> None:
                with guard:
                    self._drop(key)

            self.get, self.set, self.delete = get, set_, delete  # type: ignore[method-assign]
        else:
            # Bound methods of the mapping itself: the hit path is one C call.
            self.get = mapping.get
            self.set = mapping.__setitem__ if owned else write
            self._pop = mapping.pop

    namespace = ""  # set on the view a cache binds (``bind``): the scope of ``clear()``

    def delete(self, key: Hashable) -> None:
        if self.owned:
            self._pop(key, None)
        else:
            self._drop(key)

    def _write(self, key: Hashable, entry: Entry[Any]) -> None:
        """Store ``entry`` unless the key holds a value stampede did not write."""
        mapping = self.mapping
        if not self.owned:
            current = mapping.get(key, _ABSENT)
            if current is not _ABSENT and type(current) is not Entry:
                self._foreign(key, current)
                return
        mapping[key] = entry

    def _drop(self, key: Hashable) -> None:
        """Delete the entry under ``key``; a value stampede did not write stays."""
        mapping = self.mapping
        current = mapping.get(key, _ABSENT)
        if type(current) is Entry:
            mapping.pop(key, None)
        elif current is not _ABSENT:
            self._foreign(key, current)

    def _foreign(self, key: Hashable, value: object) -> None:
        """Report, once per key, a value of someone else's that a write left in place."""
        warned = self._warned
        if key in warned or len(warned) > _WARNED_MAX:
            return
        warned[key] = None
        if len(warned) > _WARNED_MAX:
            _log.warning(
                "more than %d keys of this mapping hold foreign objects; no more are "
                "reported (serialization_errors still counts the reads that find them)",
                _WARNED_MAX,
            )
            return
        _log.warning(
            "ignoring a foreign object of type %s in the store, under key %s: stampede "
            "neither overwrites nor deletes it, and values loaded for this key are returned "
            "without being stored (reported once per key; serialization_errors counts "
            "every read that finds it)",
            type(value).__name__,
            reprlib.repr(key),
        )

    def bind(self, namespace: str) -> MemoryBackend:
        """A view of this store for a cache in ``namespace`` (the same mapping and lock);
        the store itself when it is bound to that namespace already."""
        if namespace == self.namespace:
            return self
        view = copy.copy(self)
        view.namespace = namespace
        return view

    # The async cache awaits the same operations: one shape for every store, so
    # the cache's I/O is written once (stampede/_async/engine.py). They never
    # suspend, and a subclass must keep it so: the async cache holds a thread
    # lock (the key's fence) across an in-process store's write.

    async def aget(self, key: Hashable) -> Entry[Any] | None:
        return self.get(key)

    async def aset(self, key: Hashable, entry: Entry[Any]) -> None:
        self.set(key, entry)

    async def adelete(self, key: Hashable) -> None:
        self.delete(key)

    async def aclear(self) -> None:
        self.clear()

    @staticmethod
    def key_maker(namespace: str) -> Callable[[Hashable], Hashable] | None:
        """How a cache in ``namespace`` turns a key into a store key (``None``: as it is)."""
        if not namespace:
            return None

        def make(key: Hashable) -> Hashable:
            return (NS_MARK, namespace, key)

        return make

    def clear(self, namespace: str | None = None) -> None:
        """Drop the entries of ``namespace`` (default: the bound one); other keys stay,
        and so do values stampede did not write."""
        if namespace is None:
            namespace = self.namespace
        if self._guard is None:
            self._clear(namespace)
        else:
            with self._guard:
                self._clear(namespace)

    def _clear(self, namespace: str) -> None:
        mapping = self.mapping
        for key in list(mapping.keys()):
            if type(key) is tuple and len(key) == 3 and key[0] is NS_MARK:
                if key[1] == namespace:  # a namespaced key: only stampede makes one
                    mapping.pop(key, None)
            elif not namespace and type(mapping.get(key)) is Entry:
                mapping.pop(key, None)  # a key of the app's own may be there too

    def __len__(self) -> int:
        return len(self.mapping)

    def __repr__(self) -> str:
        return f"MemoryBackend({type(self.mapping).__module__}.{type(self.mapping).__qualname__})"

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
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Hashable, MutableMapping
from typing import Any

from .._entry import Entry

DEFAULT_MAXSIZE = 4096

NS_MARK = object()  # first item of a namespaced key: no user key can contain it


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


class MemoryBackend:
    """Entries held as Python objects in a mapping of this process.

    Args:
        mapping: the store to use as it is; ``None`` builds a bounded LRU.
        maxsize: the size of the LRU built when ``mapping`` is ``None``.
        lock: guard the mapping with a lock; ``None`` decides by its type.
    """

    local = True  # entries are objects of this process: no serialization

    get: Callable[[Hashable], Entry[Any] | None]
    set: Callable[[Hashable, Entry[Any]], None]

    def __init__(
        self,
        mapping: Any = None,
        *,
        maxsize: int = DEFAULT_MAXSIZE,
        lock: bool | None = None,
    ) -> None:
        if mapping is None:
            if maxsize < 1:
                raise ValueError(f"maxsize must be at least 1, got {maxsize!r}")
            mapping, needs_lock = _default_store(maxsize)
        else:
            if not is_mapping(mapping):
                raise TypeError(
                    f"MemoryBackend needs a mutable mapping, got {type(mapping).__name__}"
                )
            needs_lock = not _thread_safe(mapping)
        if lock is not None:
            needs_lock = lock
        self.mapping = mapping
        self._guard: threading.RLock | None = None
        if needs_lock:
            # Reentrant: the mapping's own code, a finalizer or a signal handler
            # run on this thread may call the cache (and so the mapping) again.
            guard = self._guard = threading.RLock()

            def get(key: Hashable) -> Entry[Any] | None:
                with guard:
                    return mapping.get(key)  # type: ignore[no-any-return]

            def set_(key: Hashable, entry: Entry[Any]) -> None:
                with guard:
                    mapping[key] = entry

            def delete(key: Hashable) -> None:
                with guard:
                    mapping.pop(key, None)

            self.get, self.set, self.delete = get, set_, delete  # type: ignore[method-assign]
        else:
            # Bound methods of the mapping itself: the hit path is one C call.
            self.get = mapping.get
            self.set = mapping.__setitem__
            self._pop = mapping.pop

    namespace = ""  # set on the view a cache binds (``bind``): the scope of ``clear()``

    def delete(self, key: Hashable) -> None:
        self._pop(key, None)

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
        """Drop the entries of ``namespace`` (default: the bound one); other keys stay."""
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
            namespaced = type(key) is tuple and len(key) == 3 and key[0] is NS_MARK
            if (key[1] == namespace) if namespaced else not namespace:
                mapping.pop(key, None)

    def __len__(self) -> int:
        return len(self.mapping)

    def __repr__(self) -> str:
        return f"MemoryBackend({type(self.mapping).__module__}.{type(self.mapping).__qualname__})"

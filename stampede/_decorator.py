"""``@cached``: a function's results in a ``CoalescingCache``, keyed by its arguments.

The wrapper is built once, when decorating (sync or async), from the hit
path's one template (``_hitpath``): the key (for the usual call, the ``args``
tuple itself), one store read, one clock read, one comparison, then the
cache's slow path for anything else, so every decision stays in one place.

A function gets a bounded in-process cache of its own unless ``cache=`` names
one (a backend, a URL, or a ready cache shared by several functions; in a
shared cache each function's keys carry its qualified name).
"""

from __future__ import annotations

import functools
import inspect
import sys
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Hashable
from typing import Any, Concatenate, NamedTuple, ParamSpec, Protocol, TypeVar, overload

from ._acache import AsyncCoalescingCache
from ._base import CacheBase
from ._binding import Deferred
from ._cache import CoalescingCache
from ._hitpath import make_wrapper
from ._keys import FN_MARK, CallKey, FunctionKeys, function_prefix, key_rest
from ._options import CacheOptions
from ._stats import Stats
from .backends import SharedStore
from .backends.memory import DEFAULT_MAXSIZE, NS_MARK, MemoryBackend

# At run time too: tools read these hints (typing.get_type_hints, inspect).
if sys.version_info >= (3, 11):
    from typing import Self, Unpack
else:
    from typing_extensions import Self, Unpack

P = ParamSpec("P")
Q = ParamSpec("Q")
S = TypeVar("S")
R = TypeVar("R")
T = TypeVar("T")


class CacheInfo(NamedTuple):
    """``functools``-style summary of a cached function, plus stampede's counters."""

    hits: int
    misses: int
    maxsize: int | None
    currsize: int
    stats: Stats


class CachedFunction(Protocol[P, R]):
    """What ``@cached`` returns for a plain function (the signature is kept)."""

    __wrapped__: Callable[P, R]
    cache: CoalescingCache[R]

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R: ...

    # A method: through the class, the function with its helpers (which take the
    # instance first); through an instance, a bound method (its call only).
    @overload
    def __get__(self, instance: None, owner: type[Any] | None = None, /) -> Self: ...

    @overload
    def __get__(
        self: CachedFunction[Concatenate[S, Q], R], instance: S, owner: type[Any] | None = None, /
    ) -> Callable[Q, R]: ...

    @overload
    def __get__(self, instance: object, owner: type[Any] | None = None, /) -> Callable[..., R]: ...

    def cache_key(self, *args: P.args, **kwargs: P.kwargs) -> Hashable:
        """The key ``self.cache`` uses for this call."""
        ...

    def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> None:
        """Drop this call's cached result (and fence a load of it in flight)."""
        ...

    def refresh(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the function now for this call, store and return the result."""
        ...

    def cache_info(self) -> CacheInfo: ...

    def cache_clear(self) -> None: ...


class AsyncCachedFunction(Protocol[P, T]):
    """What ``@cached`` returns for an ``async def`` function."""

    __wrapped__: Callable[P, Awaitable[T]]
    cache: AsyncCoalescingCache[T]

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, T]: ...

    @overload
    def __get__(self, instance: None, owner: type[Any] | None = None, /) -> Self: ...

    @overload
    def __get__(
        self: AsyncCachedFunction[Concatenate[S, Q], T],
        instance: S,
        owner: type[Any] | None = None,
        /,
    ) -> Callable[Q, Coroutine[Any, Any, T]]: ...

    @overload
    def __get__(
        self, instance: object, owner: type[Any] | None = None, /
    ) -> Callable[..., Coroutine[Any, Any, T]]: ...

    def cache_key(self, *args: P.args, **kwargs: P.kwargs) -> Hashable: ...

    async def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> None: ...

    async def refresh(self, *args: P.args, **kwargs: P.kwargs) -> T: ...

    def cache_info(self) -> CacheInfo: ...

    async def cache_clear(self) -> None: ...


class _Decorator(Protocol):
    @overload
    def __call__(  # type: ignore[overload-overlap]
        self, fn: Callable[P, Coroutine[Any, Any, T]], /
    ) -> AsyncCachedFunction[P, T]: ...

    @overload
    def __call__(self, fn: Callable[P, R], /) -> CachedFunction[P, R]: ...


@overload
def cached(  # type: ignore[overload-overlap]
    fn: Callable[P, Coroutine[Any, Any, T]], /
) -> AsyncCachedFunction[P, T]: ...


@overload
def cached(fn: Callable[P, R], /) -> CachedFunction[P, R]: ...


@overload
def cached(
    *,
    cache: Any = None,
    key: Callable[..., Hashable] | None = None,
    typed: bool = False,
    **options: Unpack[CacheOptions],
) -> _Decorator: ...


def cached(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    cache: Any = None,
    key: Callable[..., Hashable] | None = None,
    typed: bool = False,
    **options: Any,
) -> Any:
    """Cache a function's results, loading each missing key once for all callers.

    Args:
        cache: where results go: ``None`` for a bounded in-process cache of
            this function's own (``maxsize`` entries), a backend or URL (a new
            cache on it), or a ready ``CoalescingCache``/``AsyncCoalescingCache``
            (shared: this function's keys carry its qualified name).
        key: ``key(*args, **kwargs) -> Hashable`` instead of the signature's key.
        typed: arguments of different types are different keys (``1``, ``1.0``, ``True``).
        **options: the options of ``CoalescingCache`` (``CacheOptions``), for
            the cache made for this function: ``ttl`` (seconds a result is
            fresh, default 60, or a function of the result), ``maxsize`` (the
            size of the function's own cache, default 4096), ``beta``,
            ``stale_ttl``, ``cache_errors``, ``error_ttl``, ``wait_timeout``,
            ``cache_if``, ...; ``None`` means "the default". Next to a ready
            cache, the policy options (``ttl``, ``stale_ttl``, ``beta``,
            ``cache_errors``, ``error_ttl``, ``wait_timeout``, ``cache_if``)
            apply to this function's calls only.

    Raises ``TypeError`` at decoration for a sync cache on an ``async def``
    function (or the reverse), or an option that defines the store
    (``serializer``, ``maxsize``, ...) next to a ready cache; at call time for
    an argument that cannot be part of a key.
    """
    options = {name: value for name, value in options.items() if value is not None}
    maxsize = options.pop("maxsize", None)

    def decorate(fn: Any) -> Any:
        if isinstance(fn, (staticmethod, classmethod)):
            return type(fn)(decorate(fn.__func__))
        if not callable(fn):
            raise TypeError(f"@cached needs a function, got {type(fn).__name__}")
        is_async = inspect.iscoroutinefunction(fn)
        if isinstance(cache, Deferred):  # its store is given at startup (stampede.bind)

            def build(target: Any, namespace: dict[str, Any]) -> Any:
                return _wrap(fn, is_async, target, maxsize, dict(options), key, typed, namespace)

            return cache._declare(fn, is_async, build)
        return _wrap(fn, is_async, cache, maxsize, options, key, typed)

    if fn is not None:
        return decorate(fn)
    return decorate


def _wrap(
    fn: Callable[..., Any],
    is_async: bool,
    cache: Any,
    maxsize: int | None,
    options: dict[str, Any],
    key: Callable[..., Hashable] | None,
    typed: bool,
    namespace: dict[str, Any] | None = None,
) -> Any:
    """``fn`` wrapped on the cache that ``cache=`` names (``namespace``: see ``_hitpath``)."""
    store, shared = _cache_for(fn, is_async, cache, maxsize, options)
    if isinstance(store, AsyncCoalescingCache):
        return _wrap_async(fn, store, shared, key, typed, namespace)
    assert isinstance(store, CoalescingCache)
    return _wrap_sync(fn, store, shared, key, typed, namespace)


def _cache_for(
    fn: Callable[..., Any],
    is_async: bool,
    cache: Any,
    maxsize: int | None,
    options: dict[str, Any],
) -> tuple[CacheBase[Any], bool]:
    """The cache ``fn`` uses, and whether other functions may share it."""
    kind: type[CacheBase[Any]] = AsyncCoalescingCache if is_async else CoalescingCache
    if isinstance(cache, CacheBase):
        if not isinstance(cache, kind):
            raise TypeError(
                f"{fn.__qualname__} is {'an async' if is_async else 'a sync'} function: "
                f"it needs {'an AsyncCoalescingCache' if is_async else 'a CoalescingCache'}, "
                f"not a {type(cache).__name__}"
            )
        if maxsize is not None:
            options["maxsize"] = maxsize  # refused below: it sizes the shared cache itself
        if options:
            # This function's own policy on the shared store (DESIGN.md item 39).
            return cache._with_policy(options, where="cached"), True
        return cache, True
    options.setdefault("name", _fn_id(fn))
    own = cache is None
    made = kind(cache, maxsize=maxsize or DEFAULT_MAXSIZE, **options)
    return made, not own


# The functions decorated on each shared cache, by name: two live functions of
# one name (two lambdas, two closures of one factory) would read each other's
# results, so the second is refused.
_names: weakref.WeakKeyDictionary[CacheBase[Any], dict[str, Any]] = weakref.WeakKeyDictionary()


def _claim(cache: CacheBase[Any], fn_id: str, fn: Callable[..., Any]) -> None:
    names = _names.setdefault(cache, {})
    holder = names.get(fn_id)
    current = holder() if isinstance(holder, weakref.ref) else holder
    if current is not None and current is not fn:
        raise TypeError(
            f"another function named {fn_id} already uses this shared cache: their keys "
            f"would mix. Give one of them key= (with something that tells it apart), "
            f"or its own cache"
        )
    try:
        names[fn_id] = weakref.ref(fn)
    except TypeError:  # not weakly referable: keep it
        names[fn_id] = fn


def _fn_id(fn: Callable[..., Any]) -> str:
    qualname = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    module = getattr(fn, "__module__", None) or type(fn).__module__
    return f"{module}.{qualname}"


class _Keys:
    """Turns a call into the user-level key and the store key of the cache."""

    def __init__(
        self,
        fn: Callable[..., Any],
        cache: CacheBase[Any],
        shared: bool,
        key: Callable[..., Hashable] | None,
        typed: bool,
    ) -> None:
        self.call_key = CallKey(fn, typed=typed)
        self.custom = key
        self.fn_id = _fn_id(fn) if shared else None
        if self.fn_id is not None and key is None:
            _claim(cache._root, self.fn_id, fn)
        self.namespace = cache.namespace
        self.make_key = cache._make_key
        # A store shared between processes takes text keys: this function's are
        # built from their constant part (the same text as make_key would give).
        self.text_key: FunctionKeys | None = None
        if self.fn_id is not None and not isinstance(cache.backend, MemoryBackend):
            self.text_key = FunctionKeys(cache.namespace, self.fn_id)
        # The texts kept for one-argument calls, looked up by the wrapper itself: only
        # where a call's key is its args tuple as it is.
        self.texts: dict[Hashable, str] | None = None
        if self.text_key is not None and key is None and not typed:
            self.texts = self.text_key.made
        # Only the plainest setup may use the args tuple as the store key as is.
        plain = key is None and not shared and not typed and self.make_key is None
        self.arity = self.call_key.arity if plain else -1

    def _call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Hashable:
        """The call's own key: the custom key function's, or the bound arguments."""
        return self.custom(*args, **kwargs) if self.custom else self.call_key(args, kwargs)

    def user(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Hashable:
        k = self._call(args, kwargs)
        return k if self.fn_id is None else (FN_MARK, self.fn_id, k)

    def store(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Hashable:
        if self.text_key is not None:
            return self.text_key(self._call(args, kwargs))
        k = self.user(args, kwargs)
        return k if self.make_key is None else self.make_key(k)

    def unhashable(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> TypeError:
        if self.custom is None:
            found = self.call_key.unhashable(self.call_key(args, kwargs))
            if found is not None:
                return found
        return TypeError(f"the key of this call of {self.call_key.fn_name}() is unhashable")

    def owns(self, store_key: Any) -> bool:
        """Is ``store_key`` one of this function's keys (in a shared cache)?"""
        k = store_key
        if self.namespace:
            if not (
                type(k) is tuple and len(k) == 3 and k[0] is NS_MARK and k[1] == self.namespace
            ):
                return False
            k = k[2]
        return type(k) is tuple and len(k) == 3 and k[0] is FN_MARK and k[1] == self.fn_id


def _info(cache: CacheBase[Any], keys: _Keys, shared: bool) -> CacheInfo:
    stats = cache.stats()
    backend = cache.backend
    if not isinstance(backend, MemoryBackend):
        currsize = -1  # a shared store is not counted (it would mean scanning it)
        maxsize = None
    elif shared:
        currsize = sum(1 for k in list(backend.mapping.keys()) if keys.owns(k))
        maxsize = None
    else:
        currsize = len(backend)
        maxsize = getattr(backend.mapping, "maxsize", None)
    return CacheInfo(stats.hits, stats.misses, maxsize, currsize, stats)


def _drop_own_keys(cache: CacheBase[Any], keys: _Keys) -> str | None:
    """Fence this function's loads in a shared cache and drop its in-memory entries.

    For a shared store, returns the key prefix the caller clears (sync or awaited).
    """
    backend = cache.backend
    if not isinstance(backend, MemoryBackend):
        assert keys.fn_id is not None
        prefix = function_prefix(cache.namespace, keys.fn_id)
        cache._flight._forget_all(lambda k: key_rest(str(k)).startswith(prefix))
        return prefix
    cache._drop_local(keys.owns)  # fencing this function's loads in flight too
    return None


def clear_own(cache: CoalescingCache[Any], keys: _Keys, shared: bool) -> None:
    """``cache_clear()`` of a function: its whole cache, or its own keys in a shared one."""
    if not shared:
        cache.clear()
    elif (prefix := _drop_own_keys(cache, keys)) is not None:
        backend = cache.backend
        assert isinstance(backend, SharedStore)
        backend.clear(prefix)


async def aclear_own(cache: AsyncCoalescingCache[Any], keys: _Keys, shared: bool) -> None:
    """``clear_own`` for an async function."""
    if not shared:
        await cache.clear()
    elif (prefix := _drop_own_keys(cache, keys)) is not None:
        backend = cache.backend
        assert isinstance(backend, SharedStore)
        await backend.aclear(prefix)


def _hit_path(
    fn: Callable[..., Any],
    cache: CacheBase[Any],
    keys: _Keys,
    *,
    asynchronous: bool,
    namespace: dict[str, Any] | None,
) -> Callable[..., Any]:
    """The wrapper of ``fn``: its key, the hit path, else the cache's slow path."""
    return make_wrapper(
        fn,
        asynchronous=asynchronous,
        get=cache._hit_get,
        clock=cache._clock,
        counters=cache._counters,
        arity=keys.arity,
        store_key=keys.store,
        unhashable=keys.unhashable,
        slow=cache._slow,  # type: ignore[attr-defined]
        near=cache._near is not None,
        texts=keys.texts,
        namespace=namespace,
    )


def _wrap_sync(
    fn: Callable[..., Any],
    cache: CoalescingCache[Any],
    shared: bool,
    key: Callable[..., Hashable] | None,
    typed: bool,
    namespace: dict[str, Any] | None = None,
) -> Any:
    keys: _Keys = _Keys(fn, cache, shared, key, typed)
    wrapper = _hit_path(fn, cache, keys, asynchronous=False, namespace=namespace)
    partial = functools.partial

    def invalidate(*args: Any, **kwargs: Any) -> None:
        cache.invalidate(keys.user(args, kwargs))

    def refresh(*args: Any, **kwargs: Any) -> Any:
        return cache.refresh(keys.user(args, kwargs), partial(fn, *args, **kwargs))

    cache_clear = functools.partial(clear_own, cache, keys, shared)
    return _finish(wrapper, fn, cache, keys, shared, invalidate, refresh, cache_clear)


def _wrap_async(
    fn: Callable[..., Any],
    cache: AsyncCoalescingCache[Any],
    shared: bool,
    key: Callable[..., Hashable] | None,
    typed: bool,
    namespace: dict[str, Any] | None = None,
) -> Any:
    keys: _Keys = _Keys(fn, cache, shared, key, typed)
    wrapper = _hit_path(fn, cache, keys, asynchronous=True, namespace=namespace)
    partial = functools.partial

    async def invalidate(*args: Any, **kwargs: Any) -> None:
        await cache.invalidate(keys.user(args, kwargs))

    async def refresh(*args: Any, **kwargs: Any) -> Any:
        return await cache.refresh(keys.user(args, kwargs), partial(fn, *args, **kwargs))

    cache_clear = functools.partial(aclear_own, cache, keys, shared)
    return _finish(wrapper, fn, cache, keys, shared, invalidate, refresh, cache_clear)


def _finish(
    wrapper: Any,
    fn: Callable[..., Any],
    cache: CacheBase[Any],
    keys: _Keys,
    shared: bool,
    invalidate: Callable[..., Any],
    refresh: Callable[..., Any],
    cache_clear: Callable[[], Any],
) -> Any:
    functools.update_wrapper(wrapper, fn)
    wrapper.cache = cache
    wrapper.cache_key = lambda *args, **kwargs: keys.user(args, kwargs)
    wrapper.invalidate = invalidate
    wrapper.refresh = refresh
    wrapper.cache_clear = cache_clear
    wrapper.cache_info = functools.partial(_info, cache, keys, shared)
    return wrapper

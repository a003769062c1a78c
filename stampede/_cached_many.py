"""``@cached_many``: a function of a collection of ids, cached per id.

``get_users(ids)`` returns a mapping of each id to its value, and each id is
cached on its own: a call reads every id in one store round trip and calls
the function once, with only the ids that were missing (the rest of the call's
arguments passed as given). Each id is single-flight as ``@cached`` keys are:
an id another call is loading is waited for, not loaded again. Ids the
function leaves out of its mapping raise ``KeyError`` (nothing is stored for
them).

The key of an id is the key ``@cached`` would give the call with that id in
place of the collection (``get_users(7, tenant="a")``), so the other
arguments tell calls apart.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Awaitable, Callable, Coroutine, Hashable, Iterable, Mapping
from typing import Any, ParamSpec, Protocol, TypeVar, overload

from ._acache import AsyncCoalescingCache
from ._base import CacheBase
from ._binding import Deferred
from ._cache import CoalescingCache
from ._decorator import CacheInfo, _cache_for, _info, _Keys, aclear_own, clear_own
from ._options import CacheOptions

if sys.version_info >= (3, 11):
    from typing import Unpack
else:
    from typing_extensions import Unpack

_TEXTS_KEPT = 8192  # the store keys of ids kept per function (see _keys.FunctionKeys)

P = ParamSpec("P")
K = TypeVar("K")
V = TypeVar("V")


class CachedManyFunction(Protocol[P, K, V]):
    """What ``@cached_many`` returns for a plain function (the signature is kept)."""

    __wrapped__: Callable[P, Mapping[K, V]]
    cache: CoalescingCache[V]

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> dict[K, V]: ...

    def invalidate(self, *args: Any, **kwargs: Any) -> None:
        """Drop the cached values of the ids in the call given (same arguments)."""
        ...

    def cache_info(self) -> CacheInfo: ...

    def cache_clear(self) -> None: ...


class AsyncCachedManyFunction(Protocol[P, K, V]):
    """What ``@cached_many`` returns for an ``async def`` function."""

    __wrapped__: Callable[P, Awaitable[Mapping[K, V]]]
    cache: AsyncCoalescingCache[V]

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, dict[K, V]]: ...

    async def invalidate(self, *args: Any, **kwargs: Any) -> None: ...

    def cache_info(self) -> CacheInfo: ...

    async def cache_clear(self) -> None: ...


class _ManyDecorator(Protocol):
    @overload
    def __call__(
        self, fn: Callable[P, Coroutine[Any, Any, Mapping[K, V]]], /
    ) -> AsyncCachedManyFunction[P, K, V]: ...

    @overload
    def __call__(self, fn: Callable[P, Mapping[K, V]], /) -> CachedManyFunction[P, K, V]: ...


@overload
def cached_many(
    fn: Callable[P, Coroutine[Any, Any, Mapping[K, V]]], /
) -> AsyncCachedManyFunction[P, K, V]: ...


@overload
def cached_many(fn: Callable[P, Mapping[K, V]], /) -> CachedManyFunction[P, K, V]: ...


@overload
def cached_many(
    *, cache: Any = None, typed: bool = False, **options: Unpack[CacheOptions]
) -> _ManyDecorator: ...


def cached_many(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    cache: Any = None,
    typed: bool = False,
    **options: Any,
) -> Any:
    """Cache a function of a collection of ids per id: ``fn(ids, ...) -> {id: value}``.

    The first argument of each call is the collection (any iterable of
    hashable ids); the function is called with a list of the missing ids only.
    ``cache`` and the options are those of ``@cached`` (a ready cache shared
    with other functions takes per-function policy options too).

    Raises ``TypeError`` at decoration as ``@cached`` does; at call time,
    ``KeyError`` for an id the function left out of its mapping.
    """
    options = {name: value for name, value in options.items() if value is not None}
    maxsize = options.pop("maxsize", None)

    def decorate(fn: Any) -> Any:
        if not callable(fn):
            raise TypeError(f"@cached_many needs a function, got {type(fn).__name__}")
        if isinstance(cache, Deferred):
            raise TypeError(
                "@cached_many takes a store it can use now (stampede.deferred is for @cached)"
            )
        is_async = inspect.iscoroutinefunction(fn)
        store, shared = _cache_for(fn, is_async, cache, maxsize, dict(options))
        keys = _Keys(fn, store, shared, None, typed)
        if keys.text_key is not None:
            keys.text_key.kept = _TEXTS_KEPT  # a batch asks for many ids at once
        if isinstance(store, AsyncCoalescingCache):
            return _wrap_async(fn, store, keys, shared)
        assert isinstance(store, CoalescingCache)
        return _wrap_sync(fn, store, keys, shared)

    if fn is not None:
        return decorate(fn)
    return decorate


def _ids(
    keys: _Keys, ids: Iterable[Hashable], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[Hashable, Hashable]:
    """Each id, with its store key, for a call with ``ids`` first and ``args``/``kwargs``
    after (the key ``@cached`` gives the call with the id in place of the collection)."""
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise TypeError(
            f"{keys.call_key.fn_name}() takes a collection of ids first, got {type(ids).__name__}"
        )
    store = keys.store
    made: dict[Hashable, Hashable] = {}
    for one in ids:
        if one not in made:  # equal ids (1 and True) are one id, with the first one's key
            made[one] = store((one, *args), kwargs)
    return made


def _checked(loaded: object) -> Mapping[Hashable, Any]:
    if not isinstance(loaded, Mapping):
        kind = type(loaded).__name__
        raise TypeError(f"a @cached_many function must return a mapping, got a {kind}")
    return loaded


def _wrap_sync(
    fn: Callable[..., Any], cache: CoalescingCache[Any], keys: _Keys, shared: bool
) -> Any:
    @functools.wraps(fn)
    def wrapper(ids: Iterable[Hashable], /, *args: Any, **kwargs: Any) -> dict[Hashable, Any]:
        def load(missing: list[Hashable]) -> Mapping[Hashable, Any]:
            return _checked(fn(missing, *args, **kwargs))

        return cache._get_or_load_many(_ids(keys, ids, args, kwargs), load, None)

    def invalidate(ids: Iterable[Hashable], /, *args: Any, **kwargs: Any) -> None:
        for one in _ids(keys, ids, args, kwargs):
            cache.invalidate(keys.user((one, *args), kwargs))

    cache_clear = functools.partial(clear_own, cache, keys, shared)
    return _finish(wrapper, cache, keys, shared, invalidate, cache_clear)


def _wrap_async(
    fn: Callable[..., Any], cache: AsyncCoalescingCache[Any], keys: _Keys, shared: bool
) -> Any:
    @functools.wraps(fn)
    async def wrapper(
        ids: Iterable[Hashable], /, *args: Any, **kwargs: Any
    ) -> dict[Hashable, Any]:
        async def load(missing: list[Hashable]) -> Mapping[Hashable, Any]:
            return _checked(await fn(missing, *args, **kwargs))

        return await cache._get_or_load_many(_ids(keys, ids, args, kwargs), load, None)

    async def invalidate(ids: Iterable[Hashable], /, *args: Any, **kwargs: Any) -> None:
        for one in _ids(keys, ids, args, kwargs):
            await cache.invalidate(keys.user((one, *args), kwargs))

    cache_clear = functools.partial(aclear_own, cache, keys, shared)
    return _finish(wrapper, cache, keys, shared, invalidate, cache_clear)


def _finish(
    wrapper: Any,
    cache: CacheBase[Any],
    keys: _Keys,
    shared: bool,
    invalidate: Callable[..., Any],
    cache_clear: Callable[[], Any],
) -> Any:
    wrapper.cache = cache
    wrapper.invalidate = invalidate
    wrapper.cache_clear = cache_clear
    wrapper.cache_info = functools.partial(_info, cache, keys, shared)
    return wrapper

"""Caches declared at import time and bound to their store at application startup.

A module-level ``@cached(cache=stampede.deferred("products"))`` names its store
before the store exists (a Redis client made in a FastAPI lifespan, a Django
``AppConfig.ready``, a Flask app factory); ``stampede.bind("products", client)``
at startup gives it. Binding builds each declared function's wrapper as if the
store had been passed to ``@cached`` directly, and the function takes that
wrapper's code: once bound, a call runs the same hit path as any ``@cached``
function, with nothing in between. Before binding, a call raises
``StampedeError`` saying what to bind.

Binding again (a second application started in one process, as tests do)
rebuilds every function on the new store; bind again only while no call is
running (a call running meanwhile may finish on the new store).
"""

from __future__ import annotations

import threading
import types
import weakref
from collections.abc import Callable
from typing import Any

from ._errors import StampedeError

# Builds a declared function's wrapper on a store, into the given globals.
Build = Callable[[Any, dict[str, Any]], Callable[..., Any]]

_HELPERS = ("cache", "cache_key", "invalidate", "refresh", "cache_clear", "cache_info")

# A declared function before binding: its globals hold ``bound``, which raises
# until the store is given (and, in a race with bind, returns the new wrapper).
_STUB = {
    False: "def wrapper(*args, **kwargs):\n    return bound()(*args, **kwargs)\n",
    True: "async def wrapper(*args, **kwargs):\n    return await bound()(*args, **kwargs)\n",
}

_lock = threading.RLock()  # guards the registry and every binding
_registry: dict[str, Deferred] = {}


class Deferred:
    """A store named at import time, given at startup (``stampede.bind``)."""

    __slots__ = ("__weakref__", "_declared", "_target", "name")

    def __init__(self, name: str) -> None:
        self.name: str = name
        self._target: Any = None  # None: not bound yet
        self._declared: weakref.WeakSet[_Declared] = weakref.WeakSet()

    def __repr__(self) -> str:
        state = "unbound" if self._target is None else f"bound to {self._target!r}"
        return f"stampede.deferred({self.name!r}) ({state})"

    def __getattr__(self, attr: str) -> Any:
        # ``fn.cache.<anything>`` before binding: say what is missing (an AttributeError
        # too, so getattr() with a default and hasattr() keep working).
        if attr.startswith("_") or self._target is not None:
            raise AttributeError(attr)
        raise _unbound(self.name, f"the cache's {attr}")

    @property
    def bound(self) -> bool:
        """Whether ``stampede.bind`` has given this name its store."""
        return self._target is not None

    def _declare(self, fn: Callable[..., Any], asynchronous: bool, build: Build) -> Any:
        """The function ``@cached`` returns for ``fn`` declared on this name."""
        declared = _Declared(self, fn, asynchronous, build)
        with _lock:
            self._declared.add(declared)
            if self._target is not None:
                declared.bind(self._target)
        return declared.function


class _Declared:
    """One function declared on a ``Deferred``: its stub, and how to build it once bound."""

    def __init__(
        self, store: Deferred, fn: Callable[..., Any], asynchronous: bool, build: Build
    ) -> None:
        self.name = name = store.name
        self.build = build
        self.wrapper: Callable[..., Any] | None = None  # the wrapper built on the store
        self.globals: dict[str, Any] = {"bound": self.bound}
        code = compile(_STUB[asynchronous], f"<stampede: {name} not bound yet>", "exec")
        exec(code, self.globals)  # a fixed text: the stub's code, with its own globals
        self.stub: types.CodeType = self.globals["wrapper"].__code__
        function = types.FunctionType(self.stub, self.globals, fn.__name__)
        function.__qualname__ = getattr(fn, "__qualname__", fn.__name__)
        function.__doc__ = fn.__doc__
        function.__module__ = fn.__module__
        function.__wrapped__ = fn  # type: ignore[attr-defined]
        function.__dict__.update(getattr(fn, "__dict__", {}))
        self.function = function
        self.unbind(store)

    def bound(self) -> Callable[..., Any]:
        """The wrapper built on the store; ``StampedeError`` before binding."""
        wrapper = self.wrapper
        if wrapper is None:
            raise _unbound(self.name, f"{self.function.__qualname__}()")
        return wrapper

    def bind(self, target: Any) -> None:
        """Build the wrapper on ``target`` and give the function its code and helpers."""
        wrapper = self.build(target, self.globals)
        for helper in _HELPERS:
            setattr(self.function, helper, getattr(wrapper, helper))
        self.wrapper = wrapper  # first: a call still in the stub finds it
        self.function.__code__ = wrapper.__code__  # same globals: the hit path itself

    def unbind(self, store: Deferred) -> None:
        """Back to the stub: calls and helpers raise until the next binding."""
        self.wrapper = None
        self.function.__code__ = self.stub
        qualname = self.function.__qualname__
        for helper in _HELPERS:
            setattr(self.function, helper, _Unbound(self.name, f"{qualname}.{helper}()"))
        self.function.cache = store  # type: ignore[attr-defined]


class _Unbound:
    """A helper of a declared function called before binding."""

    def __init__(self, name: str, what: str) -> None:
        self.name = name
        self.what = what

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise _unbound(self.name, self.what)


class NotBound(StampedeError, AttributeError):
    """A call (or a look at the cache) of a function whose store is not bound yet."""


def _unbound(name: str, what: str) -> StampedeError:
    return NotBound(
        f"{what} needs the store named {name!r}, which is not bound yet: call "
        f"stampede.bind({name!r}, <a Redis client, a URL, a cache...>) at application "
        f"startup (a FastAPI lifespan, Django AppConfig.ready, a Flask app factory)"
    )


def deferred(name: str) -> Deferred:
    """A store named ``name``, for ``@cached(cache=...)`` at import time; bind it at
    startup with ``stampede.bind(name, store)``. One object per name."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"a deferred store needs a non-empty str name, got {name!r}")
    with _lock:
        found = _registry.get(name)
        if found is None:
            found = _registry[name] = Deferred(name)
        return found


def bind(name: str, store: Any) -> None:
    """Give the store named ``name`` (``stampede.deferred(name)``) its backend.

    ``store`` is what ``@cached(cache=...)`` takes: a client (``redis.Redis``,
    ``redis.asyncio.Redis``, ``diskcache.Cache``, a mapping), a URL, or a ready
    ``CoalescingCache``/``AsyncCoalescingCache``. Every function declared on the
    name is built on it now (so a mismatch, such as a sync cache for an
    ``async def`` function, raises here, at startup); functions declared later
    are built when declared. Binding again rebuilds them on the new store.

    Raises ``TypeError`` for ``None`` or another deferred store, or what
    ``@cached`` raises for the store.
    """
    if store is None or isinstance(store, Deferred):
        raise TypeError(f"bind({name!r}, ...) needs a store, got {store!r}")
    target = deferred(name)
    with _lock:
        previous = target._target
        target._target = store
        try:
            for declared in list(target._declared):
                declared.bind(store)
        except BaseException:
            # All or nothing: the functions stay on the previous store (or unbound).
            target._target = previous
            for declared in list(target._declared):
                if previous is None:
                    declared.unbind(target)
                else:
                    declared.bind(previous)
            raise

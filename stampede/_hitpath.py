"""The hit path, written once and built for each entry point.

A hit is one store read, one clock read, one comparison and one counter:
nothing else may run. Every entry point needs it (``get_or_load`` of both
caches, the sync and the async ``@cached`` wrapper), and a call from the
entry point into one shared function costs more than the rest of a hit put
together on a slow clock (measured: +72 ns, 0.20x -> 0.26x of cachetools'
``cached``). So the path is one template (``_READ``), compiled once per cache
(``peek``) and once per decorated function (its wrapper), the way
``dataclasses`` and ``attrs`` build their methods. Nothing of the user's goes
into the source: only fixed fragments are chosen, and names are bound
through the namespace.

Anything that is not a plain hit (stale, negative, missing, foreign, a
failing read) falls through to the slow path, which reads again and lets the
policy decide: one place for every decision. A store shared between
processes has no hit path here: its read is a round trip, made once, by the
slow path.
"""

from __future__ import annotations

import functools
import linecache
import zlib
from collections.abc import Callable, Hashable
from typing import Any

from ._entry import MISSING
from ._keys import PLAIN
from ._stats import Counters

# One store read, one clock read, one comparison, one counter. A failing read
# falls through (the slow path reads again and applies the store's failure
# rules); a TypeError is an unhashable key, the caller's mistake.
_READ = """\
    try:
        entry = get(k)
    except TypeError:
        {unhashable}
    except Exception:
        entry = None
    if entry is not None:
        try:
            if clock() < entry.check_at:
                counters.{counter} += 1
                return entry.value
        except (AttributeError, TypeError):  # not an Entry: the slow path counts it
            pass
"""

_PEEK = "def peek(k):\n{read}    return MISSING\n"

_WRAPPER = """\
{define} wrapper(*args, **kwargs):
{key}{read}    return {wait}slow(k, partial(fn, *args, **kwargs))
"""
_KEY = "    k = args if not kwargs and len(args) == arity else store_key(args, kwargs)\n"
# A shared store's text key, kept for one str or int argument (``FunctionKeys.made``):
# looked up here, with the types checked first (1, 1.0 and True are equal keys).
_TEXT_KEY = """\
    if not kwargs and len(args) == 1 and type(args[0]) in plain:
        k = texts.get(args)
        if k is None:
            k = store_key(args, kwargs)
    else:
        k = store_key(args, kwargs)
"""

@functools.cache  # a handful of variants (kind, flavour, store): one code object each
def _code(source: str, name: str) -> Any:
    # Named after its source, so two variants never share a name (and a race
    # between two threads compiling one variant registers the same text twice).
    filename = f"<stampede hit path: {name} {zlib.crc32(source.encode()):08x}>"
    # Registered like a file, so that tracebacks and debuggers show the source.
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    return compile(source, filename, "exec")


def _counter(near: bool) -> str:
    return "near_hits" if near else "hits"  # a fixed fragment, chosen


def _build(source: str, name: str, namespace: dict[str, Any]) -> Any:
    """Define the function of ``source`` with ``namespace`` as its globals."""
    exec(_code(source, name), namespace)  # fixed fragments only; see the module docstring
    return namespace[name]


def make_peek(
    get: Callable[[Hashable], Any] | None,
    clock: Callable[[], float],
    counters: Counters,
    *,
    near: bool = False,
) -> Callable[[Hashable], Any]:
    """A cache's hit path: ``peek(k)`` is the value of a fresh entry under the store
    key ``k`` (counted as a hit), else ``MISSING``. ``get``: the store's read, the
    near cache's (``near``: counted as near hits), or None for a store shared
    between processes without one (no hit path: always ``MISSING``)."""
    read = "" if get is None else _READ.format(unhashable="raise", counter=_counter(near))
    namespace = {"get": get, "clock": clock, "counters": counters, "MISSING": MISSING}
    peek: Callable[[Hashable], Any] = _build(_PEEK.format(read=read), "peek", namespace)
    return peek


def make_wrapper(
    fn: Callable[..., Any],
    *,
    asynchronous: bool,
    get: Callable[[Hashable], Any] | None,
    clock: Callable[[], float],
    counters: Counters,
    arity: int,
    store_key: Callable[[tuple[Any, ...], dict[str, Any]], Hashable],
    unhashable: Callable[[tuple[Any, ...], dict[str, Any]], TypeError],
    slow: Callable[..., Any],
    near: bool = False,
    texts: dict[Hashable, str] | None = None,
    namespace: dict[str, Any] | None = None,
) -> Callable[..., Any]:
    """``@cached``'s wrapper of ``fn``: its key (the ``args`` tuple itself when the
    call has ``arity`` positional arguments and nothing else), the hit path, else
    ``slow(k, loader)`` (awaited when ``asynchronous``). ``namespace``: the globals
    to define it in (a function bound at startup swaps its code for this one's)."""
    unhashable_raise = "raise unhashable(args, kwargs) from None"
    read = "" if get is None else _READ.format(unhashable=unhashable_raise, counter=_counter(near))
    source = _WRAPPER.format(
        define="async def" if asynchronous else "def",
        key=_KEY if texts is None else _TEXT_KEY,
        read=read,
        wait="await " if asynchronous else "",
    )
    if namespace is None:
        namespace = {}
    namespace |= {
        "get": get,
        "clock": clock,
        "counters": counters,
        "arity": arity,
        "store_key": store_key,
        "unhashable": unhashable,
        "slow": slow,
        "texts": texts,
        "plain": PLAIN,
        "partial": functools.partial,
        "fn": fn,
    }
    wrapper: Callable[..., Any] = _build(source, "wrapper", namespace)
    return wrapper

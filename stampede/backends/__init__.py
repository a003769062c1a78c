"""Backends: where a cache keeps its entries.

``resolve`` turns what a user passes as ``backend`` (a mapping, a backend
object, a URL) into a backend object. Only the in-process memory backend
exists so far; disk and Redis come with their own modules.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlsplit

from .memory import DEFAULT_MAXSIZE, MemoryBackend, is_mapping

__all__ = ["MemoryBackend", "resolve"]

_SCHEMES = ("memory://",)


def _from_url(url: str, maxsize: int | None) -> MemoryBackend:
    parts = urlsplit(url)
    if parts.scheme != "memory":
        raise ValueError(
            f"unsupported backend URL {url!r}: supported schemes are {', '.join(_SCHEMES)}"
        )
    query = parse_qs(parts.query)
    if "maxsize" in query:
        try:
            maxsize = int(query["maxsize"][-1])
        except ValueError:
            raise ValueError(f"maxsize in {url!r} must be an integer") from None
    return MemoryBackend(maxsize=maxsize or DEFAULT_MAXSIZE)


def resolve(backend: Any, *, maxsize: int | None = None) -> MemoryBackend:
    """The backend object for ``backend`` (None, a URL, a mapping or a backend)."""
    if backend is None:
        return MemoryBackend(maxsize=maxsize or DEFAULT_MAXSIZE)
    if isinstance(backend, MemoryBackend):
        return backend
    if isinstance(backend, str):
        return _from_url(backend, maxsize)
    if is_mapping(backend):
        return MemoryBackend(backend)
    raise TypeError(
        f"cannot use {type(backend).__name__} as a cache backend: pass a mapping "
        f"(dict, a cachetools or cachebox cache), a MemoryBackend, or a URL "
        f"({', '.join(_SCHEMES)})"
    )

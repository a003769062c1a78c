"""A shared store over a web framework's own cache API (Django, Flask-Caching).

Framework caches without Redis underneath (Django's local-memory, file,
database and Memcached caches; Flask-Caching's SimpleCache, FileSystemCache,
...) offer get, get_many, set, add and delete with a timeout in seconds, and
nothing more: no remaining lifetime, no deletion by prefix, no atomic
compare-and-set. ``FrameworkStore`` keeps stampede's rules on that API; a
subclass supplies the five calls (``_fetch``, ``_put``, ``_add``, ``_remove``
and ``describe``).

Lifetime. A read must learn how long the store will still keep an entry
(``_envelope``), and the API cannot say. So each value carries the wall-clock
instant it stops being served (``time.time()`` at the write plus its
lifetime), and the framework is told the same lifetime rounded up to whole
seconds: a reader computes what is left from its own wall clock. No
monotonic reading of the writer is ever trusted by another process. The
processes of one host share its clock, so they agree exactly; a reader on
another host is off by the two hosts' clock skew (the entry looks that much
younger or older), which the docs state.

Clear. The API clears everything or one key. So each namespace, and each
function's keys within it, has a generation: 16 random bytes under a key of
its own, kept without expiry. A value records the generations current when
it was written, a read fetches the value and the current generations in one
``get_many``, and a value whose generations are not current is a miss.
``clear()`` writes new generations: every process's next read misses, and
no key of anyone else is touched (the old values expire on their own). A
generation the framework evicted is replaced by a new one, so values written
under it become misses, never come back.

Leases. ``distributed=True`` needs a compare-and-set that the API lacks:
``supports_leases`` is false, and the cache refuses it.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import struct
import time
from collections.abc import Sequence
from typing import Any, TypeGuard

from .._keys import key_namespace, key_rest, namespace_prefix
from ._shared import SharedStore

# A value: magic, version, the wall-clock end of its lifetime, the generation of
# its namespace and of its function (zeros for a key outside any function's),
# then the envelope's bytes.
_MAGIC = b"\xa5stf"
_VERSION = 1
_HEAD = struct.Struct("<4sBd16s16s")
_NO_FUNCTION = bytes(16)
_GENERATION_SIZE = 16

# Keys the framework takes as they are: printable ASCII without spaces, short
# enough for Memcached (250 bytes) after Django's KEY_PREFIX and version.
_PLAIN_KEY = re.compile(r"[!-~]{1,160}")
_FUNCTION_MARK_SIZE = 17  # "@" and the 16 hex digits of a function's digest (_keys)


def framework_key(text_key: str) -> str:
    """Where ``text_key`` lives in the framework's cache: as it is when plain,
    else ``stampede:h:`` and its SHA-256 (memcached refuses spaces, control
    characters and long keys)."""
    if _PLAIN_KEY.fullmatch(text_key):
        return text_key
    digest = hashlib.sha256(text_key.encode("utf-8", "surrogatepass")).hexdigest()
    return f"stampede:h:{digest}"


def generation_key(prefix: str) -> str:
    """Where the generation of the keys whose rest starts with ``prefix`` lives."""
    return framework_key(f"stampede:gen:{prefix}")


def scopes(text_key: str) -> tuple[str, str | None]:
    """The key rests' prefixes ``clear`` can drop ``text_key`` by: its namespace's,
    and its function's (None for a key a cache's ``get``/``set`` made)."""
    namespace = key_namespace(text_key)
    space = namespace_prefix(namespace if namespace is not None else "")
    after = key_rest(text_key)[len(space) :]
    if after.startswith("@") and len(after) >= _FUNCTION_MARK_SIZE:
        return space, space + after[:_FUNCTION_MARK_SIZE]
    return space, None


class FrameworkStore(SharedStore):
    """Entries in a framework's cache, through its public get/set API alone."""

    name = "framework cache"
    # Whatever the framework's cache raises on an operation is the store failing:
    # its backends raise their own libraries' errors (database, memcached, files).
    errors: tuple[type[BaseException], ...] = (Exception,)
    serves_async = False  # the framework's calls block: AsyncCoalescingCache refuses it
    no_leases_reason: str = (
        "its cache API has no atomic compare-and-set: put the framework's cache on "
        "Redis, or pass a redis.Redis client"
    )

    def describe(self) -> str:
        """What the framework cache is, for messages (``repr``)."""
        raise NotImplementedError

    # -- the framework's calls ------------------------------------------------------

    def _fetch(self, keys: Sequence[str]) -> dict[str, Any]:
        """The values found under ``keys`` (one ``get_many``)."""
        raise NotImplementedError

    def _put(self, key: str, value: bytes, timeout: int | None) -> None:
        """Store ``value`` for ``timeout`` whole seconds (None: without expiry)."""
        raise NotImplementedError

    def _add(self, key: str, value: bytes) -> None:
        """Store ``value`` without expiry unless ``key`` holds something already."""
        raise NotImplementedError

    def _remove(self, key: str) -> None:
        raise NotImplementedError

    # -- SharedStore's raw operations -----------------------------------------------

    def _get_raw(self, key: str) -> tuple[bytes | int | None, float | None]:
        return self._get_many_raw([key])[0]

    def _get_many_raw(self, keys: Sequence[str]) -> list[tuple[bytes | int | None, float | None]]:
        # One get_many for the values and every generation they are checked against.
        wanted = dict.fromkeys(framework_key(key) for key in keys)
        for key in keys:
            wanted.update(dict.fromkeys(generation_key(p) for p in scopes(key) if p is not None))
        found = self._fetch(list(wanted))
        return [self._read(key, found) for key in keys]

    def _read(self, key: str, found: dict[str, Any]) -> tuple[bytes | int | None, float | None]:
        """What ``found`` (a ``_fetch``) holds for ``key``: its bytes and seconds left."""
        stored = found.get(framework_key(key))
        if stored is None:
            return None, None
        if type(stored) is not bytes or len(stored) < _HEAD.size:
            return b"", None  # not written by stampede: a counted miss
        magic, version, ends, of_space, of_function = _HEAD.unpack_from(stored)
        if magic != _MAGIC or version != _VERSION or not math.isfinite(ends):
            return b"", None
        space, function = scopes(key)
        if of_space != found.get(generation_key(space)):
            return None, None  # written before a clear of its namespace
        if function is not None and of_function != found.get(generation_key(function)):
            return None, None  # written before its function's cache_clear()
        size = len(stored) - _HEAD.size
        remaining = ends - time.time()
        if size > self.max_value_size:
            return size, remaining  # fetched by the framework already, but never decoded
        return stored[_HEAD.size :], remaining

    def _set_raw(self, key: str, data: bytes, ttl: float) -> None:
        space, function = scopes(key)
        generations = self._generations([space] if function is None else [space, function])
        if generations is None:
            return  # the framework keeps nothing (a dummy cache): neither does stampede
        of_function = generations[1] if function is not None else _NO_FUNCTION
        head = _HEAD.pack(_MAGIC, _VERSION, time.time() + ttl, generations[0], of_function)
        # Whole seconds, rounded up, and one more: frameworks count from a truncated
        # clock (cachelib: int(time()) + timeout), and memcached in whole seconds.
        # Kept a little longer than it is served (the head says when to stop), never shorter.
        self._put(framework_key(key), head + data, math.ceil(ttl) + 1)

    def _generations(self, prefixes: list[str]) -> list[bytes] | None:
        """The current generations of ``prefixes``, made where missing; None if the
        framework does not keep them."""
        keys = [generation_key(prefix) for prefix in prefixes]
        found = self._fetch(keys)
        missing = [key for key in keys if not _is_generation(found.get(key))]
        if missing:
            for key in missing:
                self._add(key, os.urandom(_GENERATION_SIZE))  # the first writer's wins
            found.update(self._fetch(missing))
        current: list[bytes] = []
        for key in keys:
            value = found.get(key)
            if not _is_generation(value):
                return None
            current.append(value)
        return current

    def _delete_raw(self, key: str) -> None:
        self._remove(framework_key(key))

    def _clear_raw(self, prefix: str) -> None:
        self._put(generation_key(prefix), os.urandom(_GENERATION_SIZE), None)

    def clear(self, prefix: str | None = None) -> None:
        """Make every entry of the bound namespace (or of one function, ``prefix``)
        a miss in every process: a new generation (see the module docstring)."""
        self._check_prefix(prefix)
        super().clear(prefix)

    async def aclear(self, prefix: str | None = None) -> None:
        self._check_prefix(prefix)
        await super().aclear(prefix)

    def _check_prefix(self, prefix: str | None) -> None:
        space = namespace_prefix(self.namespace)
        if prefix is None or prefix == space:
            return
        if prefix.startswith(space + "@") and len(prefix) == len(space) + _FUNCTION_MARK_SIZE:
            return
        raise ValueError(
            f"{self!r} clears a whole namespace or one function's keys, not the keys "
            f"starting with {prefix!r}: its framework cannot list keys"
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"


def _is_generation(value: object) -> TypeGuard[bytes]:
    return type(value) is bytes and len(value) == _GENERATION_SIZE

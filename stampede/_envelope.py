"""Entries as bytes, for stores shared between processes (disk, Redis).

Layout, version 1 (integers little-endian):

    magic       4   b"\\xa5stp"
    version     1   1
    kind        1   0 = value, 1 = error
    key check   8   BLAKE2b-64 of the store key: an entry copied to another key is a miss
    clock id    8   the writer's clock domain (a process and its clock)
    written     8   <d   the write, on the writer's clock
    timing     32   <4d  fresh, stale, retry, delta: seconds after the write
                         (retry is -inf when no refresh failed)
    serializer  1+n length-prefixed ASCII name of the value serializer
    value       ... the serializer's payload (its context is the store key)
  or, for an error:
    type        2+n length-prefixed "module.qualname" of the exception type
    args        ... the serializer's payload of the exception's args
    checksum    4   CRC-32 of all the above: a damaged entry is a miss, not a wrong value
                    (against someone who may write the store, sign: PickleSerializer)

Time: the store keeps an entry for ``stale`` seconds (Redis ``PX``, diskcache
``expire``) and a read learns how long it has left (``PTTL``, the expiry
diskcache keeps). A reader of another clock domain places the write on its
own monotonic clock, ``written = now - (stale - remaining)``: no reader ever
compares its wall clock with another host's. A reader of the writer's own
domain (the same process and clock) uses ``written`` as it is: exact, and
what makes an injected test clock work with shared stores too.

The refresh point (XFetch) is not stored: each process draws its own ``u``
for each stored value, derived from a per-process salt and the entry's
bytes, so it is fixed for that value (reads do not draw) but differs between
processes, and the earliest of them refreshes for all (``_entry.refresh_point``).

Errors are rebuilt only as types already imported by the reader that are
subclasses of its ``cache_errors`` types: nothing is imported, nothing runs.
An error its type cannot be rebuilt from (its args) is a corrupt entry.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
import time
import weakref
import zlib
from typing import Any

from ._entry import ENVELOPE_VERSION, MISSING, Entry, ErrorData, refresh_point

MAGIC = b"\xa5stp"
_HEAD = struct.Struct("<4sBB8s8sd4d")
_HEAD_SIZE = _HEAD.size
_TYPE_LEN = struct.Struct("<H")
_CRC = struct.Struct("<I")
_MIN_SIZE = _HEAD_SIZE + 1 + _CRC.size

VALUE, ERROR = 0, 1


class CorruptEntry(Exception):
    """Bytes in the store that are not a readable entry of this cache (a counted miss)."""


_salt = os.urandom(16)


def _reseed() -> None:
    global _salt
    _salt = os.urandom(16)
    _heads.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reseed)  # a child draws apart from its parent


_domains: weakref.WeakKeyDictionary[Any, bytes] = weakref.WeakKeyDictionary()
_pinned: dict[int, tuple[object, bytes]] = {}  # clocks that take no weak reference


def clock_domain(clock: object) -> bytes:
    """An id shared by the readers whose clock readings can be compared as they are.

    ``time.monotonic`` is one domain per process; any other clock object gets
    a random token of its own for as long as it lives (never its ``id``: a
    new clock may reuse a dead one's address).
    """
    if clock is time.monotonic:
        token = b"monotonic"
    else:
        try:
            token = _domains.setdefault(clock, os.urandom(8))
        except TypeError:  # not weakly referable: keep it alive, so its id stays its own
            token = _pinned.setdefault(id(clock), (clock, os.urandom(8)))[1]
    return hashlib.blake2b(token, digest_size=8, key=_salt).digest()


def key_check(key: str) -> bytes:
    return hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()


def encode(key: str, entry: Entry[Any], now: float, serializer: Any, domain: bytes) -> bytes:
    """The bytes of ``entry`` written at ``now``; ``SerializationError`` if it cannot be."""
    name = serializer.name.encode("ascii")
    context = key.encode("utf-8", "surrogatepass")
    kind = VALUE if entry.error is None else ERROR
    head = _HEAD.pack(
        MAGIC,
        ENVELOPE_VERSION,
        kind,
        key_check(key),
        domain,
        now,
        entry.fresh_until - now,
        entry.stale_until - now,
        entry.retry_at - now if math.isfinite(entry.retry_at) else -math.inf,
        entry.delta,
    )
    parts = [head, bytes([len(name)]), name]
    if entry.error is None:
        parts.append(serializer.dumps(entry.value, context=context))
    else:
        cls = entry.error.type
        type_name = f"{cls.__module__}.{cls.__qualname__}".encode()
        parts += [_TYPE_LEN.pack(len(type_name)), type_name]
        # A signing serializer binds the args to "an error of this type": signed
        # value bytes cannot be passed off as a cached error, or the reverse.
        error_context = context + b"\x00error\x00" + type_name
        parts.append(serializer.dumps(tuple(entry.error.args), context=error_context))
    body = b"".join(parts)
    return body + _CRC.pack(zlib.crc32(body))


def lifetime(entry: Entry[Any], now: float) -> float:
    """Seconds the store should keep ``entry`` written at ``now``."""
    return entry.stale_until - now


def decode(
    data: bytes,
    key: str,
    serializer: Any,
    now: float,
    remaining: float,
    beta: float,
    error_types: tuple[type[BaseException], ...],
    domain: bytes,
) -> Entry[Any]:
    """The entry in ``data`` on the reader's clock; ``CorruptEntry`` if it is not one.

    ``remaining`` is how long the store will still keep it, in seconds.
    """
    if type(data) is not bytes:
        data = bytes(data)
    if len(data) < _MIN_SIZE:
        raise CorruptEntry("truncated header")
    (crc,) = _CRC.unpack_from(data, len(data) - _CRC.size)
    data = data[: -_CRC.size]
    if zlib.crc32(data) != crc:
        if data[:4] != MAGIC:
            raise CorruptEntry("not a stampede entry")
        raise CorruptEntry("checksum mismatch: the entry is damaged")
    head = data[:_HEAD_SIZE]
    parsed = _heads.get(head)
    if parsed is None:
        parsed = _parse_head(head)
    kind, check, writer, at, fresh, stale, retry, delta, u = parsed
    if check != (_checks.get(key) or _check_of(key)):
        raise CorruptEntry("the entry belongs to another key")
    name = _names.get(serializer.name) or _name_of(serializer.name)
    offset = _HEAD_SIZE + len(name)
    if data[_HEAD_SIZE:offset] != name:
        raise CorruptEntry(
            f"written by serializer {data[_HEAD_SIZE + 1 : offset]!r}, "
            f"reading with {serializer.name!r}"
        )
    context = key.encode("utf-8", "surrogatepass")
    if writer == domain and at <= now:
        written = at
    else:
        written = now - max(0.0, stale - remaining)
    fresh_until = written + fresh
    retry_at = written + retry
    if kind == VALUE:
        value = _loads(serializer, data[offset:], context)
        check_at = refresh_point(written, fresh, delta, beta, u)
        return Entry(value, None, fresh_until, written + stale, delta, check_at, retry_at)
    if len(data) < offset + _TYPE_LEN.size:
        raise CorruptEntry("truncated error type")
    (type_len,) = _TYPE_LEN.unpack_from(data, offset)
    offset += _TYPE_LEN.size
    raw_type = data[offset : offset + type_len]
    type_name = raw_type.decode("utf-8", "replace")
    offset += type_len
    exc_type = _resolve(type_name, error_types)
    args = _loads(serializer, data[offset:], context + b"\x00error\x00" + raw_type)
    if type(args) is not tuple:
        raise CorruptEntry("error args are not a tuple")
    error = ErrorData(exc_type, args)
    # stampede never stores an error it cannot rebuild (the leader checks), but a
    # foreign entry may name one whose args do not fit (ExceptionGroup("m", [])):
    # refuse it here, where every read path turns it into a counted miss, instead
    # of a TypeError when the negative hit is raised.
    if not error.rebuildable():
        raise CorruptEntry(f"an error {type_name} cannot be rebuilt from its args")
    return Entry(MISSING, error, fresh_until, fresh_until, 0.0, -math.inf)


# What a read learns from the fixed-size head alone, kept per head (a hot key's head
# is the same on every read until it is written again) and checked once: (kind, key
# check, writer, written, fresh, stale, retry, delta, XFetch draw). Also the key
# checks of keys read lately and the serializer names as stored. Each map is emptied
# when full (a read then parses again), and the heads at fork (a child draws apart).
_heads: dict[bytes, tuple[int, bytes, bytes, float, float, float, float, float, float]] = {}
_checks: dict[str, bytes] = {}
_names: dict[str, bytes] = {}
_MEMO = 1024


def _parse_head(
    head: bytes,
) -> tuple[int, bytes, bytes, float, float, float, float, float, float]:
    magic, version, kind, check, writer, at, fresh, stale, retry, delta = _HEAD.unpack(head)
    if magic != MAGIC:
        raise CorruptEntry("not a stampede entry")
    if version != ENVELOPE_VERSION:
        raise CorruptEntry(f"entry format {version}, this stampede reads {ENVELOPE_VERSION}")
    if kind != VALUE and kind != ERROR:
        raise CorruptEntry(f"unknown entry kind {kind}")
    # fresh may be negative: a stale value rewritten (after a failed refresh).
    finite = math.isfinite(fresh) and math.isfinite(stale) and math.isfinite(delta)
    if not finite or stale < 0 or delta < 0 or fresh > stale or retry != retry:
        raise CorruptEntry("impossible timing")
    if not math.isfinite(at):
        at = math.inf  # never taken as the write time (a reader's now is finite)
    parsed = (kind, check, writer, at, fresh, stale, retry, delta, _draw(head))
    if len(_heads) >= _MEMO:
        _heads.clear()
    _heads[head] = parsed
    return parsed


def _check_of(key: str) -> bytes:
    check = key_check(key)
    if len(_checks) >= _MEMO:
        _checks.clear()
    _checks[key] = check
    return check


def _name_of(name: str) -> bytes:
    raw = name.encode("ascii")
    stored = _names[name] = bytes([len(raw)]) + raw
    return stored


def _loads(serializer: Any, payload: bytes, context: bytes) -> Any:
    try:
        return serializer.loads(payload, context=context)
    except Exception as exc:  # SerializationError, or a serializer's own failure
        raise CorruptEntry(f"payload: {exc}") from exc


def _draw(head: bytes) -> float:
    """This process's XFetch draw for the stored value of this head, in (0, 1]."""
    digest = hashlib.blake2b(head, digest_size=8, key=_salt).digest()
    return 1.0 - int.from_bytes(digest, "little") / 2.0**64


# name -> type found by the walk below, per cache_errors: a negative read walks once.
_resolved: dict[tuple[str, tuple[type[BaseException], ...]], type[Exception]] = {}


def _resolve(name: str, error_types: tuple[type[BaseException], ...]) -> type[Exception]:
    """The exception type called ``name``: one of ``error_types`` or an imported subclass.

    Only classes that exist in this process already are candidates (found by
    walking ``__subclasses__``), so reading an entry never imports anything;
    classes defined inside functions are found too.
    """
    cached = _resolved.get((name, error_types))
    if cached is not None:
        return cached
    seen: set[type[BaseException]] = set()
    todo = list(error_types)
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.add(cls)
        if f"{cls.__module__}.{cls.__qualname__}" == name and issubclass(cls, Exception):
            if len(_resolved) > 1024:
                _resolved.clear()
            _resolved[(name, error_types)] = cls
            return cls
        todo.extend(cls.__subclasses__())
    raise CorruptEntry(f"negative entry of {name}, which is not among this cache's cache_errors")

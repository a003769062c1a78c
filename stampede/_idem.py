"""Idempotency keys, without I/O: options, records, fingerprints, the running claim.

An idempotent call is a single flight whose outcome is kept (DESIGN.md section
8). What is decided here:

- the store key of a user's key (its SHA-256, never the key itself, namespaced
  like a cache key so that a Redis Cluster keeps its record, lease and fence
  counter in one slot) and the fingerprint of a call (a digest);
- what a record holds: the outcome's kind (a value, a recorded exception, or
  "ran but not replayable"), the fingerprint and fence of the execution that
  wrote it, and the payload, through the data-only serializer, behind a
  checksum bound to the key (a record copied under another key, or damaged,
  is refused before decoding);
- the claim the work runs under (``current()``): its fence number, a stable key
  derived for downstream calls, and ``effect_started()``.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import math
import struct
import zlib
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

from ._envelope import CorruptEntry
from ._errors import SerializationError
from ._keys import encode_key
from ._options import seconds
from .backends._shared import ValueTooLarge

VALUE: Literal["value"] = "value"
ERROR: Literal["error"] = "error"
UNREPLAYABLE: Literal["unreplayable"] = "unreplayable"
Kind = Literal["value", "error", "unreplayable"]
_KINDS = (VALUE, ERROR, UNREPLAYABLE)

_MAGIC = b"SIR1"  # stampede idempotency record, format 1
_CRC = struct.Struct(">I")
DEFAULT_MAX_RECORD_SIZE = 1 << 20


class Record(NamedTuple):
    """A finished execution's outcome, as recorded."""

    kind: Kind
    fingerprint: str
    fence: int
    payload: Any  # the value; (type name, args) of an error; None


def store_key(namespace: str, key: object) -> str:
    """Where ``key``'s record lives: the digest of the key, never the key itself."""
    return encode_key(namespace, ("idem", digest(key)))


def digest(value: object) -> str:
    """A stable SHA-256 of a key or fingerprint: bytes and str as they are, other
    values through the key encoder (typed: ``1`` and ``"1"`` differ), JSON-like
    dicts and lists canonically (sorted keys)."""
    if isinstance(value, bytes):
        data = b"b" + value
    elif isinstance(value, str):
        data = b"s" + value.encode("utf-8", "surrogatepass")
    else:
        try:
            data = b"k" + encode_key("", value).encode("utf-8", "surrogatepass")
        except TypeError:
            if not _plain_json(value):
                raise TypeError(
                    f"cannot fingerprint {value!r:.60}: pass fingerprint= (bytes, a str, or "
                    "plain data: numbers, strings, tuples, dicts with str keys, lists) "
                    "saying what the call is about"
                ) from None
            try:
                text = json.dumps(value, sort_keys=True, separators=(",", ":"))
            except (TypeError, ValueError, RecursionError):
                raise TypeError(
                    f"cannot fingerprint {value!r:.60}: pass fingerprint= (bytes, a str, or "
                    "plain data: numbers, strings, tuples, dicts with str keys, lists) "
                    "saying what the call is about"
                ) from None
            data = b"j" + text.encode("utf-8", "surrogatepass")
    return hashlib.sha256(data).hexdigest()


def _plain_json(value: object, depth: int = 0) -> bool:
    """Whether ``value`` is JSON data whose dict keys are all str (so that its JSON
    text tells two values apart: ``{1: "a"}`` and ``{"1": "a"}`` would not be)."""
    if depth > 100:
        return False
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain_json(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(type(k) is str and _plain_json(v, depth + 1) for k, v in value.items())
    return False


class Unrecordable:
    """A value the work returns to its callers that is recorded as "ran, not
    replayable" (a streamed HTTP response): retries get ``ReplayUnavailable``."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


def encode_record(key: str, record: Record, serializer: Any, max_size: int | None) -> bytes:
    """The bytes of ``record`` under ``key``; ``SerializationError`` when the payload
    cannot be written, ``ValueTooLarge`` past ``max_size``."""
    context = key.encode("utf-8", "surrogatepass")
    try:
        body: bytes = serializer.dumps(tuple(record), context=context)
    except SerializationError:
        raise
    except Exception as exc:
        raise SerializationError(f"cannot record a {type(record.payload).__name__}: {exc}") from exc
    data = _MAGIC + body
    if max_size is not None and len(data) + _CRC.size > max_size:
        raise ValueTooLarge(f"the record takes {len(data):,} bytes, more than {max_size:,}")
    return data + _CRC.pack(zlib.crc32(data + context))


def decode_record(key: str, data: bytes, serializer: Any) -> Record:
    """The record in ``data``; ``CorruptEntry`` unless it is one, written for ``key``."""
    context = key.encode("utf-8", "surrogatepass")
    if len(data) < len(_MAGIC) + _CRC.size or data[: len(_MAGIC)] != _MAGIC:
        raise CorruptEntry("not an idempotency record")
    (crc,) = _CRC.unpack_from(data, len(data) - _CRC.size)
    body = data[: -_CRC.size]
    if zlib.crc32(body + context) != crc:
        raise CorruptEntry("checksum mismatch: damaged, or written for another key")
    try:
        fields = serializer.loads(body[len(_MAGIC) :], context=context)
    except Exception as exc:
        raise CorruptEntry(f"unreadable record: {exc}") from exc
    if type(fields) is not tuple or len(fields) != 4 or fields[0] not in _KINDS:
        raise CorruptEntry("not an idempotency record")
    kind, fingerprint, fence, payload = fields
    if type(fingerprint) is not str or type(fence) is not int:
        raise CorruptEntry("not an idempotency record")
    return Record(kind, fingerprint, fence, payload)


# -- the work's claim ----------------------------------------------------------------------


class Claim:
    """What the running work knows of its claim (``stampede.idempotency.current()``)."""

    __slots__ = ("_effect", "fence", "key")

    def __init__(self, key: str, fence: int) -> None:
        self.key: str = key  # the store key: a digest, never the user's key
        self.fence: int = fence  # +1 on every claim of the key: pass it downstream
        self._effect = False

    def derive_key(self, name: str) -> str:
        """A key for a downstream call (``name``: which one), the same on every
        execution of this idempotency key (a takeover included)."""
        return hashlib.sha256(f"{self.key}\x00{name}".encode("utf-8", "surrogatepass")).hexdigest()

    def effect_started(self) -> None:
        """From here on, an exception is recorded and replayed, not released: the
        work's side effect may have happened, so it must not run again."""
        self._effect = True

    @property
    def effect(self) -> bool:
        return self._effect


_current: contextvars.ContextVar[Claim | None] = contextvars.ContextVar(
    "stampede_idempotency_claim", default=None
)


def current() -> Claim | None:
    """The claim the running idempotent work holds (None outside one)."""
    return _current.get()


# -- options -----------------------------------------------------------------------------------


class IdemOptions:
    """The checked options of an ``Idempotency``."""

    __slots__ = (
        "fail_open",
        "lease_ttl",
        "max_record_size",
        "metrics",
        "name",
        "namespace",
        "record_errors",
        "reject",
        "retention",
        "serializer",
        "wait_timeout",
    )

    def __init__(
        self,
        *,
        namespace: str,
        retention: float,
        lease_ttl: float,
        on_conflict: str,
        wait_timeout: float | None,
        on_backend_error: str,
        record_errors: tuple[type[BaseException], ...] | type[BaseException],
        serializer: Any,
        max_record_size: int,
        metrics: Any,
    ) -> None:
        if not isinstance(namespace, str):
            raise TypeError(f"namespace must be a str, got {type(namespace).__name__}")
        self.namespace: str = namespace
        self.retention: float = seconds("retention", retention, positive=True)
        self.lease_ttl: float = seconds("lease_ttl", lease_ttl, positive=True)
        if on_conflict not in ("wait", "reject"):
            raise ValueError(f"on_conflict must be 'wait' or 'reject', got {on_conflict!r}")
        self.reject: bool = on_conflict == "reject"
        self.wait_timeout: float = (
            math.inf if wait_timeout is None else seconds("wait_timeout", wait_timeout)
        )
        if on_backend_error not in ("raise", "fail-open"):
            raise ValueError(
                f"on_backend_error must be 'raise' or 'fail-open', got {on_backend_error!r}"
            )
        self.fail_open: bool = on_backend_error == "fail-open"
        if isinstance(record_errors, type):
            record_errors = (record_errors,)
        if not all(isinstance(t, type) and issubclass(t, Exception) for t in record_errors):
            raise TypeError("record_errors must be Exception types")
        self.record_errors: tuple[type[BaseException], ...] = tuple(record_errors)
        if serializer is None:
            from .serializers import DataSerializer

            serializer = DataSerializer()
        self.serializer: Any = serializer
        if isinstance(max_record_size, bool) or not isinstance(max_record_size, int):
            raise TypeError("max_record_size must be an int")
        if max_record_size < 256:
            raise ValueError("max_record_size must be at least 256 bytes")
        self.max_record_size: int = max_record_size
        self.metrics: Any = metrics
        self.name: str = namespace or "idempotency"

    def wait_timeout_or_none(self) -> float | None:
        return None if math.isinf(self.wait_timeout) else self.wait_timeout


def error_payload(exc: BaseException) -> tuple[str, tuple[Any, ...]]:
    """What a recorded exception keeps: its type's qualified name and its args."""
    cls = type(exc)
    return f"{cls.__module__}.{cls.__qualname__}", tuple(exc.args)


def rebuild_error(
    payload: Any, allowed: tuple[type[BaseException], ...]
) -> BaseException:
    """A new instance of a recorded exception, of one of the ``allowed`` types (or a
    subclass of one, already imported); ``CorruptEntry`` for anything else."""
    if type(payload) is not tuple or len(payload) != 2 or type(payload[1]) is not tuple:
        raise CorruptEntry("a recorded error that is not (type, args)")
    name, args = payload
    todo: list[type[BaseException]] = list(allowed)
    seen: set[type[BaseException]] = set()
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.add(cls)
        if f"{cls.__module__}.{cls.__qualname__}" == name:
            try:
                return cls(*args)
            except Exception as exc:
                raise CorruptEntry(f"a recorded {name} cannot be rebuilt: {exc}") from exc
        todo.extend(cls.__subclasses__())
    raise CorruptEntry(f"a recorded {name}, not one of record_errors")


# The counters of an Idempotency (its stats()).
COUNTERS = (
    "executed",  # the work ran here, under a claim (or unprotected)
    "replayed",  # callers answered by a recorded outcome (or by joining a run here)
    "waited",  # callers that waited for another process's run
    "rejected",  # InFlight raised (reject mode, or past wait_timeout)
    "key_reused",  # KeyReused raised
    "takeovers",  # claims of a key whose previous owner's lease had expired
    "fenced",  # commits refused: the lease was lost meanwhile
    "released",  # claims released by an exception not recorded
    "unreplayable",  # outcomes recorded as ReplayUnavailable
    "unprotected",  # runs while the store was down, with on_backend_error="fail-open"
)


class IdemStats(NamedTuple):
    """A frozen snapshot of an ``Idempotency``'s counters."""

    executed: int = 0
    replayed: int = 0
    waited: int = 0
    rejected: int = 0
    key_reused: int = 0
    takeovers: int = 0
    fenced: int = 0
    released: int = 0
    unreplayable: int = 0
    unprotected: int = 0


class IdemCounters:
    """The live counters behind ``IdemStats`` (and the metrics hook, if any)."""

    def __init__(self, metrics: Any, name: str) -> None:
        self.values: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.metrics = metrics
        self.name = name

    def count(self, event: str) -> None:
        self.values[event] += 1
        if self.metrics is not None:
            with contextlib.suppress(Exception):  # a hook must never break the work
                self.metrics.record(self.name, f"idempotency_{event}", None)

    def snapshot(self) -> IdemStats:
        return IdemStats(**self.values)


Loader = Callable[[], Any]

"""Serializers: cached values to bytes and back, for disk and Redis backends.

A serializer turns one cached value into bytes and back. ``context`` names
where the value lives (namespace and key): a signing serializer binds its
signature to it, so bytes copied from one key to another are refused; the
others ignore it. Reading raises ``SerializationError`` for anything it
cannot trust or decode (the cache treats that as a miss); writing raises it
for a value it cannot store (the cache returns the value, uncached).

    DataSerializer     the default. A data-only format on msgpack (``_dataformat``):
                       reading never runs code from the payload or imports
                       anything, and its work is bounded by the payload size.
                       Keeps the exact type of the common Python values;
                       enums, dataclasses, attrs classes and pydantic models
                       only when registered (an allowlist).
    PickleSerializer   any picklable value, HMAC-SHA256 signed with a secret;
                       the signature is checked before pickle sees a byte.
    JsonSerializer     plain JSON, to share entries with other languages.
    MsgpackSerializer  plain msgpack, the same use.

Each has a short ``name`` ("data2", "pickle1", "json1", "msgpack1") naming
its format, for an envelope to record which format wrote an entry.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import pickle
from collections.abc import Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

import msgpack

from . import _dataformat
from ._errors import SerializationError

__all__ = [
    "DataSerializer",
    "JsonSerializer",
    "MsgpackSerializer",
    "PickleSerializer",
    "SerializationError",
    "Serializer",
]


@runtime_checkable
class Serializer(Protocol):
    """Turns cached values into bytes and back."""

    name: str  # short ASCII id of the format, recorded with each entry

    def dumps(self, value: Any, *, context: bytes) -> bytes:
        """The bytes of ``value``; raises ``SerializationError`` if it cannot be stored."""
        ...

    def loads(self, data: bytes, *, context: bytes) -> Any:
        """The value of ``data``; raises ``SerializationError`` for anything malformed."""
        ...


class DataSerializer:
    """The safe default: a typed data-only format that never runs code when reading.

    msgpack's C codec, with stampede's types on top as msgpack extensions.
    Round-trips, keeping the exact type: ``None``, ``bool``, ``int`` (any
    size), ``float`` (nan, inf, -0.0), ``str`` (lone surrogates too),
    ``bytes``, ``list``, ``tuple``, ``dict`` (any supported keys, insertion
    order), ``set``, ``frozenset``, ``date``, ``time``, ``datetime`` (naive or
    aware, ``fold`` kept), ``timedelta``, ``Decimal``, ``UUID``, and members
    and instances of the classes in ``types``. A ``bytearray`` reads back as
    ``bytes``. Subclasses of these types are refused (they would come back as
    the base type), and so are other ``tzinfo`` than ``datetime.timezone``
    and ``zoneinfo.ZoneInfo`` (stored by key, looked up in the tz database
    of the reading host). Shared references are not kept (an object reached
    twice comes back as two equal copies) and cycles are refused.

    Args:
        types: the enums, dataclasses, attrs classes and pydantic (v2) models
            values may contain: an allowlist. They are written under
            ``"module.QualName"``; pass a mapping ``{name: class}`` to choose
            stable names instead. A payload naming a class not listed here is
            refused. Dataclasses are rebuilt without calling ``__init__`` or
            ``__post_init__``, with their declared fields only; attrs classes
            through their own ``__init__`` (validators run), with the fields it
            takes; pydantic models through ``model_validate_json`` of what
            ``model_dump_json(by_alias=True, round_trip=True)`` wrote. A
            payload written when a dataclass or attrs class had other fields,
            or that the class refuses, is refused (a miss). Enums are stored by
            member name (``Flag`` classes by value).
    """

    name = "data2"

    def __init__(self, *, types: Iterable[type[Any]] | Mapping[str, type[Any]] = ()) -> None:
        self._registry = _dataformat.Registry(types)
        self._codec = _dataformat.Codec(self._registry)

    def dumps(self, value: Any, *, context: bytes = b"") -> bytes:
        try:
            return self._codec.encode(value)
        except _dataformat.FormatError as exc:
            raise SerializationError(*exc.args) from exc.__cause__

    def loads(self, data: bytes, *, context: bytes = b"") -> Any:
        try:
            return self._codec.decode(data if type(data) is bytes else _as_bytes(data))
        except _dataformat.FormatError as exc:
            raise SerializationError(*exc.args) from exc.__cause__

    def __repr__(self) -> str:
        return f"DataSerializer(types=[{', '.join(self._registry.by_name)}])"


_KEY_ID_SIZE = 8
_MAC_SIZE = hashlib.sha256().digest_size
_MAC_LABEL = b"stampede.pickle1\0"


class PickleSerializer:
    """Any picklable value, signed: ``key id (8) + HMAC-SHA256 (32) + pickle``.

    The MAC covers the context (length-prefixed, so context and payload
    cannot trade bytes) and the pickle. Reading checks it with
    ``hmac.compare_digest`` before anything is unpickled: a payload from
    anyone without a secret, or copied from another key, is refused and
    never reaches ``pickle``. Unpickling signed bytes runs code, as pickle
    does: whoever holds a secret is trusted.

    The key id is an HMAC of a fixed label under the secret (not a plain hash
    of it), so it tells which secret signed without revealing anything usable.

    Args:
        secret: the signing secret (``str`` is UTF-8 encoded); never empty.
        verify: older secrets still accepted when reading, for rotation:
            sign with the new secret and list the old ones here until the
            entries they signed have expired.
        protocol: the pickle protocol to write.

    Raises:
        ValueError: an empty secret.
    """

    name = "pickle1"

    def __init__(
        self,
        secret: bytes | str,
        *,
        verify: Iterable[bytes | str] = (),
        protocol: int = pickle.HIGHEST_PROTOCOL,
    ) -> None:
        if isinstance(verify, (bytes, str)):
            raise TypeError("verify takes a list of secrets, not one secret")
        self._secret = _secret_bytes(secret)
        self._key_id = _key_id(self._secret)
        self._protocol = protocol
        self._keys = {self._key_id: self._secret}
        for old in verify:
            key = _secret_bytes(old)
            if self._keys.setdefault(_key_id(key), key) != key:  # 2**-64: a broken hash
                raise ValueError("two secrets share a key id")

    def dumps(self, value: Any, *, context: bytes) -> bytes:
        try:
            payload = pickle.dumps(value, protocol=self._protocol)
        except Exception as exc:  # PicklingError, TypeError, ... from any __reduce__
            raise SerializationError(f"cannot pickle {type(value).__qualname__}: {exc}") from exc
        return self._key_id + _mac(self._secret, context, payload) + payload

    def loads(self, data: bytes, *, context: bytes) -> Any:
        data = _as_bytes(data)
        if len(data) < _KEY_ID_SIZE + _MAC_SIZE:
            raise SerializationError("not a signed pickle (too short)")
        secret = self._keys.get(data[:_KEY_ID_SIZE])
        if secret is None:
            raise SerializationError("signed with an unknown key")
        payload = data[_KEY_ID_SIZE + _MAC_SIZE :]
        expected = _mac(secret, context, payload)
        if not hmac.compare_digest(expected, data[_KEY_ID_SIZE : _KEY_ID_SIZE + _MAC_SIZE]):
            raise SerializationError("bad signature (tampered, or written for another key)")
        try:
            return pickle.loads(payload)
        except Exception as exc:  # signed, but e.g. its class was renamed since
            raise SerializationError(f"cannot unpickle a signed value: {exc!r}") from exc

    def __repr__(self) -> str:
        ids = ", ".join(key_id.hex() for key_id in self._keys)
        return f"PickleSerializer(key ids: {ids})"


def _secret_bytes(secret: bytes | str) -> bytes:
    if isinstance(secret, str):
        key = secret.encode("utf-8")
    elif isinstance(secret, (bytes, bytearray)):
        key = bytes(secret)
    else:
        raise TypeError(f"a secret is bytes or str, not {type(secret).__qualname__}")
    if not key:
        raise ValueError("a PickleSerializer secret must not be empty")
    return key


def _key_id(secret: bytes) -> bytes:
    return hmac.new(secret, b"stampede.pickle1 key id", hashlib.sha256).digest()[:_KEY_ID_SIZE]


def _mac(secret: bytes, context: bytes, payload: bytes) -> bytes:
    mac = hmac.new(secret, _MAC_LABEL, hashlib.sha256)
    mac.update(len(context).to_bytes(8, "big"))
    mac.update(context)
    mac.update(payload)
    return mac.digest()


class JsonSerializer:
    """Plain UTF-8 JSON, to share entries with programs in other languages.

    Stores what JSON can: ``None``, ``bool``, ``int``, finite ``float``,
    ``str`` (no lone surrogates), lists and dicts with ``str`` keys. Tuples
    come back as lists. Other dict keys are refused rather than turned into
    strings, and so are nan and infinities (not JSON).
    """

    name = "json1"

    def dumps(self, value: Any, *, context: bytes = b"") -> bytes:
        try:
            text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
            _check_str_keys(value)  # after dumps, which refuses cycles
            return text.encode("utf-8")
        except (TypeError, ValueError, RecursionError) as exc:
            raise SerializationError(f"cannot store as JSON: {exc}") from exc

    def loads(self, data: bytes, *, context: bytes = b"") -> Any:
        try:
            return json.loads(_as_bytes(data).decode("utf-8"), parse_constant=_no_constant)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
            raise SerializationError(f"malformed JSON: {exc}") from exc


def _check_str_keys(value: Any) -> None:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, child in item.items():
                if type(key) is not str:
                    raise TypeError(f"JSON keys must be str, got {type(key).__qualname__}")
                stack.append(child)
        elif isinstance(item, (list, tuple)):
            stack.extend(item)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


class MsgpackSerializer:
    """Plain msgpack, to share entries with other languages.

    Stores ``None``, ``bool``, 64-bit ``int``, ``float``, ``str``, ``bytes``,
    lists and dicts. Tuples (and bytearrays) come back as lists (and bytes).
    Dict keys may be of any of these types except containers: a tuple key is
    written but reads back as an error (a miss).
    """

    name = "msgpack1"

    def dumps(self, value: Any, *, context: bytes = b"") -> bytes:
        try:
            data = msgpack.packb(value, use_bin_type=True)
        except Exception as exc:  # TypeError, OverflowError, UnicodeEncodeError, ...
            raise SerializationError(f"cannot store as msgpack: {exc}") from exc
        assert isinstance(data, bytes)  # packb without a stream returns its bytes
        return data

    def loads(self, data: bytes, *, context: bytes = b"") -> Any:
        try:
            return msgpack.unpackb(_as_bytes(data), raw=False, strict_map_key=False)
        except Exception as exc:  # ExtraData, FormatError, StackError, unhashable keys, ...
            raise SerializationError(f"malformed msgpack: {exc}") from exc


def _as_bytes(data: bytes) -> bytes:
    if type(data) is bytes:
        return data
    try:
        return bytes(memoryview(data))
    except TypeError as exc:
        raise SerializationError(f"expected bytes, got {type(data).__qualname__}") from exc

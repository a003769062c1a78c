"""The data-only format behind ``DataSerializer``: msgpack, with stampede's types on top.

A payload is one format byte (``FORMAT``, now 2) and one msgpack object. msgpack
carries ``None``, ``bool``, 64-bit ``int``, ``float``, ``str`` and ``bytes``,
``list`` and ``dict`` natively (exact types only: ``strict_types``; msgpack packs
a ``bytearray`` or ``memoryview`` as bytes, so they read back as ``bytes``); every
other supported type is a msgpack extension whose body stampede writes and reads:

    code  type               body
    1     tuple              a msgpack array of its items
    2 3   set, frozenset     the same
    5     int past 64 bits   two's complement, little-endian
    6     Decimal            ASCII of str(d) (sign, exponent, NaN, sNaN kept)
    7     datetime           date, time (with fold), zone
    8     date               year:u16 month:u8 day:u8
    9     time               time (with fold), zone
    10    timedelta          days:i32 seconds:u32 microseconds:u32
    11    UUID               16 bytes
    12    enum member        [class, member name] (Flag classes: [class, value])
    13    dataclass          [class, field values...]
    14    attrs instance     [class, values of the fields __init__ takes...]
    15    pydantic model     [class, the model's JSON (by alias, round trip)]

    zone   0 naive | 1 a timezone's offset (timedelta body) | 2 the same, then its
           name (UTF-8) | 3 a ZoneInfo key (ASCII)
    class  on its first use in a payload, its registered name, then for a
           dataclass or attrs class the list of its field names, which must be the
           class's fields now; afterwards, its index among the classes brought in

Reading runs no code chosen by the payload and imports nothing: extension codes
map to built-in constructors, and classes are looked up by name in the registry
(an allowlist the application built). Dataclasses are rebuilt with
``object.__new__`` and their declared fields (no ``__init__``); attrs classes
through their own ``__init__``, pydantic models through ``model_validate_json``:
the class's own validation, on data the payload can only name fields of. A
ZoneInfo is stored by key, as pickle stores it, and read with
``zoneinfo.ZoneInfo(key)`` after a strict name check and a lookup in the host's
zone list (no dots, no absolute paths; ZoneInfo would otherwise try the tzdata
package, importing a module named after the key). msgpack's own timestamp
extension reads as a float, never as a foreign type.

Work is bounded by the payload: msgpack refuses lengths larger than the bytes
left before allocating; its arrays and maps nest at most 511 deep on write and
1024 on read; extensions (tuples, sets, registered classes) nest at most
``MAX_DEPTH`` deep; a dict or set in which more than ``MAX_SAME_HASH`` keys
share one hash is refused (ints are easy to make collide, which would make
building it quadratic). Dicts whose keys are all ``str`` (or ``bytes``, whose
hashes are randomised like ``str``'s) are built by msgpack in C; a payload with
other keys is read again with a check on every map. Shared references are not
kept (an object reached twice comes back as two equal copies) and cycles are
refused on write.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import functools
import os
import re
import struct
import sys
import uuid
import zoneinfo
from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast

import msgpack

FORMAT = 2
MAX_DEPTH = 32  # extensions (tuples, sets, registered classes) nested in one another
MAX_SAME_HASH = 32  # keys of one dict or set that may share a hash value

_TUPLE, _SET, _FROZENSET, _BIGINT, _DECIMAL_CODE = 1, 2, 3, 5, 6  # 4: unused
_DATETIME, _DATE_CODE, _TIME_CODE, _TIMEDELTA, _UUID = 7, 8, 9, 10, 11
_ENUM, _DATACLASS, _ATTRS, _PYDANTIC = 12, 13, 14, 15

# ExtType's own __new__ checks its arguments in Python (~0.4 us); _make builds the
# same namedtuple directly, from arguments made here.
_ext = msgpack.ExtType._make

_DATE = struct.Struct(">HBB")
_TIME = struct.Struct(">BBBIB")  # hour minute second microsecond fold
_DATETIME_HEAD = struct.Struct(">HBBBBBIB")  # the date, then the time
_DELTA = struct.Struct(">iII")
_UTC = datetime.timezone.utc


@functools.cache
def _known_zones() -> frozenset[str]:
    """The zone keys this machine lists (its TZPATH and the tzdata package), read once."""
    return frozenset(zoneinfo.available_timezones())


def _zone_known(key: str) -> bool:
    """``key`` names a listed zone or a file under TZPATH (``_ZONE_KEY`` has no dots)."""
    if key in _known_zones():
        return True
    return any(os.path.isfile(os.path.join(folder, key)) for folder in zoneinfo.TZPATH)


_ZONE_KEY = re.compile(r"[A-Za-z0-9_+-]{1,64}(?:/[A-Za-z0-9_+-]{1,64}){0,3}")
_SUPPORTED = (
    "None, bool, int, float, str, bytes, list, tuple, dict, set, frozenset, "
    "date, time, datetime, timedelta, Decimal, UUID, and registered enums, dataclasses, "
    "attrs classes and pydantic models"
)


class FormatError(ValueError):
    """A value this format cannot write, or bytes that are not a valid payload."""


def _register_hint(cls: type[Any]) -> str:
    """How to make ``cls`` storable, in code the user can paste."""
    return (
        f"to store it, register the class: DataSerializer(types=[{_qualified(cls)}]) "
        "passed as serializer= to the cache (or @cached); or use "
        "PickleSerializer(secret=...) for any picklable value"
    )


def _qualified(cls: type[Any]) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


# -- the registry ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Class:
    name: str
    cls: type[Any]
    code: int  # _ENUM, _DATACLASS, _ATTRS or _PYDANTIC
    fields: tuple[str, ...] = ()  # dataclass: its fields; attrs: those __init__ takes
    args: tuple[str, ...] = ()  # attrs: the __init__ argument of each field (its alias)
    flag: bool = False


def _attrs_fields(cls: type[Any]) -> list[Any] | None:
    """The attrs fields of ``cls`` (None: not an attrs class). attrs is not imported
    here: a class made with it carries ``__attrs_attrs__``."""
    found = getattr(cls, "__attrs_attrs__", None)
    return list(found) if isinstance(found, tuple) else None


def _is_pydantic(cls: type[Any]) -> bool:
    pydantic = sys.modules.get("pydantic")  # a model class means pydantic is imported
    base = getattr(pydantic, "BaseModel", None)
    return isinstance(base, type) and issubclass(cls, base)


class Registry:
    """The classes a serializer may write and read, by name: enums, dataclasses,
    attrs classes and pydantic (v2) models."""

    __slots__ = ("by_name", "by_type")

    def __init__(self, types: Iterable[type[Any]] | Mapping[str, type[Any]]) -> None:
        # cast: isinstance() also narrows the Iterable arm to Mapping[type[Any], Unknown] (a
        # mapping is an iterable of its keys); a mapping given here is the name -> class form.
        pairs = (
            cast("Mapping[str, type[Any]]", types).items()
            if isinstance(types, Mapping)
            else ((None, t) for t in types)
        )
        self.by_name: dict[str, _Class] = {}
        self.by_type: dict[type[Any], _Class] = {}
        for given_name, cls in pairs:
            if not isinstance(cls, type):
                raise TypeError(f"types must hold classes, got {cls!r}")
            entry = _describe(given_name or _qualified(cls), cls)
            if not entry.name or entry.name in self.by_name or cls in self.by_type:
                raise ValueError(f"{cls.__qualname__}: registered twice or under a used name")
            self.by_name[entry.name] = self.by_type[cls] = entry


def _describe(name: str, cls: type[Any]) -> _Class:
    if issubclass(cls, enum.Enum):
        return _Class(name, cls, _ENUM, flag=issubclass(cls, enum.Flag))
    if dataclasses.is_dataclass(cls):
        return _Class(name, cls, _DATACLASS, tuple(f.name for f in dataclasses.fields(cls)))
    attrs_fields = _attrs_fields(cls)
    if attrs_fields is not None:
        taken = [f for f in attrs_fields if f.init]
        return _Class(
            name,
            cls,
            _ATTRS,
            tuple(f.name for f in taken),
            tuple(getattr(f, "alias", None) or f.name.lstrip("_") for f in taken),
        )
    if _is_pydantic(cls):
        return _Class(name, cls, _PYDANTIC)
    raise TypeError(
        f"{cls.__qualname__} is not an Enum, a dataclass, an attrs class or a pydantic model"
    )


# -- writing -------------------------------------------------------------------------


class _Encoder:
    """One payload's writer: msgpack packers (one per extension depth, each calling
    back ``default``), and the classes brought in so far. Pooled per serializer, so
    a call made while another is packing (a finalizer, a signal handler) gets its own."""

    __slots__ = ("classes", "depth", "named", "packers", "registry")

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.packers: list[Any] = [self._packer(4096)]
        self.classes: dict[type[Any], int] = {}  # class -> its number, once named
        self.named = 0  # classes named so far (a class named twice counts twice)
        self.depth = 0

    def _packer(self, size: int = 512) -> Any:
        """A packer whose buffer starts at ``size`` bytes (msgpack's default, 256 KiB,
        is malloc'ed per packer) and grows as a value needs."""
        return msgpack.Packer(
            default=self.default,
            strict_types=True,
            use_bin_type=True,
            unicode_errors="surrogatepass",
            datetime=False,
            buf_size=size,
        )

    def pack(self, value: Any) -> bytes:
        self.classes.clear()
        self.named = self.depth = 0
        data: bytes = self.packers[0].pack(value)
        return data

    def nested(self, value: Any) -> bytes:
        """``value`` packed one extension level down, on that level's packer."""
        depth = self.depth + 1
        if depth > MAX_DEPTH:
            raise FormatError(f"nested deeper than {MAX_DEPTH} levels (or a cycle)")
        if depth == len(self.packers):
            self.packers.append(self._packer())
        self.depth = depth
        try:
            data: bytes = self.packers[depth].pack(value)
        finally:
            self.depth = depth - 1
        return data

    def default(self, v: Any) -> msgpack.ExtType:
        t = type(v)
        if t is tuple:
            return _ext((_TUPLE, self.nested(list(v))))
        if t is datetime.datetime:
            head = _DATETIME_HEAD.pack(
                v.year, v.month, v.day, v.hour, v.minute, v.second, v.microsecond, v.fold
            )
            return _ext((_DATETIME, head + _zone(v.tzinfo)))
        if t is decimal.Decimal:
            return _ext((_DECIMAL_CODE, str(v).encode("ascii")))
        if t is uuid.UUID:
            return _ext((_UUID, v.bytes))
        if t is set or t is frozenset:
            return _ext((_SET if t is set else _FROZENSET, self.nested(list(v))))
        if t is int:  # past 64 bits: msgpack calls back on overflow
            size = (v if v >= 0 else ~v).bit_length() // 8 + 1
            return _ext((_BIGINT, v.to_bytes(size, "little", signed=True)))
        if t is datetime.date:
            return _ext((_DATE_CODE, _DATE.pack(v.year, v.month, v.day)))
        if t is datetime.time:
            body = _TIME.pack(v.hour, v.minute, v.second, v.microsecond, v.fold)
            return _ext((_TIME_CODE, body + _zone(v.tzinfo)))
        if t is datetime.timedelta:
            return _ext((_TIMEDELTA, _DELTA.pack(v.days, v.seconds, v.microseconds)))
        return self.registered(v)

    def registered(self, v: Any) -> msgpack.ExtType:
        t = type(v)
        entry = self.registry.by_type.get(t)
        if entry is None:
            raise FormatError(_unsupported(t))
        index = self.classes.get(t)
        head: list[Any]
        if index is None:  # its first use in this payload: named
            head = [entry.name, list(entry.fields)] if entry.fields else [entry.name]
        else:
            head = [index]
        if entry.code == _ENUM:
            head.append(v.value if entry.flag else v.name)
        elif entry.code == _PYDANTIC:
            head.append(v.model_dump_json(by_alias=True, round_trip=True).encode())
        else:
            head.extend(getattr(v, field) for field in entry.fields)
        body = self.nested(head)  # classes used inside are numbered first, as when read
        if index is None:
            self.classes[t] = self.named
            self.named += 1
        return _ext((entry.code, body))


def _unsupported(t: type[Any]) -> str:
    if _registrable(t):
        return f"cannot serialize a {_qualified(t)}: not registered; {_register_hint(t)}"
    return (
        f"cannot serialize a {_qualified(t)}: DataSerializer stores {_SUPPORTED}; "
        "for other values pass serializer=PickleSerializer(secret=...) (signed pickle)"
    )


def _registrable(t: type[Any]) -> bool:
    """Whether ``Registry`` would take ``t`` (``_describe`` decides)."""
    try:
        _describe("", t)
    except TypeError:
        return False
    return True


def _zone(tz: datetime.tzinfo | None) -> bytes:
    if tz is None:
        return b"\x00"
    if type(tz) is datetime.timezone:
        args = tz.__getinitargs__()  # type: ignore[attr-defined]  # (offset[, name]), for pickle
        offset = tz.utcoffset(None)
        body = _DELTA.pack(offset.days, offset.seconds, offset.microseconds)
        if len(args) == 1:
            return b"\x01" + body
        return b"\x02" + body + _utf8_bytes(args[1])
    if type(tz) is zoneinfo.ZoneInfo and tz.key and _ZONE_KEY.fullmatch(tz.key):
        return b"\x03" + tz.key.encode("ascii")
    raise FormatError(
        f"cannot serialize tzinfo {tz!r}: DataSerializer stores datetime.timezone "
        "and zoneinfo.ZoneInfo (by key); use PickleSerializer(secret=...) for others"
    )


def _utf8_bytes(text: str) -> bytes:
    try:
        return text.encode()
    except UnicodeEncodeError:  # lone surrogates
        return text.encode("utf-8", "surrogatepass")


# -- reading -------------------------------------------------------------------------


class _Extended(Exception):
    """A payload holds an extension: it is read again by a ``_Decoder``."""


def _no_extension(code: int, data: bytes) -> Any:
    raise _Extended


class _Rechecked(Exception):
    """A map with keys other than str or bytes: the payload is read again, checked."""


def _unpack_unchecked(data: bytes | memoryview, ext_hook: Callable[[int, bytes], Any]) -> Any:
    """msgpack's C reader with str-keyed maps; ``_Rechecked`` for any other map key."""
    try:
        return msgpack.unpackb(data, ext_hook=ext_hook, unicode_errors="surrogatepass", timestamp=1)
    except ValueError as exc:
        if "map key" in str(exc) and not isinstance(exc, FormatError):
            raise _Rechecked from exc
        raise


class _Decoder:
    """One payload's reader: the extension hook, its depth, the classes brought in."""

    __slots__ = ("checked", "classes", "depth", "registry")

    def __init__(self, registry: Registry, checked: bool) -> None:
        self.registry = registry
        self.checked = checked  # maps go through _pairs (keys other than str seen)
        self.classes: list[_Class] = []
        self.depth = 0

    def unpack(self, data: bytes | memoryview) -> Any:
        if self.checked:
            return msgpack.unpackb(
                data,
                ext_hook=self.ext,
                object_pairs_hook=_pairs,
                strict_map_key=False,
                unicode_errors="surrogatepass",
                timestamp=1,
            )
        return _unpack_unchecked(data, self.ext)

    def items(self, data: bytes) -> list[Any]:
        """An extension's body: a msgpack array, one extension level down."""
        depth = self.depth + 1
        if depth > MAX_DEPTH:
            raise FormatError(f"nested deeper than {MAX_DEPTH} levels")
        self.depth = depth
        try:
            items = self.unpack(data)
        finally:
            self.depth = depth - 1
        if type(items) is not list:
            raise FormatError("malformed payload (an extension's items are not an array)")
        return items

    def ext(self, code: int, data: bytes) -> Any:
        """msgpack's ext_hook: the commonest types inline, the others by table."""
        try:
            if code == _TUPLE:
                return tuple(self.items(data))
            if code == _DATETIME:
                year, month, day, hour, minute, second, micro, fold = _DATETIME_HEAD.unpack_from(
                    data
                )
                zone = data[_DATETIME_HEAD.size :]
                tz = _UTC if zone == _UTC_ZONE else _read_zone(zone)
                return datetime.datetime(
                    year, month, day, hour, minute, second, micro, tz, fold=fold
                )
            if code == _UUID:
                if len(data) != 16:
                    raise FormatError("malformed UUID")
                value = _new(uuid.UUID)  # as pickle rebuilds one: no __init__ to run
                _setattr(value, "int", int.from_bytes(data, "big"))
                _setattr(value, "is_safe", _UUID_SAFETY)
                return value
            if code == _DECIMAL_CODE:
                return _decimal(data)
            decoder = _DECODERS.get(code)
            if decoder is None:
                raise FormatError(f"unknown extension type {code}")
            return decoder(self, data)
        except FormatError:
            raise
        except (ValueError, OverflowError, TypeError, struct.error) as exc:
            # a constructor refusing its fields (Feb 29th, fold 2, ...): malformed
            raise FormatError(f"malformed payload ({type(exc).__name__})") from exc

    def registered(self, code: int, data: bytes) -> Any:
        body = self.items(data)  # classes used inside are numbered first, as when written
        ref = body[0] if body else None
        start = 1
        if type(ref) is str:
            entry = self.registry.by_name.get(ref)
            if entry is None:
                raise FormatError(f"type {ref!r} is not registered with this DataSerializer")
            if code != entry.code:
                raise FormatError(f"{ref!r} is not {_KINDS[code]}")
            if entry.fields:
                if len(body) < 2 or body[1] != list(entry.fields):
                    raise FormatError(f"the fields of {ref!r} changed since it was written")
                start = 2
            self.classes.append(entry)
        elif type(ref) is int and 0 <= ref < len(self.classes):
            entry = self.classes[ref]
            if code != entry.code:
                raise FormatError(f"{entry.name!r} is not {_KINDS[code]}")
        else:
            raise FormatError("malformed class reference")
        values = body[start:]
        if entry.code == _ENUM:
            return _member(entry, values)
        if entry.code == _PYDANTIC:
            return _model(entry, values)
        if len(values) != len(entry.fields):
            raise FormatError(f"malformed {entry.name!r}: {len(values)} field values")
        if entry.code == _DATACLASS:
            obj = _new(entry.cls)  # no __init__, no __post_init__
            for field, value in zip(entry.fields, values, strict=True):
                _setattr(obj, field, value)  # frozen ones too
            return obj
        try:
            return entry.cls(**dict(zip(entry.args, values, strict=True)))
        except Exception as exc:  # the class's own checks refused the values
            raise FormatError(f"{entry.name!r} refused the stored values: {exc!r}") from exc


_new = object.__new__
_setattr = object.__setattr__
_UUID_SAFETY = uuid.SafeUUID.unknown


_KINDS = {
    _ENUM: "an enum",
    _DATACLASS: "a dataclass",
    _ATTRS: "an attrs class",
    _PYDANTIC: "a pydantic model",
}


def _member(entry: _Class, values: list[Any]) -> Any:
    if len(values) != 1:
        raise FormatError(f"malformed member of {entry.name!r}")
    try:
        if entry.flag:
            return entry.cls(values[0])
        name = values[0]
        if type(name) is not str:
            raise TypeError("a member name is a str")
        # cast: an enum entry's class is an Enum subclass (see _describe).
        return cast("type[enum.Enum]", entry.cls)[name]
    except (KeyError, ValueError, TypeError) as exc:
        raise FormatError(f"no such member of {entry.name!r}") from exc


def _model(entry: _Class, values: list[Any]) -> Any:
    if len(values) != 1 or type(values[0]) is not bytes:
        raise FormatError(f"malformed {entry.name!r}")
    try:
        return entry.cls.model_validate_json(values[0])
    except Exception as exc:  # pydantic's ValidationError: the model changed, or forged data
        raise FormatError(f"{entry.name!r} refused the stored data: {exc!r}") from exc


def _pairs(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    """A map read with keys other than str: checked for flooding before it is built."""
    _check_hashes([key for key, _ in pairs])
    result = dict(pairs)
    if len(result) != len(pairs):
        raise FormatError("duplicate dict keys")
    return result


def _check_hashes(keys: list[Any]) -> None:
    """Refuse unhashable keys, and more than ``MAX_SAME_HASH`` keys sharing a hash.

    str hashes are randomised per process; int, float and tuple ones are not,
    so an attacker can make many keys collide and building the dict quadratic.
    """
    try:
        hashes = [hash(key) for key in keys]
    except TypeError as exc:
        raise FormatError("unhashable dict key or set item") from exc
    if len(set(hashes)) == len(hashes):
        return
    counts: dict[int, int] = {}
    for h in hashes:
        seen = counts[h] = counts.get(h, 0) + 1
        if seen > MAX_SAME_HASH:
            raise FormatError("too many keys share one hash (hash flooding)")


def _set(d: _Decoder, data: bytes) -> set[Any]:
    items = d.items(data)
    _check_hashes(items)
    result = set(items)
    if len(result) != len(items):
        raise FormatError("duplicate set items")
    return result


def _bigint(d: _Decoder, data: bytes) -> int:
    if not data:
        raise FormatError("malformed int")
    return int.from_bytes(data, "little", signed=True)


def _decimal(data: bytes) -> decimal.Decimal:
    """A Decimal from the text ``str()`` gave it: read back, it must give that text again
    (which refuses spaces, underscores, a bad exponent turned NaN, and any other text)."""
    try:
        text = data.decode("ascii")
        result = decimal.Decimal(text)
    except (UnicodeDecodeError, ArithmeticError, ValueError) as exc:
        raise FormatError("malformed Decimal") from exc
    if str(result) != text:
        raise FormatError("malformed Decimal (not as str() writes it)")
    return result


def _read_zone(data: bytes) -> datetime.tzinfo | None:
    kind = data[:1]
    if kind == b"\x00" and len(data) == 1:
        return None
    if kind in (b"\x01", b"\x02") and len(data) >= 1 + _DELTA.size:
        offset = datetime.timedelta(*_DELTA.unpack_from(data, 1))
        if kind == b"\x01":
            if len(data) != 1 + _DELTA.size:
                raise FormatError("malformed time zone")
            return datetime.timezone(offset)
        name = data[1 + _DELTA.size :]
        try:
            text = name.decode("utf-8", "surrogatepass")
        except UnicodeDecodeError as exc:
            raise FormatError("malformed time zone") from exc
        return datetime.timezone(offset, text)
    if kind == b"\x03":
        key = data[1:].decode("ascii", "replace")
        if not _ZONE_KEY.fullmatch(key):
            raise FormatError("malformed time zone")
        if not _zone_known(key):
            # Checked against the zone list first: ZoneInfo falls back to the
            # tzdata package, importing a subpackage named after the key.
            raise FormatError(f"unknown time zone {key!r}")
        try:
            return zoneinfo.ZoneInfo(key)
        except Exception as exc:  # ZoneInfoNotFoundError, a file that is not TZif
            raise FormatError(f"unknown time zone {key!r}") from exc
    raise FormatError("malformed time zone")


def _date(d: _Decoder, data: bytes) -> datetime.date:
    return datetime.date(*_DATE.unpack(data))


def _time(d: _Decoder, data: bytes) -> datetime.time:
    hour, minute, second, micro, fold = _TIME.unpack_from(data)
    tz = _read_zone(data[_TIME.size :])
    return datetime.time(hour, minute, second, micro, tz, fold=fold)


_UTC_ZONE = _zone(_UTC)

_DECODERS: dict[int, Callable[[_Decoder, bytes], Any]] = {  # the others: _Decoder.ext
    _SET: _set,
    _FROZENSET: lambda d, data: frozenset(_set(d, data)),
    _BIGINT: _bigint,
    _DATE_CODE: _date,
    _TIME_CODE: _time,
    _TIMEDELTA: lambda d, data: datetime.timedelta(*_DELTA.unpack(data)),
    _ENUM: lambda d, data: d.registered(_ENUM, data),
    _DATACLASS: lambda d, data: d.registered(_DATACLASS, data),
    _ATTRS: lambda d, data: d.registered(_ATTRS, data),
    _PYDANTIC: lambda d, data: d.registered(_PYDANTIC, data),
}


# -- the entry points -----------------------------------------------------------------


class Codec:
    """``encode`` and ``decode`` for one registry, with pools of encoders and decoders."""

    __slots__ = ("_free", "_readers", "registry")

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._free: list[_Encoder] = []  # taken and put back, so a call made meanwhile
        self._readers: list[_Decoder] = []  # (a finalizer, a signal) gets its own

    def encode(self, value: Any) -> bytes:
        """The payload of ``value``; raises ``FormatError`` for what it cannot write."""
        free = self._free
        encoder = free.pop() if free else _Encoder(self.registry)  # atomic under the GIL
        try:
            return _HEAD + encoder.pack(value)
        except FormatError:
            raise
        except (ValueError, RecursionError) as exc:  # msgpack's "recursion limit exceeded"
            if "recursion" in str(exc) or isinstance(exc, RecursionError):
                raise FormatError("value nested too deeply (or a cycle)") from exc
            raise FormatError(f"cannot serialize: {type(exc).__name__}: {exc}") from exc
        except TypeError as exc:  # msgpack: a type it cannot pack that default passed on
            raise FormatError(f"cannot serialize: {exc}") from exc
        except Exception as exc:  # a registered class misbehaving: not cacheable
            raise FormatError(f"cannot serialize: {type(exc).__name__}: {exc}") from exc
        finally:
            free.append(encoder)

    def decode(self, data: bytes) -> Any:
        """The value of a payload; raises ``FormatError`` (only) for anything malformed."""
        if data[:1] != _HEAD:
            raise FormatError("not a DataSerializer payload (unknown format byte)")
        body = data[1:] if len(data) < 4096 else memoryview(data)[1:]  # no big copy
        try:
            try:
                try:  # most payloads hold no extension: read them with no decoder state
                    return _unpack_unchecked(body, _no_extension)
                except _Extended:
                    pass  # read again, extensions and all
                free = self._readers
                decoder = free.pop() if free else _Decoder(self.registry, False)
                try:
                    return decoder.unpack(body)
                finally:
                    decoder.classes.clear()
                    decoder.depth = 0
                    free.append(decoder)
            except _Rechecked:  # a map with keys other than str or bytes: read again,
                return _Decoder(self.registry, True).unpack(body)  # checking each map
        except FormatError:
            raise
        except msgpack.ExtraData as exc:
            raise FormatError("malformed payload (trailing bytes)") from exc
        except msgpack.StackError as exc:
            raise FormatError("malformed payload (nested deeper than msgpack reads)") from exc
        except RecursionError as exc:
            raise FormatError("payload nested too deeply for the interpreter stack") from exc
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            # msgpack's FormatError (bad bytes), truncation, a UnicodeDecodeError,
            # an unhashable key, ...: the details are in __cause__
            raise FormatError(f"malformed payload ({type(exc).__name__})") from exc
        except Exception as exc:  # a gap in the checks above, or a registered class's error
            raise FormatError(f"malformed payload (unexpected {type(exc).__name__})") from exc


_HEAD = bytes((FORMAT,))

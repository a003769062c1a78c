"""The data-only binary format behind ``DataSerializer``.

A payload is one format byte (``FORMAT``, now 1) and exactly one value; a
later release changes the byte to change the format. Each value is a one-byte
ASCII tag and a body. ``n`` is an unsigned LEB128 varint (at most 10 bytes)
giving a length or a count; fixed-width fields are big-endian.

    tag  type               body
    N    None               -
    T F  True, False        -
    i    int                n, n bytes: two's complement, little-endian (any size)
    f    float              8 bytes IEEE 754 binary64: nan payloads, inf, -0.0 kept
    c    Decimal            n, n bytes: ASCII of str(d) (sign, exponent, NaN, sNaN kept)
    s    str                n, n bytes: UTF-8 with surrogatepass (lone surrogates kept)
    b y  bytes, bytearray   n, n bytes
    l t  list, tuple        n, n values
    e z  set, frozenset     n, n values
    d    dict               n, n pairs key value, in insertion order
    a    date               year:u16 month:u8 day:u8
    h    time               hour:u8 minute:u8 second:u8 microsecond:u32 fold:u8, zone
    D    datetime           the date body, the time body, zone
    r    timedelta          days:i32 seconds:u32 microseconds:u32
    u    UUID               16 bytes
    E    enum member        class, then the member name (n, UTF-8); for Flag classes
                            the member's value as a value instead, so A|B works
    C    dataclass          class, then one value per field, in field order

    zone   0 naive | 1 timezone: offset as a timedelta body | 2 the same, then its
           name (n, UTF-8) | 3 ZoneInfo: its key (n, ASCII)
    class  n; 0 brings in a class: its registered name (n, UTF-8) and, for a
           dataclass, n field names (n, UTF-8 each), which must be the class's
           fields now; k > 0 is the k-th class brought in earlier in the payload

Reading runs no code chosen by the payload and imports nothing: tags map to
built-in constructors, and enum and dataclass payloads name a class that
must be in the registry (an allowlist the application built). Dataclasses are
rebuilt with ``object.__new__`` and their declared fields only, so
``__init__`` and ``__post_init__`` do not run. A ZoneInfo is stored by key,
as pickle stores it, and read with ``zoneinfo.ZoneInfo(key)`` after a strict
name check (ASCII letters, digits, ``_+-`` and ``/``: no dots, no absolute
paths), which reads a TZif data file of the host's tz database (or, on a host
without one, a data resource of the installed ``tzdata`` package).

Work is bounded by the payload size: a declared length or count larger than
the bytes left is rejected before anything is allocated, containers nest at
most ``MAX_DEPTH`` deep, and a dict or set in which more than
``MAX_SAME_HASH`` keys share one hash is rejected (ints are easy to make
collide, which would make building the dict quadratic). Shared references
are not kept: an object reached twice comes back as two equal copies, and a
cycle is refused on write (it nests too deep).
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
import uuid
import zoneinfo
from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast

FORMAT = 1
MAX_DEPTH = 100  # containers, enums and dataclasses nested in one another
MAX_SAME_HASH = 32  # keys of one dict or set that may share a hash value

_DATE = struct.Struct(">HBB")
_TIME = struct.Struct(">BBBIB")
_DELTA = struct.Struct(">iII")
_FLOAT = struct.Struct(">d")


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
_DECIMAL = re.compile(r"[+-]?(?:(?:\d+\.?\d*|\.\d+)(?:E[+-]?\d+)?|Infinity|s?NaN\d*)")
_REGISTER_HINT = "register it with DataSerializer(types=[...]) or use PickleSerializer"


class FormatError(ValueError):
    """A value this format cannot write, or bytes that are not a valid payload."""


@dataclasses.dataclass(frozen=True)
class _Class:
    name: str
    cls: type[Any]
    fields: tuple[str, ...] | None  # None for an enum
    flag: bool = False


class Registry:
    """The enum and dataclass types a serializer may write and read, by name."""

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
            name = given_name or f"{cls.__module__}.{cls.__qualname__}"
            if issubclass(cls, enum.Enum):
                entry = _Class(name, cls, None, issubclass(cls, enum.Flag))
            elif dataclasses.is_dataclass(cls):
                entry = _Class(name, cls, tuple(f.name for f in dataclasses.fields(cls)))
            else:
                raise TypeError(f"{cls.__qualname__} is neither an Enum nor a dataclass")
            if not name or name in self.by_name or cls in self.by_type:
                raise ValueError(f"{cls.__qualname__}: registered twice or under a used name")
            self.by_name[name] = self.by_type[cls] = entry


def encode(value: Any, registry: Registry) -> bytes:
    """The payload of ``value``; raises ``FormatError`` for what it cannot write."""
    writer = _Writer(registry)
    try:
        writer.value(value, 0)
    except FormatError:
        raise
    except RecursionError as exc:
        raise FormatError("value nested too deeply for the interpreter stack") from exc
    except Exception as exc:  # a registered class misbehaving: not cacheable
        raise FormatError(f"cannot serialize: {type(exc).__name__}: {exc}") from exc
    return bytes(writer.out)


def decode(data: bytes, registry: Registry) -> Any:
    """The value of a payload; raises ``FormatError`` (only) for anything malformed."""
    if not data or data[0] != FORMAT:
        raise FormatError("not a DataSerializer payload (unknown format byte)")
    reader = _Reader(data, registry)
    try:
        value = reader.value(0)
    except FormatError:
        raise
    except RecursionError as exc:
        raise FormatError("payload nested too deeply for the interpreter stack") from exc
    except Exception as exc:  # a gap in the checks below, or a registered class's own error
        raise FormatError(f"malformed payload (unexpected {type(exc).__name__})") from exc
    if reader.pos != len(data):
        raise FormatError("malformed payload (trailing bytes)")
    return value


class _Writer:
    __slots__ = ("classes", "out", "registry")

    def __init__(self, registry: Registry) -> None:
        self.out = bytearray((FORMAT,))
        self.registry = registry
        self.classes: dict[type[Any], int] = {}

    def n(self, n: int) -> None:
        out = self.out
        while n > 0x7F:
            out.append((n & 0x7F) | 0x80)
            n >>= 7
        out.append(n)

    def raw(self, tag: bytes, data: bytes) -> None:
        self.out += tag
        self.n(len(data))
        self.out += data

    def value(self, v: Any, depth: int) -> None:
        t = type(v)
        out = self.out
        if t is str:
            self.raw(b"s", _utf8_bytes(v))
        elif v is None:
            out += b"N"
        elif t is bool:
            out += b"T" if v else b"F"
        elif t is int:
            if -128 <= v < 128:
                out += b"i\x01"
                out.append(v & 0xFF)
                return
            size = (v if v >= 0 else ~v).bit_length() // 8 + 1
            self.raw(b"i", v.to_bytes(size, "little", signed=True))
        elif t is float:
            out += b"f"
            out += _FLOAT.pack(v)
        elif t in _SEQUENCES:
            depth = _deeper(depth)
            out += _SEQUENCES[t]
            self.n(len(v))
            for item in v:
                self.value(item, depth)
        elif t is dict:
            depth = _deeper(depth)
            out += b"d"
            self.n(len(v))
            for key, item in v.items():
                self.value(key, depth)
                self.value(item, depth)
        elif t is bytes or t is bytearray:
            self.raw(b"b" if t is bytes else b"y", v)
        elif t is datetime.datetime:
            out += b"D"
            out += _DATE.pack(v.year, v.month, v.day)
            self.clock(v)
        elif t is datetime.date:
            out += b"a"
            out += _DATE.pack(v.year, v.month, v.day)
        elif t is datetime.time:
            out += b"h"
            self.clock(v)
        elif t is datetime.timedelta:
            out += b"r"
            out += _DELTA.pack(v.days, v.seconds, v.microseconds)
        elif t is decimal.Decimal:
            self.raw(b"c", str(v).encode("ascii"))
        elif t is uuid.UUID:
            out += b"u"
            out += v.bytes
        else:
            self.registered(v, depth)

    def clock(self, v: datetime.time | datetime.datetime) -> None:
        self.out += _TIME.pack(v.hour, v.minute, v.second, v.microsecond, v.fold)
        tz = v.tzinfo
        if tz is None:
            self.out.append(0)
        elif type(tz) is datetime.timezone:
            args = tz.__getinitargs__()  # type: ignore[attr-defined]  # (offset[, name]), for pickle
            offset = tz.utcoffset(None)
            self.out.append(1 if len(args) == 1 else 2)
            self.out += _DELTA.pack(offset.days, offset.seconds, offset.microseconds)
            if len(args) > 1:
                self.raw(b"", _utf8_bytes(args[1]))
        elif type(tz) is zoneinfo.ZoneInfo and tz.key and _ZONE_KEY.fullmatch(tz.key):
            self.out.append(3)
            self.n(len(tz.key))
            self.out += tz.key.encode("ascii")
        else:
            raise FormatError(
                f"cannot serialize tzinfo {tz!r}: DataSerializer stores datetime.timezone "
                "and zoneinfo.ZoneInfo (by key); use PickleSerializer for others"
            )

    def registered(self, v: Any, depth: int) -> None:
        t = type(v)
        entry = self.registry.by_type.get(t)
        if entry is None:
            kind = "enum" if isinstance(v, enum.Enum) else "dataclass"
            if kind == "enum" or (dataclasses.is_dataclass(v) and not isinstance(v, type)):
                raise FormatError(f"{kind} {t.__qualname__} is not registered: {_REGISTER_HINT}")
            raise FormatError(
                f"cannot serialize a {t.__module__}.{t.__qualname__}: DataSerializer stores "
                "None, bool, int, float, str, bytes, bytearray, list, tuple, dict, set, "
                "frozenset, date, time, datetime, timedelta, Decimal, UUID, and registered "
                f"enums and dataclasses; {_REGISTER_HINT}"
            )
        depth = _deeper(depth)
        self.out += b"E" if entry.fields is None else b"C"
        index = self.classes.get(t)
        if index is not None:
            self.n(index)
        else:
            self.classes[t] = len(self.classes) + 1
            self.n(0)
            self.raw(b"", _utf8_bytes(entry.name))
            if entry.fields is not None:
                self.n(len(entry.fields))
                for field in entry.fields:
                    self.raw(b"", _utf8_bytes(field))
        if entry.fields is not None:
            for field in entry.fields:
                self.value(getattr(v, field), depth)
        elif entry.flag:
            self.value(v.value, depth)
        else:
            self.raw(b"", _utf8_bytes(v.name))


_SEQUENCES: dict[type[Any], bytes] = {list: b"l", tuple: b"t", set: b"e", frozenset: b"z"}


def _deeper(depth: int) -> int:
    if depth >= MAX_DEPTH:
        raise FormatError(f"nested deeper than {MAX_DEPTH} levels (or a cycle)")
    return depth + 1


class _Reader:
    __slots__ = ("classes", "data", "pos", "registry")

    def __init__(self, data: bytes, registry: Registry) -> None:
        self.data = data
        self.pos = 1
        self.registry = registry
        self.classes: list[_Class] = []

    def take(self, size: int) -> bytes:
        start = self.pos
        if start + size > len(self.data):
            raise FormatError("truncated payload")
        self.pos = start + size
        return self.data[start : self.pos]

    def varint(self) -> int:
        data, pos, result, shift = self.data, self.pos, 0, 0
        while True:
            if pos >= len(data):
                raise FormatError("truncated payload")
            byte = data[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            if byte < 0x80:
                self.pos = pos
                return result
            shift += 7
            if shift >= 70:
                raise FormatError("malformed length")

    def n(self, per_item: int = 1) -> int:
        """A length or count, at most the number of bytes left (``per_item`` each)."""
        data, pos = self.data, self.pos
        if pos < len(data) and data[pos] < 0x80:  # one byte: the usual case
            result = data[pos]
            self.pos = pos + 1
        else:
            result = self.varint()
        left = len(data) - self.pos
        if result * per_item > left:
            raise FormatError(f"declared length {result} exceeds the {left} bytes left")
        return result

    def text(self) -> str:
        size = self.n()
        start = self.pos
        self.pos = start + size
        return _utf8(self.data[start : self.pos])

    def value(self, depth: int) -> Any:
        data, pos = self.data, self.pos
        if pos >= len(data):
            raise FormatError("truncated payload")
        tag = data[pos]
        self.pos = pos + 1
        if tag == 0x73 or tag == 0x69:  # s, i: the common case inline, one call less
            pos += 1
            if pos < len(data) and data[pos] < 0x80:
                size = data[pos]
                pos += 1
            else:
                size = self.n()
                pos = self.pos
            stop = pos + size
            if stop > len(data):
                raise FormatError(
                    f"declared length {size} exceeds the {len(data) - pos} bytes left"
                )
            self.pos = stop
            if tag == 0x69:
                if size == 1:
                    byte = data[pos]
                    return byte - 256 if byte > 127 else byte
                return int.from_bytes(data[pos:stop], "little", signed=True)
            return _utf8(data[pos:stop])
        if tag == 0x64:  # d
            return self.read_dict(depth)
        if tag == 0x6C:  # l
            return self.items(depth)
        if tag == 0x4E:  # N
            return None
        if tag == 0x66:  # f
            if pos + 9 > len(data):
                raise FormatError("truncated payload")
            self.pos = pos + 9
            return _FLOAT.unpack_from(data, pos + 1)[0]
        decoder = _DECODERS.get(tag)
        if decoder is None:
            raise FormatError(f"unknown tag {tag:#04x}")
        return decoder(self, depth)

    def items(self, depth: int) -> list[Any]:
        depth = _deeper(depth)
        value = self.value
        return [value(depth) for _ in range(self.n())]

    def read_set(self, depth: int) -> set[Any]:
        items = self.items(depth)
        counts: dict[int, int] = {}
        for item in items:
            if type(item) is not str:
                _count_hash(counts, item)
        result = set(items)
        if len(result) != len(items):
            raise FormatError("duplicate set items")
        return result

    def read_dict(self, depth: int) -> dict[Any, Any]:
        depth = _deeper(depth)
        count = self.n(2)
        value = self.value
        counts: dict[int, int] = {}
        result = {}
        for _ in range(count):
            key = value(depth)
            if type(key) is not str:
                _count_hash(counts, key)  # before the key goes in
            result[key] = value(depth)
        if len(result) != count:
            raise FormatError("duplicate dict keys")
        return result

    def clock(self) -> tuple[int, int, int, int, int, datetime.tzinfo | None]:
        hour, minute, second, micro, fold = _TIME.unpack(self.take(_TIME.size))
        kind = self.take(1)[0]
        if kind == 0:
            return hour, minute, second, micro, fold, None
        if kind in (1, 2):
            offset = datetime.timedelta(*_DELTA.unpack(self.take(_DELTA.size)))
            if kind == 1:
                return hour, minute, second, micro, fold, datetime.timezone(offset)
            return hour, minute, second, micro, fold, datetime.timezone(offset, self.text())
        key = self.text() if kind == 3 else ""
        if not _ZONE_KEY.fullmatch(key):
            raise FormatError("malformed time zone")
        if not _zone_known(key):
            # Checked against the zone list first: ZoneInfo falls back to the
            # tzdata package, importing a subpackage named after the key.
            raise FormatError(f"unknown time zone {key!r}")
        try:
            return hour, minute, second, micro, fold, zoneinfo.ZoneInfo(key)
        except Exception as exc:  # ZoneInfoNotFoundError, a file that is not TZif
            raise FormatError(f"unknown time zone {key!r}") from exc

    def registered(self, enum_tag: bool) -> _Class:
        ref = self.varint()
        if ref == 0:
            name = self.text()
            entry = self.registry.by_name.get(name)
            if entry is None:
                raise FormatError(f"type {name!r} is not registered with this DataSerializer")
            if entry.fields is not None and not enum_tag:
                fields = tuple(self.text() for _ in range(self.n()))
                if fields != entry.fields:
                    raise FormatError(f"the fields of {name!r} changed since it was written")
            self.classes.append(entry)
        elif ref <= len(self.classes):
            entry = self.classes[ref - 1]
        else:
            raise FormatError("malformed class reference")
        if (entry.fields is None) != enum_tag:
            raise FormatError(f"{entry.name!r} is not {'an enum' if enum_tag else 'a dataclass'}")
        return entry

    def enum(self, depth: int) -> Any:
        entry = self.registered(True)
        try:
            if entry.flag:
                return entry.cls(self.value(_deeper(depth)))
            # cast: registered(True) returned an entry without fields, which only enums get.
            return cast("type[enum.Enum]", entry.cls)[self.text()]
        except (KeyError, ValueError, TypeError) as exc:
            raise FormatError(f"no such member of {entry.name!r}") from exc

    def dataclass(self, depth: int) -> Any:
        entry = self.registered(False)
        assert entry.fields is not None
        depth = _deeper(depth)
        obj = object.__new__(entry.cls)  # no __init__, no __post_init__
        for field in entry.fields:
            object.__setattr__(obj, field, self.value(depth))  # frozen ones too
        return obj


def _utf8(raw: bytes) -> str:
    try:
        return raw.decode()  # strict is twice as fast as naming an error handler
    except UnicodeDecodeError:
        pass
    try:
        return raw.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError as exc:
        raise FormatError("malformed UTF-8") from exc


def _utf8_bytes(text: str) -> bytes:
    try:
        return text.encode()
    except UnicodeEncodeError:  # lone surrogates
        return text.encode("utf-8", "surrogatepass")


def _count_hash(counts: dict[int, int], key: Any) -> None:
    """Count ``key``'s hash; refuse unhashable keys and hash flooding.

    str hashes are randomised per process; int, float and tuple ones are not,
    so an attacker can make many keys collide and building the dict quadratic.
    """
    try:
        h = hash(key)
    except TypeError as exc:
        raise FormatError("unhashable dict key or set item") from exc
    seen = counts[h] = counts.get(h, 0) + 1
    if seen > MAX_SAME_HASH:
        raise FormatError("too many keys share one hash (hash flooding)")


def _decimal(r: _Reader, depth: int) -> decimal.Decimal:
    try:
        text = r.take(r.n()).decode("ascii")
    except UnicodeDecodeError as exc:
        raise FormatError("malformed Decimal") from exc
    if not _DECIMAL.fullmatch(text):
        raise FormatError("malformed Decimal")
    try:
        result = decimal.Decimal(text)
    except ArithmeticError as exc:  # an exponent beyond the decimal module's range
        raise FormatError("malformed Decimal") from exc
    if result.is_nan() and "N" not in text:  # the same, when InvalidOperation is not trapped
        raise FormatError("malformed Decimal")
    return result


def _checked(build: Callable[[_Reader], Any]) -> Callable[[_Reader, int], Any]:
    """A decoder whose constructor's ValueError/OverflowError means a malformed payload."""

    def decoder(r: _Reader, depth: int) -> Any:
        try:
            return build(r)
        except (ValueError, OverflowError, TypeError) as exc:
            if isinstance(exc, FormatError):
                raise
            raise FormatError(f"malformed payload ({exc})") from exc

    return decoder


def _date(r: _Reader) -> datetime.date:
    return datetime.date(*_DATE.unpack(r.take(_DATE.size)))


def _datetime(r: _Reader) -> datetime.datetime:
    year, month, day = _DATE.unpack(r.take(_DATE.size))
    hour, minute, second, micro, fold, tz = r.clock()
    return datetime.datetime(year, month, day, hour, minute, second, micro, tz, fold=fold)


def _time(r: _Reader) -> datetime.time:
    hour, minute, second, micro, fold, tz = r.clock()
    return datetime.time(hour, minute, second, micro, tz, fold=fold)


_DECODERS: dict[int, Callable[[_Reader, int], Any]] = {
    ord("T"): lambda r, d: True,
    ord("F"): lambda r, d: False,
    ord("c"): _decimal,
    ord("b"): lambda r, d: r.take(r.n()),
    ord("y"): lambda r, d: bytearray(r.take(r.n())),
    ord("t"): lambda r, d: tuple(r.items(d)),
    ord("e"): _Reader.read_set,
    ord("z"): lambda r, d: frozenset(r.read_set(d)),
    ord("a"): _checked(_date),
    ord("h"): _checked(_time),
    ord("D"): _checked(_datetime),
    ord("r"): _checked(lambda r: datetime.timedelta(*_DELTA.unpack(r.take(_DELTA.size)))),
    ord("u"): lambda r, d: uuid.UUID(bytes=r.take(16)),
    ord("E"): _Reader.enum,
    ord("C"): _Reader.dataclass,
}

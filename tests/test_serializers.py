"""Serializers: exact round trips, and hostile bytes are a SerializationError, never more.

DataSerializer is checked against a type-exact equality (``same``): nan
equals nan, -0.0 is not 0.0, True is not 1, a tuple is not a list. Hostile
input (truncations, random bytes, mutations, bombs) must raise
``SerializationError`` and nothing else; the decoder's catch-all message
says "unexpected", so ``clean`` also fails when a check is missing and the
catch-all had to step in. PickleSerializer is checked to never unpickle
bytes whose signature does not hold, with a payload that would set a flag.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import decimal
import enum
import math
import pickle
import random
import struct
import sys
import uuid
import zoneinfo
from collections import OrderedDict
from typing import Any, NamedTuple

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stampede import StampedeError
from stampede._dataformat import MAX_DEPTH, MAX_SAME_HASH
from stampede.serializers import (
    DataSerializer,
    JsonSerializer,
    MsgpackSerializer,
    PickleSerializer,
    SerializationError,
    Serializer,
)

CTX = b"ns\0key"


class Color(enum.Enum):
    RED = "r"
    GREEN = ("g", 1)


class Perm(enum.Flag):
    R = 1
    W = 2
    X = 4


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


@dataclasses.dataclass(frozen=True)
class Point:
    x: Any
    y: Any = None

    def __post_init__(self) -> None:
        raise AssertionError("__post_init__ must not run on read")


@dataclasses.dataclass
class Box:
    items: Any
    label: str = "box"
    hidden: int = dataclasses.field(default=0, init=False)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise AssertionError("__init__ must not run on read")


@dataclasses.dataclass(frozen=True, slots=True)
class Slotted:
    a: Any
    b: Any


class Pair(NamedTuple):
    x: int


@dataclasses.dataclass
class Unregistered:
    a: int = 0


def point(x: Any, y: Any) -> Point:
    """A Point built like the decoder does, since its __post_init__ refuses to run."""
    p = object.__new__(Point)
    object.__setattr__(p, "x", x)
    object.__setattr__(p, "y", y)
    return p


def box(items: Any, label: str) -> Box:
    b = object.__new__(Box)
    b.items, b.label, b.hidden = items, label, 7
    return b


TYPES = [Color, Perm, Level, Point, Box, Slotted]
DATA = DataSerializer(types=TYPES)


def roundtrip(value: Any, serializer: Serializer = DATA) -> Any:
    return serializer.loads(serializer.dumps(value, context=CTX), context=CTX)


def float_bits(x: float) -> bytes:
    return struct.pack(">d", x)


def same(a: Any, b: Any) -> bool:
    """Type-exact, structure-exact equality (a bytearray reads back as bytes)."""
    if type(b) is bytearray:
        return type(a) is bytes and a == b
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return float_bits(a) == float_bits(b)
    if isinstance(a, decimal.Decimal):
        return bool(a.as_tuple() == b.as_tuple())
    if isinstance(a, (datetime.date, datetime.time, datetime.timedelta)):
        return repr(a) == repr(b)  # fields, fold, tzinfo (timezone name, ZoneInfo key)
    if isinstance(a, enum.Enum):
        return a is b
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, dict):
        return len(a) == len(b) and all(
            same(ka, kb) and same(va, vb)
            for (ka, va), (kb, vb) in zip(a.items(), b.items(), strict=True)
        )
    if isinstance(a, (set, frozenset)):
        left = list(b)
        for item in a:
            match = next((i for i, other in enumerate(left) if same(item, other)), None)
            if match is None:
                return False
            left.pop(match)
        return not left
    if dataclasses.is_dataclass(a):
        return all(same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    return bool(a == b)


def test_same_is_strict() -> None:
    assert not same(1, True) and not same((1,), [1]) and not same(0.0, -0.0)
    assert same(math.nan, math.nan) and not same({1}, frozenset({1}))
    assert not same(decimal.Decimal("1.0"), decimal.Decimal("1.00"))
    naive = datetime.datetime(2020, 1, 1)
    assert not same(naive, naive.replace(fold=1))
    assert not same(naive, naive.replace(tzinfo=datetime.timezone.utc))


def clean(exc: pytest.ExceptionInfo[SerializationError]) -> None:
    """The error came from an explicit check, not from the decoder's catch-all."""
    assert "unexpected" not in str(exc.value), exc.value


# Strategies ---------------------------------------------------------------

offsets = st.timedeltas(
    min_value=datetime.timedelta(hours=-24) + datetime.timedelta(microseconds=1),
    max_value=datetime.timedelta(hours=24) - datetime.timedelta(microseconds=1),
)
tzinfos = st.one_of(
    st.none(),
    st.timezones(),
    st.builds(datetime.timezone, offsets),
    st.builds(datetime.timezone, offsets, st.text(max_size=4)),
)
folds = st.integers(0, 1)
datetimes = st.builds(lambda d, f: d.replace(fold=f), st.datetimes(timezones=tzinfos), folds)
times = st.builds(lambda t, f: t.replace(fold=f), st.times(timezones=tzinfos), folds)
floats = st.floats() | st.sampled_from(
    [-0.0, math.inf, -math.inf, struct.unpack(">d", b"\x7f\xf8\x00\x00\x00\x00\x12\x34")[0]]
)
hashable_decimals = st.decimals(allow_nan=True, allow_infinity=True).filter(
    lambda d: not d.is_snan()  # hash(sNaN) raises
)
decimals = st.decimals(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [decimal.Decimal(s) for s in ("sNaN12", "-NaN", "-0E+3", "1.20E-7", "9" * 60)]
)
hashable_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(-(2**200), 2**200),
    floats,
    st.text(st.characters(exclude_categories=())),  # lone surrogates included
    st.binary(),
    st.dates(),
    datetimes,
    times,
    st.timedeltas(),
    hashable_decimals,
    st.uuids(),
    st.sampled_from(Color),
    st.sampled_from(Level),
    st.sampled_from([Perm.R, Perm.R | Perm.W, Perm(0)]),
)
hashables = st.recursive(
    hashable_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3).map(tuple),
        st.frozensets(inner, max_size=3),
        st.builds(point, inner, inner),
        st.builds(Slotted, inner, inner),
    ),
    max_leaves=6,
)
values = st.recursive(
    hashables | decimals | st.binary().map(bytearray),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=4).map(tuple),
        st.dictionaries(hashables, inner, max_size=4),
        st.sets(hashables, max_size=4),
        st.frozensets(hashables, max_size=4),
        st.builds(box, inner, st.text(max_size=3)),
        st.builds(point, inner, inner),
    ),
    max_leaves=16,
)


# DataSerializer: round trips -----------------------------------------------


@given(values)
def test_data_roundtrip_is_type_exact(value: Any) -> None:
    assert same(roundtrip(value), value)


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        False,
        0,
        -1,
        2**64,
        -(2**1000) - 1,
        math.nan,
        -0.0,
        math.inf,
        "",
        "\ud800\udc00 lone pair, not joined",
        "\udfff",
        b"",
        bytearray(b"\x00"),
        [1, (1,), {1}, frozenset({1}), {1: [1]}],
        {(1, "a"): 1, 1.5: 2, None: 3, b"k": 4, frozenset(): 5, -1: 6, -2: 7},
        decimal.Decimal("-sNaN123"),
        decimal.Decimal("-Infinity"),
        decimal.Decimal("1.000E+999999"),
        datetime.datetime.min,
        datetime.datetime.max.replace(tzinfo=datetime.timezone(datetime.timedelta(hours=-23))),
        datetime.datetime(2021, 10, 31, 2, 30, fold=1, tzinfo=zoneinfo.ZoneInfo("Europe/Paris")),
        datetime.time(23, 59, 59, 999999, datetime.timezone(datetime.timedelta(0), "Z")),
        datetime.time(tzinfo=datetime.timezone(datetime.timedelta(0), "UTC")),  # not the utc object
        datetime.time(tzinfo=datetime.timezone(datetime.timedelta(hours=1), "UTC+01:00")),
        datetime.timedelta.min,
        datetime.timedelta.max,
        uuid.UUID(int=0),
        Color.GREEN,
        Perm.R | Perm.X,
        Level.HIGH,
        [Color.RED, Color.RED, point(1, 2), point(1, 2), Slotted(1, [])],
    ],
)
def test_data_roundtrip_examples(value: Any) -> None:
    assert same(roundtrip(value), value)


def test_zoneinfo_roundtrips_to_the_same_zone() -> None:
    paris = zoneinfo.ZoneInfo("Europe/Paris")
    back = roundtrip(datetime.datetime(2024, 7, 1, 12, tzinfo=paris))
    assert back.tzinfo is paris  # ZoneInfo's own cache: the very same object
    assert back.utcoffset() == datetime.timedelta(hours=2)


def test_format_is_msgpack_compact_and_versioned() -> None:
    assert DATA.dumps(None, context=CTX) == b"\x02\xc0"
    assert DATA.dumps([1, "a"], context=CTX) == b"\x02\x92\x01\xa1a"
    many = DATA.dumps([point(1, 2)] * 50, context=CTX)
    assert many.count(b"Point") == 1 and len(many) < 50 * 9  # the class is named once
    with pytest.raises(SerializationError, match="format byte"):
        DATA.loads(b"\x01N", context=CTX)  # the format before msgpack: a miss


def test_context_is_ignored_and_bytes_likes_are_accepted() -> None:
    data = DATA.dumps([1], context=b"a")
    assert DATA.loads(memoryview(data), context=b"b") == [1]  # type: ignore[arg-type]
    with pytest.raises(SerializationError):
        DATA.loads("\x01N", context=CTX)  # type: ignore[arg-type]


# DataSerializer: registered classes ----------------------------------------


def test_dataclass_is_rebuilt_without_init_and_with_declared_fields_only() -> None:
    b = box([1], "x")
    b.extra = "not a field"  # type: ignore[attr-defined]
    back = roundtrip(b)
    assert type(back) is Box and back.items == [1] and back.label == "x" and back.hidden == 7
    assert not hasattr(back, "extra")
    p = roundtrip(point(Color.RED, (1,)))  # frozen, with a raising __post_init__
    assert same(p, point(Color.RED, (1,)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.x = 2
    assert same(roundtrip(Slotted(1, 2)), Slotted(1, 2))


@pytest.mark.parametrize("value", [Unregistered(), [Level.LOW], {"k": Perm.R}])
def test_unregistered_class_is_refused_on_write(value: Any) -> None:
    with pytest.raises(SerializationError, match=r"not registered.*types=.*PickleSerializer"):
        DataSerializer(types=[Color]).dumps(value, context=CTX)


@pytest.mark.parametrize("value", [Unregistered(), Level.LOW, [Perm.W]])
def test_unregistered_class_is_refused_on_read(value: Any) -> None:
    data = DataSerializer(types=[Unregistered, Level, Perm]).dumps(value, context=CTX)
    with pytest.raises(SerializationError, match="not registered") as exc:
        DataSerializer(types=[Color]).loads(data, context=CTX)
    clean(exc)


def test_payload_naming_any_class_imports_nothing() -> None:
    for code in (12, 13, 14, 15):
        data = payload(ext(code, ["antigravity.Thing", ["a"], 1]))
        assert "antigravity" not in sys.modules
        with pytest.raises(SerializationError, match="not registered") as exc:
            DATA.loads(data, context=CTX)
        clean(exc)
    assert "antigravity" not in sys.modules


def test_changed_fields_and_unknown_members_are_refused() -> None:
    @dataclasses.dataclass
    class V1:
        a: int

    @dataclasses.dataclass
    class V2:
        a: int
        b: int = 0

    old = DataSerializer(types={"thing": V1}).dumps(V1(1), context=CTX)
    with pytest.raises(SerializationError, match="fields"):
        DataSerializer(types={"thing": V2}).loads(old, context=CTX)

    class Color2(enum.Enum):
        RED = 1

    blue = DataSerializer(types={"c": Color}).dumps(Color.GREEN, context=CTX)
    with pytest.raises(SerializationError, match="member") as exc:
        DataSerializer(types={"c": Color2}).loads(blue, context=CTX)
    clean(exc)
    as_dataclass = DataSerializer(types={"c": V1}).dumps(V1(1), context=CTX)
    with pytest.raises(SerializationError, match="not a dataclass"):
        DataSerializer(types={"c": Color}).loads(as_dataclass, context=CTX)


def test_registry_is_checked() -> None:
    with pytest.raises(TypeError):
        DataSerializer(types=[int])
    with pytest.raises(TypeError):
        DataSerializer(types=[Color.RED])  # type: ignore[list-item]
    with pytest.raises(ValueError):
        DataSerializer(types=[Color, Color])
    with pytest.raises(ValueError):
        DataSerializer(types={"a": Color, "b": Color})
    assert "Color" in repr(DATA)


@pytest.mark.parametrize(
    "value",
    [
        object(),
        OrderedDict(a=1),
        Pair(1),
        True.__class__.__mro__,  # a tuple of types
        datetime.datetime(2020, 1, 1, tzinfo=type("TZ", (datetime.tzinfo,), {})()),
        [lambda: 1],
        Unregistered,
    ],
)
def test_unsupported_values_are_refused_on_write(value: Any) -> None:
    with pytest.raises(SerializationError, match="PickleSerializer"):
        DATA.dumps(value, context=CTX)


def test_nesting_limit_and_cycles_on_write() -> None:
    def nested(depth: int) -> tuple[Any, ...]:
        value: tuple[Any, ...] = ()
        for _ in range(depth - 1):
            value = (value,)
        return value

    assert same(roundtrip(nested(MAX_DEPTH)), nested(MAX_DEPTH))
    with pytest.raises(SerializationError, match="nested"):
        DATA.dumps(nested(MAX_DEPTH + 1), context=CTX)
    deep: list[Any] = []
    for _ in range(400):  # lists are msgpack's own: up to its limit (511)
        deep = [deep]
    assert same(roundtrip(deep), deep)
    for start in ([], ()):
        cycle: list[Any] = [start]
        cycle.append(cycle)
        with pytest.raises(SerializationError, match="nested"):
            DATA.dumps(cycle, context=CTX)
    in_a_tuple: list[Any] = []
    in_a_tuple.append((in_a_tuple,))
    with pytest.raises(SerializationError, match="nested"):
        DATA.dumps(in_a_tuple, context=CTX)


# DataSerializer: hostile bytes ---------------------------------------------


def payload(obj: Any) -> bytes:
    """A DataSerializer payload holding ``obj`` as msgpack writes it (no checks)."""
    return b"\x02" + msgpack.packb(obj, use_bin_type=True, strict_types=False)


def ext(code: int, body: Any) -> msgpack.ExtType:
    """An extension of ``code`` whose body is ``body`` (bytes as they are, else packed)."""
    data = body if isinstance(body, bytes) else msgpack.packb(body, use_bin_type=True)
    return msgpack.ExtType(code, data)


RICH = [
    {(1, "a"): [None, True, 2**70, -0.0, "é\ud800", b"x", bytearray(b"y")]},
    {frozenset({1}), (2,)},
    decimal.Decimal("-1.5E+3"),
    datetime.datetime(2020, 2, 29, 1, 2, 3, 4, zoneinfo.ZoneInfo("America/New_York"), fold=1),
    datetime.time(1, tzinfo=datetime.timezone(datetime.timedelta(hours=5), "X")),
    datetime.date(2000, 1, 1),
    datetime.timedelta(-1),
    uuid.UUID(int=5),
    Color.GREEN,
    Perm.R | Perm.W,
    box(point(1, Level.LOW), "b"),
    Slotted(Slotted(1, 2), 3),
]


def test_every_truncation_of_a_rich_payload_is_refused() -> None:
    data = DATA.dumps(RICH, context=CTX)
    for end in range(len(data)):
        with pytest.raises(SerializationError) as exc:
            DATA.loads(data[:end], context=CTX)
        clean(exc)


@settings(max_examples=50)
@given(values)
def test_every_truncation_is_refused(value: Any) -> None:
    data = DATA.dumps(value, context=CTX)
    for end in range(len(data)):
        with pytest.raises(SerializationError) as exc:
            DATA.loads(data[:end], context=CTX)
        clean(exc)


@pytest.mark.parametrize("suffix", [b"\x00", b"N"])
def test_trailing_bytes_are_refused(suffix: bytes) -> None:
    with pytest.raises(SerializationError, match="trailing"):
        DATA.loads(DATA.dumps([1], context=CTX) + suffix, context=CTX)


@settings(max_examples=300)
@given(st.binary() | st.binary().map(lambda b: b"\x01" + b))
def test_random_bytes_raise_only_serialization_error(data: bytes) -> None:
    try:
        DATA.loads(data, context=CTX)
    except SerializationError as exc:
        assert "unexpected" not in str(exc), exc


@settings(max_examples=200)
@given(values, st.data())
def test_mutated_payloads_raise_only_serialization_error(value: Any, draw: st.DataObject) -> None:
    data = bytearray(DATA.dumps(value, context=CTX))
    for _ in range(draw.draw(st.integers(1, 3))):
        data[draw.draw(st.integers(0, len(data) - 1))] = draw.draw(st.integers(0, 255))
    try:
        DATA.loads(bytes(data), context=CTX)
    except SerializationError as exc:
        assert "unexpected" not in str(exc), exc


def test_decoding_hostile_bytes_imports_nothing() -> None:
    data = DATA.dumps(RICH, context=CTX)
    DATA.loads(data, context=CTX)  # warm up: the zones are loaded
    before = set(sys.modules)
    rng = random.Random(1)
    for _ in range(3000):
        mutated = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        try:
            DATA.loads(bytes(mutated), context=CTX)
        except SerializationError as exc:
            assert "unexpected" not in str(exc), exc
    assert set(sys.modules) == before


def test_nesting_bomb_is_refused() -> None:
    def tuples(depth: int) -> bytes:
        body = msgpack.packb(None)
        for _ in range(depth):
            body = msgpack.packb(msgpack.ExtType(1, b"\x91" + body))  # a tuple of one
        return b"\x02" + body

    assert DATA.loads(tuples(MAX_DEPTH), context=CTX) is not None
    for bomb in (
        tuples(MAX_DEPTH + 1),
        b"\x02" + b"\x91" * 1_000_000 + b"\xc0",  # arrays: msgpack stops at 1024
        b"\x02" + b"\x81\xc0" * 100_000 + b"\xc0",  # maps, with keys read again, checked
    ):
        with pytest.raises(SerializationError, match="nested") as exc:
            DATA.loads(bomb, context=CTX)
        clean(exc)


_HEADS = {  # msgpack headers with a 32-bit length (ext32 with its type byte)
    "str32": b"\xdb",
    "bin32": b"\xc6",
    "array32": b"\xdd",
    "map32": b"\xdf",
    "ext32 tuple": b"\xc9",
}


@pytest.mark.parametrize("head", list(_HEADS))
@pytest.mark.parametrize("length", [2**32 - 1, 2**31, 5])
@pytest.mark.parametrize("where", ["top", "in a tuple"])
def test_huge_declared_lengths_are_refused_before_allocating(
    head: str, length: int, where: str
) -> None:
    raw = _HEADS[head] + struct.pack(">I", length) + (b"\x01" if head.startswith("ext") else b"")
    raw += b"abc"
    data = b"\x02" + raw if where == "top" else payload(ext(1, b"\x91" + raw))
    with pytest.raises(SerializationError) as exc:
        DATA.loads(data, context=CTX)
    clean(exc)


def test_unknown_extensions_are_refused() -> None:
    negative = [b"\x02\xd4" + bytes([code]) + b"\x00" for code in (0xFE, 0x80)]  # -2, -128
    for data in [payload(ext(code, b"")) for code in (0, 4, 16, 99, 127)] + negative:
        with pytest.raises(SerializationError, match="unknown extension") as exc:
            DATA.loads(data, context=CTX)
        clean(exc)
    stamp = DATA.loads(payload(msgpack.Timestamp(1, 0)), context=CTX)  # msgpack's own: -1
    assert type(stamp) is float


def test_hash_flooding_is_refused() -> None:
    # Ints k * (2**61 - 1) all hash to 0: a dict of them takes quadratic time to build.
    colliding = [k * (2**61 - 1) for k in range(MAX_SAME_HASH + 1)]
    assert len({hash(k) for k in colliding}) == 1
    fine = DataSerializer()
    assert fine.loads(fine.dumps(set(colliding[:-1]), context=CTX), context=CTX)
    for value in (
        set(colliding),
        dict.fromkeys(colliding),
        frozenset(colliding),
        {"inside": [dict.fromkeys(colliding)]},
        (dict.fromkeys(colliding),),
    ):
        with pytest.raises(SerializationError, match="hash"):
            fine.loads(fine.dumps(value, context=CTX), context=CTX)
    assert roundtrip({-1: "a", -2: "b"}) == {-1: "a", -2: "b"}  # hash(-1) == hash(-2)


def test_duplicate_and_unhashable_keys_are_refused() -> None:
    for data in (
        payload(ext(2, [None, None])),  # a set with one item twice
        b"\x02\x82\xc0\xc0\xc0\xc0",  # a map with the key None twice
        payload(ext(2, [[]])),  # a set holding a list
        b"\x02\x81\x90\xc0",  # a map whose key is a list
    ):
        with pytest.raises(SerializationError) as exc:
            DATA.loads(data, context=CTX)
        clean(exc)


def _time_body(zone: bytes) -> bytes:
    return struct.pack(">BBBIB", 1, 2, 3, 4, 0) + zone


@pytest.mark.parametrize(
    "zone", [b"../../../etc/passwd", b"/etc/localtime", b"Nowhere/Land", b"Europe/./Paris", b""]
)
def test_bad_zone_keys_are_refused(zone: bytes) -> None:
    data = payload(ext(9, _time_body(b"\x03" + zone)))
    with pytest.raises(SerializationError, match="zone") as exc:
        DATA.loads(data, context=CTX)
    clean(exc)


@pytest.mark.parametrize(
    "text", [b"1_000", b" 1", b"1e", b"NaNx", b"\xff", b"1E9999999999999999999"]
)
def test_malformed_decimals_are_refused(text: bytes) -> None:
    with decimal.localcontext() as ctx:
        ctx.traps[decimal.InvalidOperation] = False  # would turn bad text into NaN
        with pytest.raises(SerializationError, match="Decimal"):
            DATA.loads(payload(ext(6, text)), context=CTX)


def test_invalid_fields_are_refused() -> None:
    for data in (
        payload(ext(8, struct.pack(">HBB", 2021, 2, 29))),  # no Feb 29th
        payload(ext(8, struct.pack(">HBBB", 2021, 2, 28, 0))),  # a byte too many
        payload(ext(9, _time_body(b"\x00")[:-2])),  # too short
        payload(ext(9, struct.pack(">BBBIB", 24, 0, 0, 0, 0) + b"\x00")),
        payload(ext(9, struct.pack(">BBBIB", 1, 0, 0, 0, 2) + b"\x00")),  # fold 2
        payload(ext(9, _time_body(b"\x01" + struct.pack(">iII", 1, 0, 0)))),  # a day's offset
        payload(ext(9, _time_body(b"\x05"))),  # no such zone kind
        payload(ext(10, struct.pack(">iII", 2**31 - 1, 0, 0))),  # beyond timedelta.max
        payload(ext(11, bytes(15))),  # a UUID is 16 bytes
        payload(ext(5, b"")),  # an int of no bytes
        payload(ext(1, b"\xc0")),  # a tuple that is not an array
        b"\x02\xa1\xff",  # not UTF-8
    ):
        with pytest.raises(SerializationError) as exc:
            DATA.loads(data, context=CTX)
        clean(exc)


def test_errors_are_stampede_value_errors() -> None:
    assert issubclass(SerializationError, StampedeError)
    assert issubclass(SerializationError, ValueError)
    for serializer in (DATA, PickleSerializer("s"), JsonSerializer()):
        assert isinstance(serializer, Serializer)
        assert serializer.name.isascii()


# PickleSerializer ----------------------------------------------------------

REACHED: list[str] = []


def _reached() -> str:
    REACHED.append("unpickled")
    return "unpickled"


class Flag:
    """Unpickling this calls ``_reached``: it shows whether pickle saw the bytes."""

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return _reached, ()


@pytest.fixture
def reached() -> list[str]:
    REACHED.clear()
    return REACHED


def test_pickle_roundtrip_and_the_flag_works(reached: list[str]) -> None:
    signer = PickleSerializer(b"secret")
    value = {"a": OrderedDict(b=[1, 2.5, None]), "p": Level.HIGH}
    assert roundtrip(value, signer) == value
    assert signer.loads(signer.dumps(Flag(), context=CTX), context=CTX) == "unpickled"
    assert reached == ["unpickled"]


def test_pickle_tampered_anywhere_never_reaches_pickle(
    reached: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    signer = PickleSerializer("secret")
    data = signer.dumps(Flag(), context=CTX)
    calls: list[bytes] = []
    real_loads = pickle.loads

    def spy(payload: bytes, **kwargs: Any) -> Any:
        calls.append(payload)
        return real_loads(payload, **kwargs)

    monkeypatch.setattr(pickle, "loads", spy)
    for i in range(len(data)):
        for bit in (0x01, 0x80):
            tampered = bytearray(data)
            tampered[i] ^= bit
            with pytest.raises(SerializationError):
                signer.loads(bytes(tampered), context=CTX)
    for end in range(len(data)):
        with pytest.raises(SerializationError):
            signer.loads(data[:end], context=CTX)
    with pytest.raises(SerializationError):
        signer.loads(data + b".", context=CTX)
    assert calls == [] and reached == []


def test_pickle_signature_is_bound_to_the_context(reached: list[str]) -> None:
    signer = PickleSerializer(b"secret")
    data = signer.dumps(Flag(), context=b"ns\0a")
    for other in (b"ns\0b", b"ns\0a\0", b"ns", b""):
        with pytest.raises(SerializationError, match="signature"):
            signer.loads(data, context=other)
    assert reached == []
    assert signer.loads(data, context=b"ns\0a") == "unpickled"


def test_pickle_rotation(reached: list[str]) -> None:
    old = PickleSerializer(b"old")
    new = PickleSerializer(b"new", verify=[b"old", "older"])
    written_by_old = old.dumps([1], context=CTX)
    assert new.loads(written_by_old, context=CTX) == [1]
    assert new.dumps([1], context=CTX)[:8] != written_by_old[:8]  # signs with the new key
    with pytest.raises(SerializationError, match="unknown key"):
        old.loads(new.dumps([1], context=CTX), context=CTX)
    stranger = PickleSerializer(b"stranger").dumps(Flag(), context=CTX)
    with pytest.raises(SerializationError, match="unknown key"):
        new.loads(stranger, context=CTX)
    # a forger who knows a key id but not its secret
    forged = written_by_old[:8] + bytes(32) + pickle.dumps(Flag())
    with pytest.raises(SerializationError, match="signature"):
        new.loads(forged, context=CTX)
    assert reached == []


def test_pickle_secrets_are_checked() -> None:
    for secret in (b"", ""):
        with pytest.raises(ValueError):
            PickleSerializer(secret)
        with pytest.raises(ValueError):
            PickleSerializer(b"ok", verify=[secret])
    with pytest.raises(TypeError):
        PickleSerializer(b"ok", verify=b"old")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        PickleSerializer(123)  # type: ignore[arg-type]
    text, raw = PickleSerializer("clé"), PickleSerializer("clé".encode())
    assert raw.loads(text.dumps(1, context=CTX), context=CTX) == 1
    assert "clé" not in repr(text) and b"secret".hex() not in repr(PickleSerializer(b"secret"))


def test_pickle_errors_are_serialization_errors() -> None:
    signer = PickleSerializer(b"secret")
    with pytest.raises(SerializationError, match="cannot pickle"):
        signer.dumps(lambda: 1, context=CTX)
    # signed with the right key, yet not a pickle: the MAC holds, unpickling fails
    from stampede.serializers import _mac

    junk = b"\x80\x05junk"
    data = signer.dumps(0, context=CTX)[:8] + _mac(b"secret", CTX, junk) + junk
    with pytest.raises(SerializationError, match="unpickle"):
        signer.loads(data, context=CTX)


# JsonSerializer ------------------------------------------------------------

JSON = JsonSerializer()


def test_json_roundtrip() -> None:
    value = {"a": [1, 2.5, None, True, "é"], "b": {"c": []}}
    assert same(roundtrip(value, JSON), value)
    assert roundtrip((1, (2,)), JSON) == [1, [2]]  # tuples come back as lists
    assert JSON.dumps({"a": 1}, context=CTX) == b'{"a":1}'


@pytest.mark.parametrize(
    "value", [{1: "a"}, [{"a": {(1,): 2}}], math.nan, [math.inf], "\ud800", b"x", {1, 2}]
)
def test_json_refuses_what_would_not_round_trip(value: Any) -> None:
    with pytest.raises(SerializationError):
        JSON.dumps(value, context=CTX)


def test_json_refuses_cycles_and_bad_input() -> None:
    cycle: list[Any] = []
    cycle.append(cycle)
    with pytest.raises(SerializationError):
        JSON.dumps(cycle, context=CTX)
    for data in (b"[" * 100_000, b"NaN", b"\xff", b"{", b'{"a":1}x', b"1" * 5000):
        with pytest.raises(SerializationError):
            JSON.loads(data, context=CTX)


@given(st.binary())
def test_json_random_bytes_raise_only_serialization_error(data: bytes) -> None:
    with contextlib.suppress(SerializationError):
        JSON.loads(data, context=CTX)


# MsgpackSerializer ---------------------------------------------------------


def test_msgpack_roundtrip() -> None:
    packer = MsgpackSerializer()
    assert isinstance(packer, Serializer)
    value = {"a": [1, -(2**63), 2.5, None, True, "é", b"\x00"], 1: {"c": []}, None: 0}
    assert same(roundtrip(value, packer), value)
    assert roundtrip((1, (2,)), packer) == [1, [2]]  # tuples come back as lists
    for bad in (object(), 2**64, "\ud800", {1, 2}):
        with pytest.raises(SerializationError):
            packer.dumps(bad, context=CTX)
    with pytest.raises(SerializationError):  # a tuple key is written but cannot be read
        packer.loads(packer.dumps({(1, 2): 3}, context=CTX), context=CTX)
    for data in (b"", b"\xc1", b"\x92\x01", b"\x91" * 100_000 + b"\x01", b"\x01\x02"):
        with pytest.raises(SerializationError):
            packer.loads(data, context=CTX)


@given(st.binary())
def test_msgpack_random_bytes_raise_only_serialization_error(data: bytes) -> None:
    with contextlib.suppress(SerializationError):
        MsgpackSerializer().loads(data, context=CTX)


def _bombs(size: int) -> dict[str, bytes]:
    """Hostile payloads of about ``size`` bytes, each built to cost the reader most."""
    empty_set = msgpack.packb(msgpack.ExtType(2, b"\x90"))
    def big(n: int) -> bytes:  # int64 holds at most ~16 ints of one hash: these are bigger
        return msgpack.packb(msgpack.ExtType(5, n.to_bytes(16, "little", signed=True)))

    colliding = b"".join(big(k * (2**61 - 1)) + b"\xc0" for k in range(size // 20))
    tuples = b"\xc0"
    for _ in range(1000):  # each level a tuple of one: MAX_DEPTH stops the reader at 100
        tuples = msgpack.packb(msgpack.ExtType(1, b"\x91" + tuples))
    return {
        "empty lists": b"\x02\xdd" + struct.pack(">I", size) + b"\x90" * size,
        "empty sets": b"\x02\xdd" + struct.pack(">I", size // 3) + empty_set * (size // 3),
        "empty dicts": b"\x02\xdd" + struct.pack(">I", size) + b"\x80" * size,
        "short strings": b"\x02\xdd" + struct.pack(">I", size // 2) + b"\xa1a" * (size // 2),
        "colliding keys": b"\x02\xdf" + struct.pack(">I", size // 20) + colliding,
        "deep tuples": b"\x02" + tuples,
        "deep arrays": b"\x02" + b"\x91" * size + b"\xc0",
    }


@pytest.mark.parametrize("shape", list(_bombs(16)))
def test_hostile_payloads_cost_memory_in_proportion_to_their_size(shape: str) -> None:
    """A payload can make the reader build at most a few dozen bytes of objects per
    byte read (an empty set: 216 bytes from 3), then it is a value or a refusal: the
    store's max_value_size (1 MiB) bounds what one read can cost. Nothing but
    SerializationError escapes, and colliding keys are refused before the dict."""
    import tracemalloc

    data = _bombs(256 * 1024)[shape]
    refused = ""
    tracemalloc.start()
    try:
        try:
            DATA.loads(data, context=CTX)
        except SerializationError as exc:
            refused = str(exc)
            assert "unexpected" not in refused, exc
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 100 * len(data), f"{shape}: {peak:,} bytes from {len(data):,}"
    if shape == "colliding keys":
        assert "hash" in refused
    if shape.startswith("deep"):
        assert "nested" in refused

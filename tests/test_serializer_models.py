"""DataSerializer with pydantic (v2) models and attrs classes: registered, they round-trip
through the class's own validation or constructor; unregistered, the error says how to
register them, and the cache warns once per type, not once per call.
"""

from __future__ import annotations

import asyncio
import datetime
import decimal
import enum
import logging
import uuid
from pathlib import Path
from typing import Any

import attrs
import msgpack
import pydantic
import pytest
import redis.asyncio
from hypothesis import given
from hypothesis import strategies as st

import stampede
from stampede.serializers import DataSerializer, SerializationError

CTX = b"ns\0key"
UTC = datetime.timezone.utc


class Tier(enum.Enum):  # not registered: a pydantic field's enum travels as JSON
    FREE = "free"
    PRO = "pro"


class Address(pydantic.BaseModel):
    city: str
    zip_code: str = pydantic.Field(alias="zipCode")


class Item(pydantic.BaseModel):
    id: uuid.UUID
    name: str
    price: decimal.Decimal
    created: datetime.datetime
    tags: tuple[str, ...] = ()
    codes: frozenset[int] = frozenset()
    tier: Tier = Tier.FREE
    address: Address | None = None
    history: list[Address] = []


class Strict(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(strict=True, frozen=True)
    when: datetime.datetime
    amount: decimal.Decimal


class Positive(pydantic.BaseModel):
    n: int

    @pydantic.field_validator("n")
    @classmethod
    def positive(cls, n: int) -> int:
        if n <= 0:
            raise ValueError("must be positive")
        return n


@attrs.frozen
class Point:
    x: int
    y: int = attrs.field(validator=attrs.validators.instance_of(int))


@attrs.define
class Account:
    owner: str
    _balance: decimal.Decimal  # a private field: __init__ takes it as "balance"
    history: list[Point] = attrs.Factory(list)
    computed: str = attrs.field(init=False, default="derived")


MODELS = DataSerializer(types=[Item, Address, Strict, Positive, Point, Account])


def roundtrip(value: Any, serializer: DataSerializer = MODELS) -> Any:
    return serializer.loads(serializer.dumps(value, context=CTX), context=CTX)


def item(n: int = 1) -> Item:
    return Item(
        id=uuid.UUID(int=n),
        name=f"item {n} \u00e9",
        price=decimal.Decimal("19.990"),
        created=datetime.datetime(2026, 12, 3, 12, 30, tzinfo=UTC),
        tags=("a", "b"),
        codes=frozenset({3, 1}),
        tier=Tier.PRO,
        address=Address(city="Lyon", zipCode="69001"),
        history=[Address(city="Paris", zipCode="75001")],
    )


# -- pydantic --------------------------------------------------------------------------


def test_a_registered_model_round_trips_through_its_validation() -> None:
    original = item()
    back = roundtrip(original)
    assert type(back) is Item and back == original
    assert type(back.address) is Address and type(back.history[0]) is Address
    assert type(back.tags) is tuple and type(back.codes) is frozenset and back.tier is Tier.PRO
    assert back.price.as_tuple() == original.price.as_tuple()  # "19.990", exponent kept
    assert back.created.tzinfo is not None and back.created == original.created


def test_models_inside_values_and_strict_models() -> None:
    strict = Strict(when=item().created, amount=decimal.Decimal("1.5"))
    value = {"items": [item(1), item(2)], "pair": (item(3), strict)}
    back = roundtrip(value)
    assert back == value and type(back["pair"]) is tuple and type(back["pair"][1]) is Strict


models = st.builds(
    Item,
    id=st.uuids(),
    name=st.text(),
    price=st.decimals(allow_nan=False, allow_infinity=False, places=4),
    created=st.datetimes(timezones=st.just(UTC)),
    tags=st.lists(st.text(max_size=5), max_size=3).map(tuple),
    codes=st.frozensets(st.integers(-(2**63), 2**63 - 1), max_size=3),
    tier=st.sampled_from(Tier),
    address=st.none() | st.builds(Address, city=st.text(max_size=5), zipCode=st.text(max_size=5)),
)


@given(models)
def test_models_round_trip(model: Item) -> None:
    back = roundtrip(model)
    assert type(back) is Item and back == model


def test_stored_data_the_model_refuses_is_a_miss_and_names_the_model() -> None:
    forged = b"\x02" + msgpack.packb(
        msgpack.ExtType(15, msgpack.packb([f"{__name__}.Positive", b'{"n": -1}']))
    )
    with pytest.raises(SerializationError, match=r"Positive.*refused"):
        MODELS.loads(forged, context=CTX)
    for junk in (b"not json", b'{"n": "x"}', b"[]"):
        forged = b"\x02" + msgpack.packb(
            msgpack.ExtType(15, msgpack.packb([f"{__name__}.Positive", junk]))
        )
        with pytest.raises(SerializationError):
            MODELS.loads(forged, context=CTX)


def test_an_unregistered_model_says_exactly_how_to_register_it() -> None:
    with pytest.raises(SerializationError) as exc:
        DataSerializer().dumps(item(), context=CTX)
    message = str(exc.value)
    assert f"DataSerializer(types=[{__name__}.Item])" in message
    assert "serializer=" in message and "PickleSerializer" in message


# -- attrs -----------------------------------------------------------------------------


def test_an_attrs_class_is_rebuilt_through_its_own_init() -> None:
    account = Account("ana", decimal.Decimal("10.50"), [Point(1, 2)])
    account.computed = "changed after init"  # not an __init__ field: not stored
    back = roundtrip(account)
    assert type(back) is Account and back.owner == "ana" and back._balance == account._balance
    assert back.history == [Point(1, 2)] and type(back.history[0]) is Point
    assert back.computed == "derived"
    assert roundtrip(Point(3, 4)) == Point(3, 4)


@given(st.builds(Point, st.integers(), st.integers()), st.text(), st.decimals(allow_nan=False))
def test_attrs_instances_round_trip(point: Point, owner: str, balance: decimal.Decimal) -> None:
    account = Account(owner, balance, [point])
    back = roundtrip(account)
    assert type(back) is Account and back == account and type(back.history[0]) is Point


def test_attrs_validators_run_on_read() -> None:
    forged = b"\x02" + msgpack.packb(
        msgpack.ExtType(14, msgpack.packb([f"{__name__}.Point", ["x", "y"], 1, "not an int"]))
    )
    with pytest.raises(SerializationError, match=r"Point.*refused"):
        MODELS.loads(forged, context=CTX)


def test_changed_attrs_fields_are_refused() -> None:
    @attrs.define
    class V1:
        a: int

    @attrs.define
    class V2:
        a: int
        b: int = 0

    old = DataSerializer(types={"thing": V1}).dumps(V1(1), context=CTX)
    with pytest.raises(SerializationError, match="fields"):
        DataSerializer(types={"thing": V2}).loads(old, context=CTX)


def test_only_classes_of_the_four_kinds_can_be_registered() -> None:
    class Plain:
        pass

    with pytest.raises(TypeError, match="attrs class or a pydantic model"):
        DataSerializer(types=[Plain])


# -- in a cache --------------------------------------------------------------------------


def test_an_unstorable_value_warns_once_per_type(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    calls: list[int] = []

    @stampede.cached(ttl=60, cache=f"disk://{tmp_path / 'cache'}")
    def get_item(n: int) -> Item:
        calls.append(n)
        return item(n)

    with caplog.at_level(logging.WARNING, logger="stampede"):
        for n in (1, 1, 2, 3):
            assert get_item(n) == item(n)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert f"DataSerializer(types=[{__name__}.Item])" in warnings[0].getMessage()
    assert calls == [1, 1, 2, 3]  # not cached, and each failure still counted
    assert get_item.cache_info().stats.serialization_errors == 4


def test_a_fastapi_return_type_just_works_once_registered(redis_url: str) -> None:
    """An async function returning a pydantic model, cached on Redis with the model
    registered: the second call, from another cache on the same Redis, is a hit that
    comes back as the model."""
    origin: list[int] = []
    serializer = DataSerializer(types=[Item, Address])

    async def run() -> None:
        client = redis.asyncio.Redis.from_url(redis_url)

        @stampede.cached(cache=client, ttl=60, serializer=serializer, namespace="items")
        async def get_item(n: int) -> Item:
            origin.append(n)
            return item(n)

        @stampede.cached(cache=client, ttl=60, serializer=serializer, namespace="items")
        async def get_item_elsewhere(n: int) -> Item:  # another worker's function
            raise AssertionError("served from Redis, not loaded")

        get_item_elsewhere.__qualname__ = get_item.__qualname__
        first = await get_item(7)
        again = await get_item(7)
        assert first == again == item(7) and origin == [7]
        assert get_item.cache_info().stats.serialization_errors == 0
        await client.aclose()

    asyncio.run(run())

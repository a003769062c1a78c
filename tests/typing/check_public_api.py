# pyright: strict
"""Type-checked, never run: CI runs `mypy --strict tests/typing`.

It pins what users' type checkers see: @cached keeps the signature
(ParamSpec) and the return type, sync and async alike.
"""

from __future__ import annotations

from collections.abc import Hashable

from typing_extensions import assert_type

import stampede


@stampede.cached(ttl=5)
def price(symbol: str, scale: int = 1) -> float:
    return 1.0 * scale


@stampede.cached
async def profile(user_id: int) -> dict[str, int]:
    return {"id": user_id}


class Repo:
    @stampede.cached(ttl=1)
    def get(self, key: str) -> bytes:
        return key.encode()


def sync_uses() -> None:
    assert_type(price("BTC"), float)
    assert_type(price("BTC", scale=2), float)
    assert_type(price.refresh("BTC"), float)
    assert_type(price.cache_key("BTC"), Hashable)
    price.invalidate("BTC")
    info: stampede.CacheInfo = price.cache_info()
    assert_type(info.stats, stampede.Stats)
    price.cache_clear()
    assert_type(price.cache, stampede.CoalescingCache[float])
    price(1)  # type: ignore[arg-type]
    price("BTC", nope=1)  # type: ignore[call-arg]


async def async_uses() -> None:
    assert_type(await profile(1), dict[str, int])
    assert_type(await profile.refresh(1), dict[str, int])
    await profile.invalidate(1)
    await profile.cache_clear()
    await profile("x")  # type: ignore[arg-type]


def cache_uses() -> None:
    cache: stampede.CoalescingCache[int] = stampede.CoalescingCache(ttl=3)
    assert_type(cache.get_or_load("k", lambda: 1), int)
    flight = stampede.SingleFlight()
    assert_type(flight.do("k", lambda: "v"), tuple[str, bool])


async def async_cache_uses() -> None:
    cache: stampede.AsyncCoalescingCache[str] = stampede.AsyncCoalescingCache()

    async def load() -> str:
        return "v"

    assert_type(await cache.get_or_load("k", load), str)
    flight = stampede.AsyncSingleFlight()
    assert_type(await flight.do("k", load), tuple[str, bool])


@stampede.cached(
    ttl=5,
    beta=1.0,
    stale_ttl=60,
    cache_errors=(LookupError,),
    error_ttl=2,
    wait_timeout=10,
    namespace="prices",
    distributed=False,
    lease_ttl=10,
    name="prices",
    metrics=stampede.LoggingMetrics(),
    on_backend_error="raise",
    typed=True,
    maxsize=100,
)
def every_option(symbol: str) -> float:
    return 1.0


def options_are_typed() -> None:
    assert_type(every_option("BTC"), float)
    cache: stampede.CoalescingCache[int] = stampede.CoalescingCache(
        None, ttl=3, stale_ttl=1, on_backend_error="fail-open", namespace="n"
    )
    assert_type(cache.stats(), stampede.Stats)
    stampede.CoalescingCache(ttl="3")  # type: ignore[arg-type]
    stampede.CoalescingCache(on_backend_error="ignore")  # type: ignore[arg-type]
    stampede.CoalescingCache(tll=3)  # type: ignore[call-arg]


@stampede.cached(ttl=None, beta=None, stale_ttl=None, maxsize=None, distributed=None)
def none_means_the_default(x: int) -> int:
    return x


def none_options_keep_the_signature() -> None:
    assert_type(none_means_the_default(1), int)
    none_means_the_default("1")  # type: ignore[arg-type]


class Catalog:
    @stampede.cached(ttl=60)
    def product(self, sku: str, *, fresh: bool = False) -> str:
        return sku

    @stampede.cached(ttl=60)
    async def stock(self, sku: str) -> int:
        return len(sku)



async def method_uses(catalog: Catalog) -> None:
    # Through an instance: the bound call, self dropped from the signature.
    assert_type(catalog.product("A1"), str)
    assert_type(catalog.product("A1", fresh=True), str)
    assert_type(await catalog.stock("A1"), int)
    catalog.product(1)  # type: ignore[arg-type]
    catalog.product()  # type: ignore[call-arg]
    await catalog.stock(2)  # type: ignore[arg-type]
    # Through the class: the cached function, helpers taking the instance first.
    Catalog.product.invalidate(catalog, "A1")
    assert_type(Catalog.product.refresh(catalog, "A1"), str)
    await Catalog.stock.invalidate(catalog, "A1")
    assert_type(Catalog.product.cache, stampede.CoalescingCache[str])


def idempotency_uses(idem: stampede.Idempotency) -> None:
    value, replayed = idem.do("order-1", lambda: 42, fingerprint=b"body")
    assert_type(value, int)
    assert_type(replayed, bool)

    def order_key(order_id: str, amount: int) -> str:
        return order_id

    @idem.idempotent(key=order_key)
    def charge(order_id: str, amount: int) -> str:
        return order_id

    assert_type(charge("o", 5), str)
    charge(1, 5)  # type: ignore[arg-type]


async def async_idempotency_uses(idem: stampede.AsyncIdempotency) -> None:
    async def work() -> int:
        return 1

    value, _ = await idem.do("k", work)
    assert_type(value, int)

    def job_key(job_id: str) -> str:
        return job_id

    @idem.idempotent(key=job_key)
    async def handle(job_id: str) -> bytes:
        return job_id.encode()

    assert_type(await handle("j"), bytes)

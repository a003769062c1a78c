"""Batch reads on Redis: stampede beside dogpile.cache and aiocache, one run.

    python benchmarks/bench_batch.py [--quick] [--batch 50]

Three measures, every row on one private ``redis-server`` started here (a free
loopback port, no persistence; never a Redis already running on the machine):

1. **Warm batch**: every id of a batch is cached. Time per batch (median of
   interleaved rounds), and what Redis saw per batch: commands run (``INFO
   commandstats``) and read events (``total_reads_processed``, one per client
   round trip that fits one write).
2. **Partial batch**: a fifth of each batch's ids are new. Time per batch and
   loader calls per batch.
3. **Cold burst**: concurrent callers (threads, or tasks) ask overlapping
   windows of ids of a cold cache whose loader takes 20 ms. Ids loaded, over
   the distinct ids asked: 1.00 means each id was loaded once.

Peers: dogpile.cache ``get_or_create_multi`` (redis backend, pickle) and
aiocache ``multi_cached`` (RedisCache, pickle). The floor is one ``MGET`` plus
``pickle.loads`` of each value (sync) and the same with ``redis.asyncio``.
stampede stores with its default data-only serializer.
"""

from __future__ import annotations

import argparse
import asyncio
import pickle
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import redis
import redis.asyncio
from _common import progress, ratio, reason, table

import stampede

VALUE = {f"field{i}": (i if i % 2 else f"text {i}") for i in range(10)}
LOAD_DELAY = 0.02


def value_of(key: Any) -> dict[str, Any]:
    return {**VALUE, "id": str(key)}


class Server:
    """What the Redis server counts, between two points of a run."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def counts(self) -> tuple[int, int]:
        stats = self.client.info("commandstats")
        commands = sum(int(v["calls"]) for k, v in stats.items() if k.startswith("cmdstat_"))
        reads = int(self.client.info("stats")["total_reads_processed"])
        return commands, reads


# -- the rows: each a sync function (batch of ids) -> mapping, or an async one -------------------


def stampede_rows(url: str, ns: str) -> dict[str, Callable[[list[str]], Any]]:
    cache: stampede.CoalescingCache[Any] = stampede.CoalescingCache(
        redis.Redis.from_url(url), ttl=600, namespace=f"{ns}-m"
    )

    def load_many(keys: list[str]) -> dict[str, Any]:
        return {key: value_of(key) for key in keys}

    @stampede.cached_many(cache=redis.Redis.from_url(url), ttl=600, namespace=f"{ns}-d")
    def values(ids: list[str]) -> dict[str, Any]:
        return {key: value_of(key) for key in ids}

    return {
        "stampede `get_or_load_many`": lambda ids: cache.get_or_load_many(ids, load_many),
        "stampede `@cached_many`": values,
    }


def dogpile_row(url: str, ns: str) -> Callable[[list[str]], Any]:
    from dogpile.cache import make_region

    port = int(url.rsplit(":", 1)[1].split("/")[0])
    region = make_region(key_mangler=lambda key: f"{ns}-dp:{key}").configure(
        "dogpile.cache.redis",
        expiration_time=600,
        arguments={"host": "127.0.0.1", "port": port, "db": 0, "redis_expiration_time": 600},
    )

    def creator(*keys: str) -> list[Any]:
        return [value_of(key) for key in keys]

    def get(ids: list[str]) -> Any:
        return dict(zip(ids, region.get_or_create_multi(ids, creator), strict=True))

    return get


def floor_row(url: str) -> Callable[[list[str]], Any]:
    client = redis.Redis.from_url(url)

    def get(ids: list[str]) -> Any:
        keys = [f"floor:{key}" for key in ids]
        return {key: pickle.loads(data) for key, data in zip(ids, client.mget(keys), strict=True)}

    return get


def fill_floor(url: str, ids: Sequence[str]) -> None:
    client = redis.Redis.from_url(url)
    client.mset({f"floor:{key}": pickle.dumps(value_of(key)) for key in ids})


async def async_rows(url: str, ns: str) -> dict[str, Callable[[list[str]], Any]]:
    cache: stampede.AsyncCoalescingCache[Any] = stampede.AsyncCoalescingCache(
        redis.asyncio.Redis.from_url(url), ttl=600, namespace=f"{ns}-am"
    )

    async def load_many(keys: list[str]) -> dict[str, Any]:
        return {key: value_of(key) for key in keys}

    @stampede.cached_many(cache=redis.asyncio.Redis.from_url(url), ttl=600, namespace=f"{ns}-ad")
    async def values(ids: list[str]) -> dict[str, Any]:
        return {key: value_of(key) for key in ids}

    floor = redis.asyncio.Redis.from_url(url)

    async def floor_get(ids: list[str]) -> Any:
        keys = [f"floor:{key}" for key in ids]
        datas = await floor.mget(keys)
        return {key: pickle.loads(data) for key, data in zip(ids, datas, strict=True)}

    rows: dict[str, Callable[[list[str]], Any]] = {
        "floor: `MGET` + `pickle.loads` (redis.asyncio)": floor_get,
        "stampede async `get_or_load_many`": lambda ids: cache.get_or_load_many(ids, load_many),
        "stampede async `@cached_many`": values,
    }
    try:
        rows["aiocache `multi_cached` (RedisCache)"] = aiocache_row(url, ns)
    except Exception as exc:  # not installed, or an API it does not have
        progress(f"aiocache: {reason(exc)}")
    return rows


def aiocache_row(url: str, ns: str) -> Callable[[list[str]], Any]:
    import aiocache
    from aiocache.serializers import PickleSerializer

    port = int(url.rsplit(":", 1)[1].split("/")[0])

    @aiocache.multi_cached(
        "ids",
        cache=aiocache.RedisCache,
        endpoint="127.0.0.1",
        port=port,
        namespace=f"{ns}-ai",
        serializer=PickleSerializer(),
        ttl=600,
    )
    async def values(ids: list[str]) -> dict[str, Any]:
        return {key: value_of(key) for key in ids}

    return lambda ids: values(ids=ids)


# -- the measures ---------------------------------------------------------------------


def time_sync(
    rows: dict[str, Callable[[list[str]], Any]], batches: list[list[str]], rounds: int
) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(rounds):
        for name, get in rows.items():
            started = time.perf_counter()
            for ids in batches:
                get(ids)
            times[name].append((time.perf_counter() - started) / len(batches))
    return {name: statistics.median(values) for name, values in times.items()}


async def time_async(
    rows: dict[str, Callable[[list[str]], Any]], batches: list[list[str]], rounds: int
) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(rounds):
        for name, get in rows.items():
            started = time.perf_counter()
            for ids in batches:
                await get(ids)
            times[name].append((time.perf_counter() - started) / len(batches))
    return {name: statistics.median(values) for name, values in times.items()}


def server_cost(server: Server, run: Callable[[], None], batches: int) -> tuple[float, float]:
    before = server.counts()
    run()
    after = server.counts()
    # minus the two INFO commands (and their reads) of the second count
    return (after[0] - before[0] - 2) / batches, (after[1] - before[1] - 2) / batches


def warm(url: str, batch: int, rounds: int, ns: str) -> list[list[str]]:
    ids = [f"id{i}" for i in range(batch * 10)]
    batches = [ids[i : i + batch] for i in range(0, len(ids), batch)]
    fill_floor(url, ids)
    server = Server(redis.Redis.from_url(url))
    rows: dict[str, Callable[[list[str]], Any]] = {
        "floor: `MGET` + `pickle.loads`": floor_row(url),
        **stampede_rows(url, ns),
    }
    try:
        rows["dogpile `get_or_create_multi` (redis)"] = dogpile_row(url, ns)
    except Exception as exc:
        progress(f"dogpile: {reason(exc)}")
    for get in rows.values():
        for ids in batches:
            get(ids)  # fill
    progress("warm batches, sync")
    times = time_sync(rows, batches, rounds)
    floor = times["floor: `MGET` + `pickle.loads`"]
    out = []
    for name, get in rows.items():

        def run(get: Callable[[list[str]], Any] = get) -> None:
            for ids in batches:
                get(ids)

        commands, reads = server_cost(server, run, len(batches))
        out.append(
            [
                name,
                f"{times[name] * 1e6:,.0f}",
                ratio(times[name], floor),
                f"{commands:.1f}",
                f"{reads:.1f}",
            ]
        )

    async def async_part() -> list[list[str]]:
        arows = await async_rows(url, ns)
        for get in arows.values():
            for ids in batches:
                await get(ids)
        progress("warm batches, async")
        atimes = await time_async(arows, batches, rounds)
        afloor = atimes["floor: `MGET` + `pickle.loads` (redis.asyncio)"]
        rows_out = []
        for name, get in arows.items():
            before = server.counts()
            for ids in batches:
                await get(ids)
            after = server.counts()
            commands = (after[0] - before[0] - 2) / len(batches)
            reads = (after[1] - before[1] - 2) / len(batches)
            rows_out.append(
                [
                    name,
                    f"{atimes[name] * 1e6:,.0f}",
                    ratio(atimes[name], afloor),
                    f"{commands:.1f}",
                    f"{reads:.1f}",
                ]
            )
        return rows_out

    out += asyncio.run(async_part())
    print(f"\n## 1. Warm batch: {batch} ids, all cached\n")
    print(
        table(
            [
                "row",
                "µs per batch",
                "vs floor",
                "Redis commands per batch",
                "Redis read events per batch",
            ],
            out,
        )
    )
    return batches


def cold_burst(url: str, batch: int, callers: int, ns: str) -> None:
    """Concurrent overlapping windows of a cold cache: ids loaded over distinct ids."""
    windows = [
        [f"c{j}" for j in range(i * (batch // 5), i * (batch // 5) + batch)] for i in range(callers)
    ]
    distinct = len({key for window in windows for key in window})
    rows_out = []

    def sync_burst(
        name: str, make: Callable[[Callable[[list[str]], None]], Callable[[list[str]], Any]]
    ) -> None:
        loaded: list[str] = []
        lock = threading.Lock()

        def record(keys: list[str]) -> None:
            with lock:
                loaded.extend(keys)
            time.sleep(LOAD_DELAY)

        get = make(record)
        start = threading.Barrier(callers)

        def call(window: list[str]) -> None:
            start.wait()
            get(window)

        threads = [threading.Thread(target=call, args=(w,)) for w in windows]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rows_out.append([name, "threads", f"{len(loaded)}", f"{len(loaded) / distinct:.2f}"])

    def stampede_sync(record: Callable[[list[str]], None]) -> Callable[[list[str]], Any]:
        cache: stampede.CoalescingCache[Any] = stampede.CoalescingCache(
            redis.Redis.from_url(url), ttl=600, namespace=f"{ns}-cold-{uuid.uuid4().hex[:4]}"
        )

        def load_many(keys: list[str]) -> dict[str, Any]:
            record(keys)
            return {key: value_of(key) for key in keys}

        return lambda ids: cache.get_or_load_many(ids, load_many)

    def dogpile_sync(record: Callable[[list[str]], None]) -> Callable[[list[str]], Any]:
        from dogpile.cache import make_region

        port = int(url.rsplit(":", 1)[1].split("/")[0])
        tag = uuid.uuid4().hex[:4]
        region = make_region(key_mangler=lambda key: f"{ns}-cold-dp-{tag}:{key}").configure(
            "dogpile.cache.redis",
            expiration_time=600,
            arguments={"host": "127.0.0.1", "port": port},
        )

        def creator(*keys: str) -> list[Any]:
            record(list(keys))
            return [value_of(key) for key in keys]

        return lambda ids: region.get_or_create_multi(ids, creator)

    progress("cold burst, sync")
    sync_burst("stampede `get_or_load_many`", stampede_sync)
    try:
        sync_burst("dogpile `get_or_create_multi` (redis)", dogpile_sync)
    except Exception as exc:
        progress(f"dogpile: {reason(exc)}")

    async def async_burst() -> None:
        loaded: list[str] = []
        cache: stampede.AsyncCoalescingCache[Any] = stampede.AsyncCoalescingCache(
            redis.asyncio.Redis.from_url(url), ttl=600, namespace=f"{ns}-acold"
        )

        async def load_many(keys: list[str]) -> dict[str, Any]:
            loaded.extend(keys)
            await asyncio.sleep(LOAD_DELAY)
            return {key: value_of(key) for key in keys}

        await asyncio.gather(*(cache.get_or_load_many(w, load_many) for w in windows))
        rows_out.append(
            [
                "stampede async `get_or_load_many`",
                "tasks",
                f"{len(loaded)}",
                f"{len(loaded) / distinct:.2f}",
            ]
        )
        try:
            import aiocache
            from aiocache.serializers import PickleSerializer

            port = int(url.rsplit(":", 1)[1].split("/")[0])
            ai_loaded: list[str] = []

            @aiocache.multi_cached(
                "ids", cache=aiocache.RedisCache, endpoint="127.0.0.1", port=port,
                namespace=f"{ns}-aicold", serializer=PickleSerializer(), ttl=600,
            )  # fmt: skip
            async def values(ids: list[str]) -> dict[str, Any]:
                ai_loaded.extend(ids)
                await asyncio.sleep(LOAD_DELAY)
                return {key: value_of(key) for key in ids}

            await asyncio.gather(*(values(ids=w) for w in windows))
            rows_out.append(
                [
                    "aiocache `multi_cached` (RedisCache)",
                    "tasks",
                    f"{len(ai_loaded)}",
                    f"{len(ai_loaded) / distinct:.2f}",
                ]
            )
        except Exception as exc:
            progress(f"aiocache: {reason(exc)}")

    progress("cold burst, async")
    asyncio.run(async_burst())
    print(
        f"\n## 2. Cold burst: {callers} concurrent callers, windows of {batch} ids "
        f"overlapping by 80 %, {distinct} distinct ids, loader {LOAD_DELAY * 1000:.0f} ms\n"
    )
    print(table(["row", "callers", "ids loaded", "ids loaded / distinct ids"], rows_out))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    parser.add_argument("--batch", type=int, default=50, help="ids per batch (50)")
    args = parser.parse_args(argv)
    from tests.support.redis_server import RedisServer

    rounds = 3 if args.quick else 15
    ns = f"bb-{uuid.uuid4().hex[:6]}"
    with RedisServer() as server:
        progress(f"private redis-server on {server.url}")
        print(f"# Batch reads on Redis ({'quick' if args.quick else 'full'} run)")
        warm(server.url, args.batch, rounds, ns)
        cold_burst(server.url, args.batch, 20, ns)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

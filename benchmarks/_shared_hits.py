"""Section 6: hits of one cached key in a store shared between processes (Redis, disk).

DESIGN.md section 4: "Redis hit: one round trip; <= 1.15x a raw redis-py GET +
decode of the same value". Every row reads one key holding the same small
value (a dict of ten str/int fields), already stored; each row is timed in
interleaved rounds and reports its minimum, like sections 1-2.

Redis rows run against a private ``redis-server`` started for this section
(``tests.support.redis_server.RedisServer``: a free loopback port, no
persistence), never against a Redis already running on the machine. Commands
per hit are counted by the server: its slow log, set to record every command
for the count only (not while timing), names each command and the client that
sent it, so the commands a Lua script runs inside Redis (no round trip) are
told apart from the ones a client sent. Redis time per hit comes from ``INFO
commandstats`` over a few thousand more hits (it counts each call in whole µs:
a mean over many calls is fair, one over 50 is not).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import pickle
import statistics
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from _common import (
    KEY,
    Config,
    Target,
    Unavailable,
    acounting,
    counting,
    ns,
    progress,
    ratio,
    reason,
    table,
)
from _hit import HitResult, _await_loop, _Row, _sync_timer

import stampede

TARGET = 1.15  # stampede Redis hit <= 1.15x raw redis-py GET + decode
ASYNC_TARGET = 1.25  # the same through redis.asyncio
# Many short rounds: a round trip is easily delayed by anything else on the machine, and
# the minimum of many short repeats finds the undisturbed time more reliably than a few
# long ones. (rounds, seconds per repeat): quick, full.
TIMING = {True: (5, 0.005), False: (25, 0.02)}
TTL = 600  # long enough that no row's key expires (or refreshes early) during the section

# A small, realistic cached value: a user record of ten str/int fields.
VALUE: dict[str, Any] = {
    "id": 184467,
    "name": "Ada Lovelace",
    "email": "ada.lovelace@example.com",
    "plan": "pro",
    "country": "GB",
    "city": "London",
    "active": 1,
    "logins": 1843,
    "created": "2024-03-18T09:12:44Z",
    "score": 9731,
}

# Keys of the raw rows: the same value, encoded by pickle / DataSerializer.
RAW_PICKLE = "bench:raw:pickle"
RAW_DATA = "bench:raw:data"

REDIS_FLOOR = "floor: raw redis-py `GET` + `pickle.loads`"
REDIS_DATA = "raw redis-py `GET` + `DataSerializer().loads`"
REDIS_CACHED = "stampede `@cached(cache=redis_client)`"
REDIS_GET_OR_LOAD = "stampede `CoalescingCache(redis_client).get_or_load`"
ASYNC_FLOOR = "floor: raw `await client.get()` + `pickle.loads` (redis.asyncio)"
ASYNC_DATA = "raw `await client.get()` + `DataSerializer().loads`"
ASYNC_GET_OR_LOAD = "stampede `AsyncCoalescingCache(async_client).get_or_load`"
ASYNC_CACHED = "stampede `@cached(cache=async_client)` (async def)"
DISK_FLOOR = "floor: raw `Cache.get` of the pickled bytes + `pickle.loads`"
DISK_DATA = "raw `Cache.get` of DataSerializer bytes + `DataSerializer().loads`"

NOT_SUPPORTED = "n/a (not supported yet)"


def _not_supported(exc: BaseException) -> Unavailable:
    return Unavailable(f"{NOT_SUPPORTED[:-1]}: {reason(exc)})")


@dataclasses.dataclass
class SharedResult(HitResult):
    commands: str = ""  # Redis commands sent per hit, with their names
    per_hit: float | None = None  # client commands per hit (a number, for the targets)
    server_us: float | None = None  # Redis time per hit: the sent commands' durations
    process_us: float | None = None  # Redis process CPU per hit (user + sys), all included


@dataclasses.dataclass
class SharedResults:
    sync: list[SharedResult]
    asyn: list[SharedResult]
    disk: list[SharedResult]
    server: str  # the private server's version, or why there is none
    redis_na: str | None = None  # why no Redis row could run (no server binary, no redis-py)


@dataclasses.dataclass
class Env:
    """What a row's build function may use."""

    url: str = ""
    client: Any = None  # redis.Redis (sync rows)
    aclient: Any = None  # redis.asyncio.Redis (async rows)
    disk: Any = None  # diskcache.Cache (disk rows)
    cleanup: list[Callable[[], Any]] = dataclasses.field(default_factory=list)


Built = tuple[Callable[..., Any], tuple[Any, ...]]  # (fn, args): fn(*args) is one hit
Build = Callable[[Env, Callable[[Any], Any]], Built]


def _na(exc: BaseException) -> str:
    text = reason(exc)
    return text if text.startswith("n/a") else f"n/a: {text}"


def _data_serializer() -> Any:
    from stampede.serializers import DataSerializer

    return DataSerializer()


# -- Redis, sync --------------------------------------------------------------------------


def _redis_floor(env: Env, src: Callable[[Any], Any]) -> Built:
    get, loads = env.client.get, pickle.loads

    def hit(key: str) -> Any:
        return loads(get(key))

    return hit, (RAW_PICKLE,)


def _redis_data(env: Env, src: Callable[[Any], Any]) -> Built:
    get, loads = env.client.get, _data_serializer().loads

    def hit(key: str) -> Any:
        return loads(get(key))

    return hit, (RAW_DATA,)


def _read_script() -> str:
    from stampede.backends import redis as redis_backend

    script = getattr(redis_backend, "_READ", None)
    if not isinstance(script, str):
        raise Unavailable("n/a: stampede's read script (`stampede.backends.redis._READ`) moved")
    return script


def _redis_evalsha_pickle(env: Env, src: Callable[[Any], Any]) -> Built:
    # stampede's read script (STRLEN + GET + PTTL) over the pickled value: what a
    # read cost when it was a script (now only for entries longer than the prefix).
    script = _read_script()
    sha = env.client.script_load(script)
    if sha != hashlib.sha1(script.encode()).hexdigest():
        raise RuntimeError("SCRIPT LOAD answered an unexpected sha")
    evalsha, loads = env.client.evalsha, pickle.loads

    def hit(key: str) -> Any:
        data, _pttl = evalsha(sha, 1, key, 1 << 20)
        return loads(data)

    return hit, (RAW_PICKLE,)


def _redis_read_pickle(env: Env, src: Callable[[Any], Any]) -> Built:
    # stampede's read (GETRANGE + PTTL, pipelined on a pooled connection) over the
    # pickled value: the read's own cost (internals: may move).
    try:
        from stampede.backends.redis import _Link, _prefix
    except ImportError as exc:
        raise Unavailable("n/a: stampede's read (`stampede.backends.redis._Link`) moved") from exc
    get, prefix, loads = _Link(env.client).get, _prefix(1 << 20), pickle.loads

    def hit(key: str) -> Any:
        data, _pttl = get(key, prefix)
        return loads(data)

    return hit, (RAW_PICKLE,)


def _stampede_store_read(env: Env, src: Callable[[Any], Any]) -> Built:
    # The store's read alone, without the cache around it (internals: may move).
    cache: stampede.CoalescingCache[Any] = stampede.CoalescingCache(env.client, ttl=TTL)
    cache.get_or_load(KEY, functools.partial(src, KEY))
    backend, key = getattr(cache, "_backend", None), getattr(cache, "_make_key", None)
    if backend is None or not callable(key) or not hasattr(backend, "get"):
        raise Unavailable("n/a: the cache's internals moved")
    get = backend.get

    def hit(k: str) -> Any:
        return get(k).value

    return hit, (key(KEY),)


def _stampede_get_or_load(env: Env, src: Callable[[Any], Any]) -> Built:
    cache: stampede.CoalescingCache[Any] = stampede.CoalescingCache(env.client, ttl=TTL)
    return cache.get_or_load, (KEY, functools.partial(src, KEY))


def _stampede_cached(env: Env, src: Callable[[Any], Any]) -> Built:
    @stampede.cached(cache=env.client, ttl=TTL)
    def user(x: str) -> Any:
        return src(x)

    return user, (KEY,)


def _dogpile_region(env: Env) -> Any:
    from dogpile.cache import make_region

    return make_region().configure(
        "dogpile.cache.redis",
        expiration_time=TTL,
        arguments={"url": env.url, "redis_expiration_time": TTL + 60},
    )


def _dogpile_get_or_create(env: Env, src: Callable[[Any], Any]) -> Built:
    return _dogpile_region(env).get_or_create, (KEY, functools.partial(src, KEY))


def _dogpile_decorator(env: Env, src: Callable[[Any], Any]) -> Built:
    @_dogpile_region(env).cache_on_arguments()
    def user(x: str) -> Any:
        return src(x)

    return user, (KEY,)


SYNC_CASES: list[tuple[str, Build]] = [
    (REDIS_FLOOR, _redis_floor),
    (REDIS_DATA, _redis_data),
    (
        "raw redis-py `EVALSHA` of stampede's whole-entry read script + `pickle.loads`",
        _redis_evalsha_pickle,
    ),
    (
        "stampede's read: `GETRANGE` + `PTTL` pipelined + `pickle.loads` (internal)",
        _redis_read_pickle,
    ),
    (
        "stampede's store read alone: read + envelope + DataSerializer decode (internal)",
        _stampede_store_read,
    ),
    (REDIS_GET_OR_LOAD, _stampede_get_or_load),
    (REDIS_CACHED, _stampede_cached),
    ("dogpile redis region `get_or_create` (pickle)", _dogpile_get_or_create),
    ("dogpile redis region `@cache_on_arguments` (pickle)", _dogpile_decorator),
]


# -- Redis, async -------------------------------------------------------------------------


def _async_floor(env: Env, src: Callable[[Any], Any]) -> Built:
    get, loads = env.aclient.get, pickle.loads

    async def hit(key: str) -> Any:
        return loads(await get(key))

    return hit, (RAW_PICKLE,)


def _async_data(env: Env, src: Callable[[Any], Any]) -> Built:
    get, loads = env.aclient.get, _data_serializer().loads

    async def hit(key: str) -> Any:
        return loads(await get(key))

    return hit, (RAW_DATA,)


def _async_stampede_get_or_load(env: Env, src: Callable[[Any], Any]) -> Built:
    try:
        cache: stampede.AsyncCoalescingCache[Any] = stampede.AsyncCoalescingCache(
            env.aclient, ttl=TTL
        )
    except (TypeError, NotImplementedError) as exc:
        raise _not_supported(exc) from exc
    return cache.get_or_load, (KEY, functools.partial(src, KEY))


def _async_stampede_cached(env: Env, src: Callable[[Any], Any]) -> Built:
    async def user(x: str) -> Any:
        return await src(x)

    try:
        fn = stampede.cached(cache=env.aclient, ttl=TTL)(user)
    except (TypeError, NotImplementedError) as exc:
        raise _not_supported(exc) from exc
    return fn, (KEY,)


def _aiocache(env: Env, src: Callable[[Any], Any]) -> Built:
    import aiocache
    from aiocache.serializers import PickleSerializer

    host, port = env.aclient.connection_pool.connection_kwargs["host"], _port(env)
    fn = aiocache.cached(
        ttl=TTL,
        cache=aiocache.RedisCache,
        endpoint=host,
        port=port,
        serializer=PickleSerializer(),
        namespace="bench-shared",
    )(src)
    env.cleanup.append(lambda: fn.cache.close())
    return fn, (KEY,)


def _cashews(**kwargs: Any) -> Build:
    def build(env: Env, src: Callable[[Any], Any]) -> Built:
        import cashews

        cache = cashews.Cache()
        cache.setup(env.url)
        env.cleanup.append(cache.close)
        return cache(ttl=TTL, **kwargs)(src), (KEY,)

    return build


def _port(env: Env) -> int:
    return int(env.aclient.connection_pool.connection_kwargs["port"])


ASYNC_CASES: list[tuple[str, Build]] = [
    (ASYNC_FLOOR, _async_floor),
    (ASYNC_DATA, _async_data),
    (ASYNC_GET_OR_LOAD, _async_stampede_get_or_load),
    (ASYNC_CACHED, _async_stampede_cached),
    ("aiocache redis `cached` (PickleSerializer)", _aiocache),
    ("cashews redis `@cache`", _cashews()),
    ("cashews redis `@cache(lock=True)`", _cashews(lock=True)),
]

_ASYNC_STAMPEDE = (_async_stampede_get_or_load, _async_stampede_cached)


# -- disk ---------------------------------------------------------------------------------


def _disk_floor(env: Env, src: Callable[[Any], Any]) -> Built:
    get, loads = env.disk.get, pickle.loads

    def hit(key: str) -> Any:
        return loads(get(key))

    return hit, (RAW_PICKLE,)


def _disk_data(env: Env, src: Callable[[Any], Any]) -> Built:
    get, loads = env.disk.get, _data_serializer().loads

    def hit(key: str) -> Any:
        return loads(get(key))

    return hit, (RAW_DATA,)


def _disk_own_pickle(env: Env, src: Callable[[Any], Any]) -> Built:
    env.disk.set("bench:raw:object", VALUE)  # diskcache pickles it itself
    return env.disk.get, ("bench:raw:object",)


def _disk_stampede_get_or_load(env: Env, src: Callable[[Any], Any]) -> Built:
    return _stampede_get_or_load(dataclasses.replace(env, client=env.disk), src)


def _disk_stampede_cached(env: Env, src: Callable[[Any], Any]) -> Built:
    return _stampede_cached(dataclasses.replace(env, client=env.disk), src)


def _disk_memoize(env: Env, src: Callable[[Any], Any]) -> Built:
    return env.disk.memoize(expire=TTL)(src), (KEY,)


DISK_CASES: list[tuple[str, Build]] = [
    (DISK_FLOOR, _disk_floor),
    (DISK_DATA, _disk_data),
    ("raw `Cache.get` of the dict (diskcache unpickles it)", _disk_own_pickle),
    ("stampede `CoalescingCache(diskcache.Cache).get_or_load`", _disk_stampede_get_or_load),
    ("stampede `@cached(cache=diskcache.Cache)`", _disk_stampede_cached),
    ("diskcache `memoize`", _disk_memoize),
]


# -- timing -------------------------------------------------------------------------------


def _repeat_number(elapsed: float, number: int, cfg: Config) -> int:
    return max(1, int(number * TIMING[cfg.quick][1] / elapsed))


def _calibrated(row: _Row, cfg: Config) -> None:
    number, elapsed = 4, 0.0
    while elapsed < TIMING[cfg.quick][1] / 4:
        number *= 2
        elapsed = row.run(number)
    row.number = _repeat_number(elapsed, number, cfg)


async def _acalibrated(row: _Row, cfg: Config) -> None:
    number, elapsed = 4, 0.0
    while elapsed < TIMING[cfg.quick][1] / 4:
        number *= 2
        elapsed = await row.run(number)
    row.number = _repeat_number(elapsed, number, cfg)


def _bench_sync(
    cases: list[tuple[str, Build]], env: Env, cfg: Config, what: str, counter: Any = None
) -> list[SharedResult]:
    results, rows, hits = [], [], []
    for label, build in cases:
        progress(f"{what}: {label}")
        result = SharedResult(label, None)
        results.append(result)
        src, calls = counting(lambda x: dict(VALUE))
        try:
            fn, args = build(env, src)
            if fn(*args) != VALUE:
                raise RuntimeError("wrong value returned")
            row = _Row(result, _sync_timer(fn, args), calls, True)
            _calibrated(row, cfg)
        except Exception as exc:
            result.note = _na(exc)
            continue
        rows.append(row)
        hits.append(functools.partial(fn, *args))
    rounds = TIMING[cfg.quick][0]
    for i in range(rounds):
        progress(f"{what}: round {i + 1} of {rounds}")
        for row in rows:
            row.record(row.run(row.number))
    for row, hit in zip(rows, hits, strict=True):
        row.check()
        if counter is not None:
            counter.count(row.result, hit)
    return results


async def _bench_async(
    cases: list[tuple[str, Build]], env: Env, cfg: Config, counter: Any
) -> list[SharedResult]:
    results, rows, hits = [], [], []
    for label, build in cases:
        progress(f"async shared hit: {label}")
        result = SharedResult(label, None)
        results.append(result)

        async def value(x: Any) -> Any:
            return dict(VALUE)

        src, calls = acounting(value)
        try:
            fn, args = build(env, src)
            if await fn(*args) != VALUE:
                raise RuntimeError("wrong value returned")
            row = _Row(result, functools.partial(_await_loop, fn, args), calls, True)
            await _acalibrated(row, cfg)
        except (TypeError, NotImplementedError) as exc:
            # stampede's asyncio Redis support may fail on the first call, not when made
            result.note = _not_supported(exc).args[0] if build in _ASYNC_STAMPEDE else _na(exc)
            continue
        except Exception as exc:
            result.note = _na(exc)
            continue
        rows.append(row)
        hits.append(functools.partial(fn, *args))
    rounds = TIMING[cfg.quick][0]
    for i in range(rounds):
        progress(f"async shared hit: round {i + 1} of {rounds}")
        for row in rows:
            row.record(await row.run(row.number))
    for row, hit in zip(rows, hits, strict=True):
        row.check()
        await counter.acount(row.result, hit)
    return results


# -- counting commands --------------------------------------------------------------------


class CommandCounter:
    """Counts the commands one hit sends to the private server, from its slow log.

    With ``slowlog-log-slower-than 0`` Redis logs every command with the
    address of the client that sent it; the commands a Lua script runs are
    logged too, from a client with no address (no round trip of their own).
    """

    def __init__(self, observer: Any, hits: int, cpu_hits: int) -> None:
        self.observer = observer
        self.hits = hits
        self.cpu_hits = cpu_hits
        self.own = observer.client_info()["addr"]

    @contextlib.contextmanager
    def _logging_all(self) -> Iterator[None]:
        obs = self.observer
        before = obs.config_get("slowlog-*")
        obs.config_set("slowlog-max-len", 100 * self.hits + 100)
        obs.config_set("slowlog-log-slower-than", 0)
        obs.slowlog_reset()
        try:
            yield
        finally:
            obs.config_set("slowlog-log-slower-than", before["slowlog-log-slower-than"])
            obs.config_set("slowlog-max-len", before["slowlog-max-len"])
            obs.slowlog_reset()

    def _read(self) -> tuple[Counter[str], Counter[str], float]:
        sent: Counter[str] = Counter()
        in_script: Counter[str] = Counter()
        usec = 0.0  # the sent commands' own durations (a script's include its commands)
        for entry in self.observer.slowlog_get(100 * self.hits + 100):
            address = _text(entry.get("client_address", b""))
            name = _text(entry["command"]).split(" ", 1)[0].upper()
            if address == self.own:
                continue
            if address.startswith("?") or address.endswith(":0") or not address:
                in_script[name] += 1  # the script's client: no round trip
            else:
                sent[name] += 1
                usec += float(entry.get("duration", 0))
        return sent, in_script, usec

    def _record(
        self, result: SharedResult, sent: Counter[str], in_script: Counter[str], usec: float
    ) -> None:
        total = sum(sent.values())
        result.per_hit = total / self.hits
        result.server_us = usec / self.hits
        names = ", ".join(
            name if n == self.hits else f"{n / self.hits:g} {name}"
            for name, n in sorted(sent.items())
        )
        text = f"{result.per_hit:g}" + (f" ({names})" if names else "")
        if in_script:
            inner = ", ".join(sorted(in_script))
            text += f"; in the script: {inner}"
        result.commands = text

    def _cpu(self, sent: Counter[str]) -> float:
        """Redis µs of the sent commands per hit, from ``INFO commandstats`` after
        ``CONFIG RESETSTAT`` and ``self.cpu_hits`` hits: each call's time is counted
        in whole µs, so many calls make a fair mean (a script's commands are counted
        in its own time and under their names too: only the sent ones are summed)."""
        stats = self.observer.info("commandstats")
        usec = 0.0
        for name in sent:
            usec += float(stats.get(f"cmdstat_{name.lower()}", {}).get("usec", 0))
        return usec / self.cpu_hits

    def _process(self) -> float:
        """The server process's CPU time so far (user + sys), in µs."""
        cpu = self.observer.info("cpu")
        return (float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])) * 1e6

    def count(self, result: SharedResult, hit: Callable[[], Any]) -> None:
        try:
            with self._logging_all():
                for _ in range(self.hits):
                    hit()
                sent, in_script, usec = self._read()
            self.observer.config_resetstat()
            before = self._process()
            for _ in range(self.cpu_hits):
                hit()
            result.process_us = (self._process() - before) / self.cpu_hits
            usec = self._cpu(sent) * self.hits
        except Exception as exc:
            result.commands = _na(exc)
            return
        self._record(result, sent, in_script, usec)

    async def acount(self, result: SharedResult, hit: Callable[[], Any]) -> None:
        try:
            with self._logging_all():
                for _ in range(self.hits):
                    await hit()
                sent, in_script, usec = self._read()
            self.observer.config_resetstat()
            before = self._process()
            for _ in range(self.cpu_hits):
                await hit()
            result.process_us = (self._process() - before) / self.cpu_hits
            usec = self._cpu(sent) * self.hits
        except Exception as exc:
            result.commands = _na(exc)
            return
        self._record(result, sent, in_script, usec)


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


# -- the section --------------------------------------------------------------------------


def _skipped(cases: list[tuple[str, Build]], note: str) -> list[SharedResult]:
    return [SharedResult(label, None, note) for label, _ in cases]


def bench_shared(cfg: Config) -> SharedResults:
    counted = 10 if cfg.quick else 50
    try:
        import redis  # noqa: F401  (the client rows need it)

        from tests.support.redis_server import RedisServer

        server = RedisServer()
        server.start()
    except Exception as exc:
        note = _na(exc)
        progress(f"shared hit: no private Redis server ({note})")
        skipped = "n/a (no Redis server)"
        sync, asyn = _skipped(SYNC_CASES, skipped), _skipped(ASYNC_CASES, skipped)
        return SharedResults(sync, asyn, _bench_disk(cfg), note, note)
    try:
        with contextlib.ExitStack() as stack:
            stack.callback(server.stop)
            sync, asyn, version = _bench_redis(server, stack, cfg, counted)
    except Exception as exc:  # the server or the section's own setup failed: no Redis rows
        note = _na(exc)
        progress(f"shared hit: the Redis rows failed ({note})")
        skipped = "n/a (Redis setup failed)"
        sync, asyn = _skipped(SYNC_CASES, skipped), _skipped(ASYNC_CASES, skipped)
        return SharedResults(sync, asyn, _bench_disk(cfg), note, note)
    return SharedResults(sync, asyn, _bench_disk(cfg), version)


def _bench_redis(
    server: Any, stack: contextlib.ExitStack, cfg: Config, counted: int
) -> tuple[list[SharedResult], list[SharedResult], str]:
    import redis

    observer = server.client()
    stack.callback(observer.close)
    version = f"redis-server {observer.info('server')['redis_version']} (private, loopback)"
    client = redis.Redis.from_url(server.url)  # as a user makes one; hiredis parser if installed
    stack.callback(client.close)
    client.set(RAW_PICKLE, pickle.dumps(VALUE))
    client.set(RAW_DATA, _data_serializer().dumps(VALUE))
    counter = CommandCounter(observer, counted, _cpu_hits(cfg))
    env = Env(url=server.url, client=client)
    sync = _bench_sync(SYNC_CASES, env, cfg, "shared hit (Redis)", counter)
    asyn = asyncio.run(_bench_redis_async(server.url, cfg, counter))
    return sync, asyn, version


async def _bench_redis_async(url: str, cfg: Config, counter: CommandCounter) -> list[SharedResult]:
    import redis.asyncio

    aclient = redis.asyncio.Redis.from_url(url)
    env = Env(url=url, aclient=aclient)
    try:
        return await _bench_async(ASYNC_CASES, env, cfg, counter)
    finally:
        for close in reversed(env.cleanup):
            with contextlib.suppress(Exception):
                done = close()
                if asyncio.iscoroutine(done):
                    await done
        await aclient.aclose()


def _bench_disk(cfg: Config) -> list[SharedResult]:
    try:
        import diskcache
    except ImportError as exc:
        return _skipped(DISK_CASES, _na(exc))
    try:
        with tempfile.TemporaryDirectory(prefix="stampede-bench-") as path:
            cache = diskcache.Cache(path)
            try:
                cache.set(RAW_PICKLE, pickle.dumps(VALUE))
                cache.set(RAW_DATA, _data_serializer().dumps(VALUE))
                return _bench_sync(DISK_CASES, Env(disk=cache), cfg, "shared hit (disk)")
            finally:
                cache.close()
    except Exception as exc:
        return _skipped(DISK_CASES, _na(exc))


# -- reporting ----------------------------------------------------------------------------


def _seconds(results: list[SharedResult], label: str) -> float | None:
    return next((r.seconds for r in results if r.label == label), None)


def report_redis(results: list[SharedResult], floor: str, data: str) -> str:
    ref, ref_data = _seconds(results, floor), _seconds(results, data)
    rows = [
        [
            r.label,
            ns(r.seconds),
            ratio(r.seconds, ref),
            ratio(r.seconds, ref_data),
            r.commands or "n/a",
            "n/a" if r.server_us is None else f"{r.server_us:.2f}",
            "n/a" if r.process_us is None else f"{r.process_us:.1f}",
            r.note,
        ]
        for r in results
    ]
    headers = [
        "variant",
        "ns per hit",
        "vs GET + pickle",
        "vs GET + DataSerializer",
        "Redis commands per hit (sent; in the script)",
        "Redis µs per hit (commands)",
        "Redis process CPU µs per hit",
        "note",
    ]
    return table(headers, rows)


def report_disk(results: list[SharedResult]) -> str:
    ref, ref_data = _seconds(results, DISK_FLOOR), _seconds(results, DISK_DATA)
    rows = [
        [r.label, ns(r.seconds), ratio(r.seconds, ref), ratio(r.seconds, ref_data), r.note]
        for r in results
    ]
    return table(
        ["variant", "ns per hit", "vs get + pickle", "vs get + DataSerializer", "note"], rows
    )


def _cpu_hits(cfg: Config) -> int:
    """Hits per row whose Redis time ``INFO commandstats`` sums (after the count)."""
    return 200 if cfg.quick else 10_000


def shared_note(cfg: Config, results: SharedResults) -> str:
    counted = 10 if cfg.quick else 50
    rounds, repeat = TIMING[cfg.quick]
    return (
        f"Server: {results.server}. The value is a dict of ten str/int fields (pickle: "
        f"{len(pickle.dumps(VALUE))} bytes). Each row: the minimum of {rounds} rounds of "
        f"~{repeat:g} s; rounds interleave the rows of a table. The floors read a key "
        "written with `SET` of the encoded value (no expiry, no envelope). Commands per hit: "
        f"{counted} more hits after the timing, with the server's slow log recording every "
        "command: *sent* are the commands the client sent (each one a round trip unless "
        "pipelined), *in the script* those a Lua script ran inside Redis (no round trip). "
        f"Redis µs per hit: `INFO commandstats` after `CONFIG RESETSTAT` and {_cpu_hits(cfg):,} "
        "more hits, the time of the sent commands (a script's includes the commands it ran), "
        "per hit; Redis process CPU: `used_cpu_user + used_cpu_sys` of `INFO cpu` over the "
        "same hits (reading and writing the socket included: what the server spends). "
        "Internal rows call stampede internals to split the time and may go n/a when those move."
    )


def shared_targets(results: SharedResults) -> list[Target]:
    ours = {r.label: r for r in results.sync}
    cached, get_or_load = ours[REDIS_CACHED], ours[REDIS_GET_OR_LOAD]
    measured = [r for r in (cached, get_or_load) if r.per_hit is not None]
    targets = [
        Target(
            "Redis hit: one round trip (commands sent per hit; GETRANGE + PTTL go pipelined)",
            "1 round trip",
            "; ".join(f"{r.per_hit:g} via {_short(r)} ({_names(r)})" for r in measured) or "n/a",
            all(_one_round_trip(r) for r in measured) if measured else None,
        )
    ]
    floor_row = next((r for r in results.sync if r.label == REDIS_FLOOR), None)
    for field, what, digits in (
        ("server_us", "the commands' own time (`INFO commandstats`)", 2),
        ("process_us", "the server process's (`INFO cpu`)", 1),
    ):
        target = _cpu_target(floor_row, (get_or_load, cached), field, what, digits)
        if target is not None:
            targets.append(target)
    targets.append(
        _speed_target(results.sync, REDIS_FLOOR, REDIS_CACHED, REDIS_GET_OR_LOAD, TARGET)
    )
    targets.append(
        _speed_target(results.asyn, ASYNC_FLOOR, ASYNC_CACHED, ASYNC_GET_OR_LOAD, ASYNC_TARGET)
    )
    return targets


def _cpu_target(
    floor: SharedResult | None, ours: tuple[SharedResult, ...], field: str, what: str, digits: int
) -> Target | None:
    """Redis CPU per hit of ``ours`` (``field``: µs per hit) against a ``GET``'s: <= 2x."""
    reference = None if floor is None else getattr(floor, field)
    measured = [getattr(r, field) for r in ours if getattr(r, field) is not None]
    if not reference or not measured:
        return None
    worst = max(measured) / reference
    return Target(
        f"Redis CPU per hit <= 2x a GET: {what}",
        "<= 2x",
        f"{worst:.2f}x ({', '.join(f'{v:.{digits}f}' for v in measured)} µs "
        f"vs GET {reference:.{digits}f} µs)",
        worst <= 2.0,
    )


def _paired(row: SharedResult, floor: SharedResult) -> float | None:
    """The median over rounds of ``row``'s time / the floor's in the same round."""
    pairs = [a / b for a, b in zip(row.rounds, floor.rounds, strict=False) if b > 0]
    return statistics.median(pairs) if pairs else None


def _speed_target(
    results: list[SharedResult], floor_label: str, cached_label: str, gol_label: str, limit: float
) -> Target:
    rows = {r.label: r for r in results}
    floor, cached, gol = rows.get(floor_label), rows.get(cached_label), rows.get(gol_label)
    asynchronous = floor_label == ASYNC_FLOOR
    what = (
        f"Redis hit{', async,' if asynchronous else ''} <= {limit}x raw GET + decode "
        f"(redis-py {'`await client.get()`' if asynchronous else '`GET`'} + `pickle.loads`; "
        "median over rounds of the paired ratio)"
    )
    if floor is None or cached is None or gol is None:
        return Target(what, f"<= {limit}x", "n/a", None)
    worst: float | None = None
    parts = []
    for name, row in (("`@cached`", cached), ("`get_or_load`", gol)):
        paired = _paired(row, floor)
        if paired is None or row.seconds is None or not floor.seconds:
            parts.append(f"{name}: n/a")
            continue
        worst = paired if worst is None else max(worst, paired)
        parts.append(f"{name} {paired:.2f}x (fastest rounds: {row.seconds / floor.seconds:.2f}x)")
    return Target(what, f"<= {limit}x", "; ".join(parts), None if worst is None else worst <= limit)


def _names(result: SharedResult) -> str:
    return result.commands.split("(", 1)[-1].split(")")[0]


def _one_round_trip(result: SharedResult) -> bool:
    """One command per hit, or stampede's read: GETRANGE and PTTL, written together
    in one send on one connection (``_Link.get``), one reply each."""
    return result.per_hit == 1 or (result.per_hit == 2 and _names(result) == "GETRANGE, PTTL")


def _short(result: SharedResult) -> str:
    return "`@cached`" if result.label == REDIS_CACHED else "`get_or_load`"

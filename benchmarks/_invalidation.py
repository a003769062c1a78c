"""Section 9: how long an invalidation takes to reach other processes' near caches.

One process writes a key through a stampede cache (``set``), again and again;
reader processes with a near cache on the same Redis (a private
``redis-server``) note when each announcement reaches their near cache. The
delay is from the moment the writer called ``set`` (its write and ``PUBLISH``
then run in one script: a message often arrives before ``set`` returns) to
the moment the reader's listener thread handed the message to the near
cache, both on the machine's monotonic clock, which every process on one
machine shares.

The readers' near caches are instrumented (their ``message`` method is wrapped
to note the time): this section calls stampede internals and goes n/a when
those move.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import time
from typing import Any

from _common import Config, progress, reason, table

READERS = 2
GAP_S = 0.005  # between two writes: each message is timed alone


@dataclasses.dataclass
class InvalidationResult:
    delays: list[float]  # seconds, every reader's every message
    writes: int
    readers: int
    missing: int  # messages a reader never noted
    note: str = ""


def _reader(url: str, namespace: str, conn: Any) -> None:
    import redis

    import stampede

    cache: stampede.CoalescingCache[Any] = stampede.CoalescingCache(
        redis.Redis.from_url(url), ttl=60, near_maxsize=100, namespace=namespace
    )
    near: Any = cache._near
    noted: list[tuple[float, str]] = []
    heard = near.message

    def message(data: bytes | str) -> None:
        noted.append((time.monotonic(), data.decode() if isinstance(data, bytes) else data))
        heard(data)

    near.message = message
    end = time.monotonic() + 30
    while not near.ready and time.monotonic() < end:
        time.sleep(0.001)
    conn.send("ready" if near.ready else "not ready")
    conn.recv()  # the writer is done
    conn.send(noted)


def bench_invalidation(cfg: Config) -> InvalidationResult:
    writes = 50 if cfg.quick else 400
    try:
        import redis

        import stampede
        from tests.support.redis_server import RedisServer
    except Exception as exc:
        return InvalidationResult([], 0, 0, 0, f"n/a: {reason(exc)}")
    server = RedisServer()
    try:
        server.start()
    except Exception as exc:
        return InvalidationResult([], 0, 0, 0, f"n/a: {reason(exc)}")
    context = multiprocessing.get_context("spawn")
    pipes, workers = [], []
    namespace = "bench-invalidation"
    try:
        for _ in range(READERS):
            mine, theirs = context.Pipe()
            worker = context.Process(target=_reader, args=(server.url, namespace, theirs))
            worker.start()
            pipes.append(mine)
            workers.append(worker)
        for pipe in pipes:
            if not pipe.poll(60) or pipe.recv() != "ready":
                return InvalidationResult([], 0, READERS, 0, "n/a: a reader never subscribed")
        writer: stampede.CoalescingCache[int] = stampede.CoalescingCache(
            redis.Redis.from_url(server.url), ttl=60, namespace=namespace
        )
        done: dict[str, float] = {}
        progress(f"invalidation: {writes} writes, {READERS} readers")
        for i in range(writes):
            key = writer._key(f"k{i}")
            done[key] = time.monotonic()  # type: ignore[index]  # set is called
            writer.set(f"k{i}", i)
            time.sleep(GAP_S)
        time.sleep(0.2)  # the last messages' delivery
        delays: list[float] = []
        missing = 0
        for pipe in pipes:
            pipe.send("done")
            noted = dict((key, at) for at, key in (pipe.recv() if pipe.poll(30) else []))
            for key, written in done.items():
                if key in noted:
                    delays.append(noted[key] - written)
                else:
                    missing += 1
        return InvalidationResult(sorted(delays), writes, READERS, missing)
    except Exception as exc:
        return InvalidationResult([], 0, READERS, 0, f"n/a: {reason(exc)}")
    finally:
        for worker in workers:
            worker.join(10)
            if worker.is_alive():
                worker.kill()
        server.stop()


def report_invalidation(result: InvalidationResult) -> str:
    d = result.delays
    if not d:
        return table(
            ["writes", "readers", "p50 (ms)", "p99 (ms)", "max (ms)", "missed"],
            [[str(result.writes), str(result.readers), "n/a", "n/a", "n/a", result.note or "n/a"]],
        )

    def at(q: float) -> str:
        return f"{d[min(len(d) - 1, int(q * len(d)))] * 1e3:.3f}"

    return table(
        ["writes", "readers", "p50 (ms)", "p99 (ms)", "max (ms)", "missed"],
        [
            [
                f"{result.writes:,}",
                str(result.readers),
                at(0.5),
                at(0.99),
                f"{d[-1] * 1e3:.3f}",
                str(result.missing),
            ]
        ],
    )


INVALIDATION_NOTE = (
    "One process `set`s {writes:,} keys through a stampede cache, {gap:g} ms apart, on a "
    "private Redis; {readers} other processes (spawn) with a near cache on the namespace note "
    "when each key's announcement reaches their near cache. Delay: from the writer calling "
    "`set` (write and `PUBLISH` in one script, one round trip) to the reader's listener "
    "handing the message over, on the monotonic clock the processes share. Missed: messages a "
    "reader never noted (0 expected)."
)

"""A small HTTP/1.1 load generator on asyncio streams: keep-alive connections, fixed duration.

Why not httpx (the example's client) for the throughput runs: the load generator
shares the two cores with the four workers and Redis, and httpx spends a few
hundred µs of CPU per request, which the servers then lack. This client writes
a prebuilt ``GET`` and reads the status line, the headers and ``Content-Length``
bytes, nothing more (about a tenth of that). Every app is driven by the same
code; what it cannot parse (chunked bodies) counts as an error.

- ``closed_loop``: ``connections`` connections each send their next request as
  soon as the previous answer is read, for ``duration`` seconds (like
  ``wrk -c``): throughput;
- with ``rate``, each connection sends one request every ``1 / rate`` s (late
  sends go at once, like ``hey -q``): a steady load below saturation.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

from examples.service.loadtest import server_timing

MAX_CONNECTIONS = 512
MAX_DURATION = 120.0
REQUEST_TIMEOUT = 10.0  # a request not answered by then counts as an error, its connection closed


@dataclass(frozen=True)
class Sample:
    started: float  # time.perf_counter() when sent
    latency: float  # seconds until the whole response was read
    cache: float | None  # seconds of the cache call in the worker (Server-Timing), if any


@dataclass
class LoadResult:
    samples: list[Sample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    elapsed: float = 0.0  # from the first send to the last answer

    @property
    def requests(self) -> int:
        return len(self.samples)

    @property
    def per_second(self) -> float:
        return self.requests / self.elapsed if self.elapsed > 0 else 0.0

    def latencies(self) -> list[float]:
        return sorted(s.latency for s in self.samples)


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, float | None]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = -1
    timing: float | None = None
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "server-timing":
            timing = server_timing(value)
    if length < 0:
        raise ValueError("no Content-Length (chunked answers are not supported)")
    await reader.readexactly(length)
    return status, timing


async def _connection(
    host: str, port: int, request: bytes, end: float, interval: float, out: LoadResult
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        next_send = time.perf_counter()
        while True:
            if interval:
                delay = next_send - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                # Late (a slow answer): send now, and no catch-up burst after (hey -q drops ticks).
                next_send = max(next_send, time.perf_counter()) + interval
            t0 = time.perf_counter()
            if t0 >= end:
                return
            writer.write(request)
            try:
                status, timing = await asyncio.wait_for(_read_response(reader), REQUEST_TIMEOUT)
            except (OSError, ValueError, asyncio.IncompleteReadError, TimeoutError) as exc:
                out.errors.append(f"{type(exc).__name__}: {exc}")
                return  # the connection is in an unknown state: drop it
            if status != 200:
                out.errors.append(f"HTTP {status}")
                continue
            out.samples.append(Sample(t0, time.perf_counter() - t0, timing))
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def load(
    url_host: str,
    port: int,
    path: str,
    *,
    connections: int,
    duration: float,
    rate: float = 0.0,
) -> LoadResult:
    """``connections`` keep-alive connections ``GET path`` for ``duration`` s (``rate``/s each)."""
    if not 1 <= connections <= MAX_CONNECTIONS:
        raise ValueError(f"1..{MAX_CONNECTIONS} connections, not {connections}")
    if not 0 < duration <= MAX_DURATION:
        raise ValueError(f"a run lasts (0, {MAX_DURATION:g}] s, not {duration}")
    request = f"GET {path} HTTP/1.1\r\nHost: {url_host}:{port}\r\n\r\n".encode("latin-1")
    out = LoadResult()
    interval = 1.0 / rate if rate > 0 else 0.0
    start = time.perf_counter()
    end = start + duration
    tasks = [
        asyncio.ensure_future(_connection(url_host, port, request, end, interval, out))
        for _ in range(connections)
    ]
    done, pending = await asyncio.wait(tasks, timeout=duration + REQUEST_TIMEOUT + 5)
    for task in pending:
        task.cancel()
        out.errors.append("connection still busy past the run's bound")
    await asyncio.gather(*pending, return_exceptions=True)
    for task in done:
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            out.errors.append(f"{type(exc).__name__}: {exc}")
    last = max((s.started + s.latency for s in out.samples), default=start)
    out.elapsed = last - start
    return out

"""The example service as processes: uvicorn with N workers, and reaching each worker.

``Service`` starts ``uvicorn examples.service.app:app --workers N`` on a free
loopback port in a session of its own and stops the whole group.
``wait_for_workers`` and ``worker_stats`` meet every worker through new
connections (a client cannot address a worker directly).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]  # the repository root: where `examples` imports from
APP = "examples.service.app:app"


# -- reaching every worker -------------------------------------------------------------


async def _fresh_connection_get(client: httpx.AsyncClient, url: str) -> dict[str, Any] | None:
    try:
        response = await client.get(url)
        if response.status_code != 200:
            return None
        body: dict[str, Any] = response.json()
        return body
    except (httpx.HTTPError, ValueError):
        return None


async def _by_pid(url: str, workers: int, deadline: float) -> dict[int, dict[str, Any]]:
    # No keep-alive: every probe is a new connection, and the kernel hands each new
    # connection to whichever worker accepts first, so repeated probes meet them all.
    found: dict[int, dict[str, Any]] = {}
    end = time.monotonic() + deadline
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=2.0, limits=limits) as client:
        while len(found) < workers and time.monotonic() < end:
            bodies = await asyncio.gather(*(_fresh_connection_get(client, url) for _ in range(8)))
            for body in bodies:
                if body is not None and isinstance(body.get("pid"), int):
                    found.setdefault(body["pid"], body)
            if len(found) < workers:
                await asyncio.sleep(0.05)
    return found


async def wait_for_workers(service_url: str, workers: int, deadline: float = 60.0) -> set[int]:
    """The pids of ``workers`` workers answering /healthz; ``TimeoutError`` past ``deadline``."""
    found = await _by_pid(f"{service_url}/healthz", workers, deadline)
    if len(found) < workers:
        raise TimeoutError(
            f"{len(found)} of {workers} workers answered /healthz within {deadline:g} s"
        )
    return set(found)


async def worker_stats(
    service_url: str, workers: int, deadline: float = 15.0
) -> dict[int, dict[str, Any]]:
    """/stats of as many of the ``workers`` as answer within ``deadline`` (by pid)."""
    return await _by_pid(f"{service_url}/stats", workers, deadline)


def total(stats: Mapping[int, Mapping[str, Any]], counter: str) -> int:
    """A counter summed over the workers' /stats."""
    return sum(int(s["stats"][counter]) for s in stats.values())


# -- the service as a subprocess --------------------------------------------------------


@dataclass
class Service:
    """``uvicorn examples.service.app:app --workers N`` (or ``app``) on a free loopback port.

    Started in a session of its own, so ``stop()`` reaches every worker: SIGTERM
    to the group (graceful: each worker closes its clients), then SIGKILL to
    whatever is left. The output goes to a log file (``log_tail()``).
    """

    redis_url: str
    origin_url: str
    workers: int = 4
    ttl: float = 60.0
    stale_ttl: float = 30.0
    namespace: str = field(default_factory=lambda: f"example-{uuid.uuid4().hex[:8]}")
    env: Mapping[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 0
    app: str = APP  # the ASGI app uvicorn imports (benchmarks run peers' apps the same way)
    process: subprocess.Popen[bytes] | None = None
    log_path: str = ""

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> Service:
        from tests.support.redis_server import pick_free_port

        if self.port == 0:
            self.port = pick_free_port(self.host)
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "REDIS_URL": self.redis_url,
            "ORIGIN_URL": self.origin_url,
            "CACHE_TTL": str(self.ttl),
            "CACHE_STALE_TTL": str(self.stale_ttl),
            "CACHE_NAMESPACE": self.namespace,
            **self.env,
        }
        handle, self.log_path = tempfile.mkstemp(prefix="stampede-example-", suffix=".log")
        with os.fdopen(handle, "wb") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    *("-m", "uvicorn", self.app),
                    *("--host", self.host, "--port", str(self.port)),
                    *("--workers", str(self.workers)),
                    "--no-access-log",  # 10,000 log lines would cost more than the requests
                ],
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    async def wait_ready(self, deadline: float = 60.0) -> set[int]:
        """Every worker's pid, once each answers /healthz."""
        task = asyncio.ensure_future(wait_for_workers(self.url, self.workers, deadline))
        while not task.done():
            if self.process is not None and self.process.poll() is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                raise RuntimeError(f"uvicorn exited early:\n{self.log_tail()}")
            await asyncio.wait({task}, timeout=0.1)
        try:
            return task.result()
        except TimeoutError:
            raise TimeoutError(f"workers not all up:\n{self.log_tail()}") from None

    def stop(self, grace: float = 10.0) -> None:
        process = self.process
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(grace)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # stragglers: workers, the resource tracker
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(5)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = Path(self.log_path).read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def remove_log(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.log_path)

    def __enter__(self) -> Service:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        if exc_type is None:
            self.remove_log()

"""Cancellation on a Redis-backed async cache: callers withdraw on time, leases are freed.

redis-py's asyncio client sends every command through ``asyncio.wait_for``
(``AbstractConnection.send_packed_command``, when the client has a socket
timeout). On Python <= 3.11 that function runs the socket write as a task of
its own and, when the caller is cancelled just as that task finishes, returns
the write's result instead of raising: the cancellation is swallowed. A caller
under ``asyncio.timeout`` then went on to wait for the whole load. stampede
raises such a cancellation itself once the store operation returns
(``SharedStore._acall``, Python 3.11+: ``Task.cancelling()``).

Run against a private server (``tests/support/redis_server.py``); no mocks.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import redis
import redis.asyncio

from stampede import AsyncCoalescingCache

needs_cancelling = pytest.mark.skipif(
    sys.version_info < (3, 11),
    reason="Python 3.10 has no Task.cancelling(): a cancellation that redis-py swallows "
    "cannot be seen, so stampede cannot raise it (the limit in docs/guarantees.md)",
)


# -- redis-py's own behaviour, pinned -------------------------------------------------


@pytest.mark.timeout(30)
def test_redis_py_swallows_a_cancel_that_lands_as_its_socket_write_ends(
    aredis_client: Callable[..., redis.asyncio.Redis],
) -> None:
    """A plain ``redis.asyncio`` client, no stampede: the caller is cancelled at the
    moment the command's socket write (the inner task of ``asyncio.wait_for`` in
    ``send_packed_command``) finishes. On Python <= 3.11 the command returns its
    reply as if nothing happened; the cancellation stays requested on the task
    (``cancelling() == 1``) but is never raised. That is what ``SharedStore._acall``
    checks for. The task factory is how the test lands the cancel in that window
    deterministically; it changes nothing in what redis-py does."""

    async def main() -> tuple[int, Any, int]:
        client = aredis_client(socket_timeout=5.0)  # wait_for is used with a socket timeout
        await client.set("k", b"v")
        loop = asyncio.get_running_loop()
        caller: asyncio.Task[Any] | None = None
        writes = 0

        def factory(
            loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any], **kwargs: Any
        ) -> asyncio.Task[Any]:
            nonlocal writes
            task = asyncio.Task(coro, loop=loop, **kwargs)
            if caller is not None and coro.__qualname__.endswith("._send_packed_command"):
                writes += 1
                # Registered before wait_for's own callback: runs first.
                task.add_done_callback(lambda _: caller.cancel())
            return task

        async def get() -> Any:
            nonlocal caller
            caller = asyncio.current_task()
            try:
                return await client.get("k")
            except asyncio.CancelledError:
                return "raised CancelledError"

        loop.set_task_factory(factory)
        try:
            task = loop.create_task(get())
            got = await task
        finally:
            loop.set_task_factory(None)
            await client.aclose()
        requested = task.cancelling() if sys.version_info >= (3, 11) else -1
        return writes, got, requested

    writes, got, requested = asyncio.run(main())
    where = f"redis-py {redis.__version__} on Python {sys.version.split()[0]}"
    if sys.version_info >= (3, 12):
        # asyncio.wait_for (built on asyncio.timeout since 3.12) awaits the write in
        # the caller's own task: there is no inner task, so no window to swallow in.
        assert writes == 0 and got == b"v", (
            f"{where} now sends through a task of its own: a cancel can race it again. "
            "Check whether it is swallowed, and revisit SharedStore._acall's check and "
            "the cancellation limit in docs/guarantees.md"
        )
        return
    assert writes == 1, f"{where} no longer writes through asyncio.wait_for: revisit this test"
    assert got == b"v", (
        f"{where} now raises a cancellation that lands as its socket write ends "
        f"(got {got!r}): the upstream swallowing is fixed; SharedStore._acall's check "
        "is then a no-op, and the cancellation limit in docs/guarantees.md can go"
    )
    if requested != -1:
        assert requested == 1, f"{where}: the swallowed cancel is no longer left requested"


# -- stampede: callers withdraw on time ----------------------------------------------

CALLERS = 300  # enough that the callers' timeouts land while many of them are mid-read
ROUNDS = 5


@needs_cancelling
@pytest.mark.timeout(120)
@pytest.mark.parametrize("distributed", [False, True], ids=["local", "distributed"])
def test_callers_under_a_timeout_withdraw_before_the_load_ends(
    aredis_client: Callable[..., redis.asyncio.Redis], distributed: bool
) -> None:
    """Many callers of one key, each under ``asyncio.timeout(0.05)``, whose load
    ends only once every caller is done (or after 10 s): each caller times out, none
    waits for the load. Before the fix, a caller whose cancel redis-py swallowed in
    the store read went on to wait for the whole load."""

    async def main() -> None:
        client = aredis_client()
        cache: AsyncCoalescingCache[str] = AsyncCoalescingCache(
            client, ttl=60, distributed=distributed
        )
        try:
            for round_ in range(ROUNDS):
                opened = asyncio.Event()

                async def load(opened: asyncio.Event = opened) -> str:
                    await opened.wait()
                    return "v"

                async def caller(key: str) -> str:
                    try:
                        async with asyncio.timeout(0.05):
                            await cache.get_or_load(key, load)
                    except TimeoutError:
                        return "timed out"
                    return "value"

                tasks = [asyncio.create_task(caller(f"k{round_}")) for _ in range(CALLERS)]
                _, waiting = await asyncio.wait(tasks, timeout=10.0)
                opened.set()  # the load ends only now
                outcomes = await asyncio.gather(*tasks)
                assert not waiting, (
                    f"round {round_}: {len(waiting)} of {CALLERS} callers stayed past their "
                    "timeout until the load ended (a cancellation swallowed by redis-py)"
                )
                assert set(outcomes) == {"timed out"}
        finally:
            await client.aclose()

    asyncio.run(main())

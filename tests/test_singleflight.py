"""SingleFlight (threads) and AsyncSingleFlight (asyncio): contract items 1-7."""

from __future__ import annotations

import asyncio
import gc
import threading
from typing import Any

import pytest

from stampede import (
    AsyncSingleFlight,
    BlockingWaitInLoop,
    LoadAbandoned,
    LoadTimeout,
    RecursiveLoad,
    SingleFlight,
)
from stampede.testing import AsyncGate, Gate, async_wait_until, wait_until

from .helpers import join_all, run_threads


def joined(flight: SingleFlight, key: object) -> int:
    call = flight._calls.get(key)
    return 0 if call is None else call.dups


# -- threads ---------------------------------------------------------------------


@pytest.mark.parametrize("trial", range(5))
def test_thousand_threads_one_call(trial: int, fast_switching: None) -> None:
    flight = SingleFlight()
    sentinel = object()
    gate = Gate(sentinel)
    barrier = threading.Barrier(1000)
    results: list[tuple[object, bool]] = []
    lock = threading.Lock()

    def caller() -> None:
        barrier.wait()
        r = flight.do("k", gate)
        with lock:
            results.append(r)

    threads = run_threads(1000, caller)
    wait_until(lambda: joined(flight, "k") == 999, what="999 waiters")
    gate.open()
    join_all(threads)
    assert gate.calls == 1
    assert len(results) == 1000
    assert all(value is sentinel for value, _ in results)
    assert all(shared for _, shared in results)
    assert len(flight) == 0


def test_ungated_burst_never_runs_twice_concurrently(fast_switching: None) -> None:
    """Without a gate, calls may repeat after a flight ends but never overlap."""
    flight = SingleFlight()
    running = 0
    overlaps = 0
    lock = threading.Lock()

    def fn() -> int:
        nonlocal running, overlaps
        with lock:
            running += 1
            overlaps += running > 1
        with lock:
            running -= 1
        return 1

    barrier = threading.Barrier(200)

    def caller() -> None:
        barrier.wait()
        for _ in range(50):
            flight.do("k", fn)

    join_all(run_threads(200, caller))
    assert overlaps == 0
    assert len(flight) == 0


def test_leader_alone_is_not_shared() -> None:
    flight = SingleFlight()
    assert flight.do("k", lambda: 5) == (5, False)
    assert len(flight) == 0


def test_error_reaches_every_waiter_and_key_is_freed() -> None:
    flight = SingleFlight()
    boom = ValueError("boom")
    gate = Gate(error=boom)
    errors: list[BaseException] = []

    def caller() -> None:
        try:
            flight.do("k", gate)
        except BaseException as exc:
            errors.append(exc)

    threads = run_threads(20, caller)
    wait_until(lambda: joined(flight, "k") == 19)
    gate.open()
    join_all(threads)
    assert gate.calls == 1
    assert len(errors) == 20 and all(e is boom for e in errors)
    assert len(flight) == 0
    assert flight.do("k", lambda: 1) == (1, False)


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
def test_base_exception_stays_with_leader_waiters_get_abandoned(
    exc_type: type[BaseException],
) -> None:
    flight = SingleFlight()
    gate = Gate(error=exc_type("stop"))
    seen: list[BaseException] = []
    lock = threading.Lock()

    def caller() -> None:
        try:
            flight.do("k", gate)
        except BaseException as exc:
            with lock:
                seen.append(exc)

    threads = run_threads(10, caller)
    wait_until(lambda: joined(flight, "k") == 9)
    gate.open()
    join_all(threads)
    assert gate.calls == 1
    leaders = [e for e in seen if isinstance(e, exc_type)]
    waiters = [e for e in seen if isinstance(e, LoadAbandoned)]
    assert len(leaders) == 1 and len(waiters) == 9
    assert all(isinstance(w.__cause__, exc_type) for w in waiters)
    assert len(flight) == 0


def test_recursive_call_same_thread_raises_at_once() -> None:
    flight = SingleFlight()

    def fn() -> int:
        with pytest.raises(RecursiveLoad):
            flight.do("k", lambda: 2)
        return 1

    assert flight.do("k", fn) == (1, False)
    assert len(flight) == 0


def test_nested_other_keys_are_fine_but_cycles_are_recursive() -> None:
    flight = SingleFlight()

    def outer() -> int:
        def inner() -> int:
            with pytest.raises(RecursiveLoad):
                flight.do("a", lambda: 0)
            return 2

        value, _ = flight.do("b", inner)
        return value + 1

    assert flight.do("a", outer) == (3, False)


def test_cross_thread_cycle_times_out() -> None:
    """Thread 1 loads a then needs b; thread 2 loads b then needs a."""
    flight = SingleFlight()
    both_leading = threading.Barrier(2)
    outcomes: dict[str, object] = {}

    def load(mine: str, other: str) -> None:
        def fn() -> str:
            both_leading.wait(5)
            try:
                flight.do(other, lambda: "never", timeout=0.2)
            except LoadTimeout:
                return "timed out"
            return "no timeout"

        outcomes[mine] = flight.do(mine, fn)[0]

    threads = [threading.Thread(target=load, args=p) for p in (("a", "b"), ("b", "a"))]
    for t in threads:
        t.start()
    join_all(threads)
    # The first wait to run out breaks the cycle; the other may then get a result.
    assert set(outcomes) == {"a", "b"}
    assert "timed out" in outcomes.values()
    assert len(flight) == 0


def test_waiter_timeout_starts_no_extra_call() -> None:
    flight = SingleFlight()
    gate = Gate("v")
    leader = threading.Thread(target=flight.do, args=("k", gate), daemon=True)
    leader.start()
    gate.entered.wait(5)
    with pytest.raises(LoadTimeout):
        flight.do("k", gate, timeout=0.01)
    gate.open()
    join_all([leader])
    assert gate.calls == 1


def test_forget_lets_next_call_start_fresh() -> None:
    flight = SingleFlight()
    first = Gate("old")
    t = threading.Thread(target=flight.do, args=("k", first), daemon=True)
    t.start()
    first.entered.wait(5)
    flight.forget("k")
    assert flight.do("k", lambda: "new") == ("new", False)
    first.open()
    join_all([t])
    # The forgotten call, finishing last, did not remove anybody else's entry.
    assert len(flight) == 0


def test_forgotten_call_does_not_remove_the_new_one() -> None:
    flight = SingleFlight()
    first, second = Gate("old"), Gate("new")
    t1 = threading.Thread(target=flight.do, args=("k", first), daemon=True)
    t1.start()
    first.entered.wait(5)
    flight.forget("k")
    t2 = threading.Thread(target=flight.do, args=("k", second), daemon=True)
    t2.start()
    second.entered.wait(5)
    first.open()
    join_all([t1])
    assert len(flight) == 1  # the second call is still in flight and joinable
    second.open()
    join_all([t2])
    assert len(flight) == 0


def test_million_distinct_keys_leave_nothing_behind() -> None:
    flight = SingleFlight()
    for i in range(1_000_000):
        flight.do(i, int)
    assert len(flight) == 0
    assert flight._calls == {}


def test_sync_wait_inside_running_loop_is_an_error_not_a_freeze() -> None:
    flight = SingleFlight()
    gate = Gate("v")
    t = threading.Thread(target=flight.do, args=("k", gate), daemon=True)
    t.start()
    gate.entered.wait(5)

    async def inside_loop() -> None:
        with pytest.raises(BlockingWaitInLoop):
            flight.do("k", gate)

    asyncio.run(inside_loop())
    gate.open()
    join_all([t])
    assert gate.calls == 1


# -- asyncio ---------------------------------------------------------------------


def test_ten_thousand_tasks_one_call() -> None:
    async def main() -> None:
        flight = AsyncSingleFlight()
        sentinel = object()
        gate = AsyncGate(sentinel)
        tasks = [asyncio.ensure_future(flight.do("k", gate)) for _ in range(10_000)]
        await async_wait_until(lambda: gate.calls == 1 and _async_joined(flight, "k") == 9_999)
        gate.open()
        results = await asyncio.gather(*tasks)
        assert gate.calls == 1
        assert all(v is sentinel and shared for v, shared in results)
        assert len(flight) == 0
        assert flight._maps == {}

    asyncio.run(main())


def _async_joined(flight: AsyncSingleFlight, key: object) -> int:
    return sum(calls[key].dups for calls in flight._maps.values() if key in calls)


def test_first_caller_cancelled_others_get_the_value() -> None:
    async def main() -> None:
        flight = AsyncSingleFlight()
        gate = AsyncGate("v")
        first = asyncio.ensure_future(flight.do("k", gate))
        await gate.entered.wait()
        others = [asyncio.ensure_future(flight.do("k", gate)) for _ in range(5)]
        await async_wait_until(lambda: _async_joined(flight, "k") == 5)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        gate.open()
        assert [v for v, _ in await asyncio.gather(*others)] == ["v"] * 5
        assert gate.calls == 1 and gate.cancelled == 0

    asyncio.run(main())


def test_one_waiter_cancelled_only_it_fails() -> None:
    async def main() -> None:
        flight = AsyncSingleFlight()
        gate = AsyncGate("v")
        tasks = [asyncio.ensure_future(flight.do("k", gate)) for _ in range(5)]
        await async_wait_until(lambda: _async_joined(flight, "k") == 4)
        tasks[2].cancel()
        gate.open()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(results[2], asyncio.CancelledError)
        assert [r for i, r in enumerate(results) if i != 2] == [("v", True)] * 4

    asyncio.run(main())


def test_all_callers_leave_the_load_still_completes() -> None:
    """Documented: the load task runs to its end even with nobody waiting."""

    async def main() -> None:
        flight = AsyncSingleFlight()
        gate = AsyncGate("v")
        done: list[str] = []

        async def fn() -> str:
            value = await gate()
            done.append(value)
            return value

        tasks = [asyncio.ensure_future(flight.do("k", fn)) for _ in range(3)]
        await gate.entered.wait()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert len(flight) == 1  # still running
        gate.open()
        await async_wait_until(lambda: len(flight) == 0)
        assert done == ["v"]

    asyncio.run(main())


def test_async_error_reaches_every_waiter() -> None:
    async def main() -> None:
        flight = AsyncSingleFlight()
        boom = ValueError("boom")
        gate = AsyncGate(error=boom)
        tasks = [asyncio.ensure_future(flight.do("k", gate)) for _ in range(10)]
        await async_wait_until(lambda: _async_joined(flight, "k") == 9)
        gate.open()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(r is boom for r in results)
        assert gate.calls == 1 and len(flight) == 0

    asyncio.run(main())


def test_async_load_task_cancelled_gives_waiters_load_abandoned() -> None:
    async def main() -> None:
        flight = AsyncSingleFlight()
        gate = AsyncGate("v")
        tasks = [asyncio.ensure_future(flight.do("k", gate)) for _ in range(3)]
        await async_wait_until(lambda: _async_joined(flight, "k") == 2)
        (calls,) = flight._maps.values()
        calls["k"].task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, LoadAbandoned) for r in results)
        assert len(flight) == 0

    asyncio.run(main())


@pytest.mark.parametrize("how", ["same task", "child task"])
def test_async_recursion_raises(how: str) -> None:
    async def main() -> None:
        flight = AsyncSingleFlight()

        async def again() -> int:
            return (await flight.do("k", _constant(2)))[0]

        async def fn() -> int:
            if how == "same task":
                with pytest.raises(RecursiveLoad):
                    await again()
            else:
                with pytest.raises(RecursiveLoad):
                    await asyncio.ensure_future(again())
            return 1

        assert await flight.do("k", fn) == (1, False)

    asyncio.run(asyncio.wait_for(main(), 5))


def _constant(v: int) -> Any:
    async def fn() -> int:
        return v

    return fn


def test_async_cross_task_cycle_times_out() -> None:
    async def main() -> None:
        flight = AsyncSingleFlight()
        both = asyncio.Barrier(2) if hasattr(asyncio, "Barrier") else None
        entered = {"a": asyncio.Event(), "b": asyncio.Event()}

        def loader(mine: str, other: str) -> Any:
            async def fn() -> str:
                entered[mine].set()
                if both is not None:
                    await both.wait()
                else:
                    await entered[other].wait()
                try:
                    await flight.do(other, _constant(0), timeout=0.1)
                except LoadTimeout:
                    return "timed out"
                return "no timeout"

            return fn

        a = asyncio.ensure_future(flight.do("a", loader("a", "b")))
        b = asyncio.ensure_future(flight.do("b", loader("b", "a")))
        results = [r[0] for r in await asyncio.gather(a, b)]
        assert "timed out" in results  # the first timeout breaks the cycle

    asyncio.run(asyncio.wait_for(main(), 5))


def test_async_waiter_timeout() -> None:
    async def main() -> None:
        flight = AsyncSingleFlight()
        gate = AsyncGate("v")
        first = asyncio.ensure_future(flight.do("k", gate))
        await gate.entered.wait()
        with pytest.raises(LoadTimeout):
            await flight.do("k", gate, timeout=0.01)
        gate.open()
        assert await first == ("v", True)
        assert gate.calls == 1

    asyncio.run(main())


def test_async_flight_works_across_event_loops() -> None:
    flight = AsyncSingleFlight()
    for i in range(3):
        assert asyncio.run(flight.do("k", _constant(i))) == (i, False)
    assert flight._maps == {}


def test_async_many_distinct_keys_leave_nothing_behind() -> None:
    async def main() -> None:
        flight = AsyncSingleFlight()
        fn = _constant(1)
        for i in range(100_000):
            await flight.do(i, fn)
        assert len(flight) == 0 and flight._maps == {}

    asyncio.run(main())
    gc.collect()

"""Idempotency keys: one execution per key, waits, replays, takeovers, fencing
(DESIGN.md section 8, items 33-37).

Real stores: a dict, a diskcache folder, a private Redis; real processes for the
claims across processes (killed with SIGKILL, paused with SIGSTOP).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

import stampede
import stampede.idempotency
from stampede import (
    AsyncIdempotency,
    BackendUnavailable,
    Idempotency,
    InFlight,
    KeyReused,
    ReplayUnavailable,
)
from stampede.testing import wait_until
from tests.helpers import disk_store, join_all, run_threads

WORKER = Path(__file__).with_name("_idem_worker.py")
STORES = ["memory", "disk", "redis", "postgres"]


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """Each kind of store an ``Idempotency`` takes (sync clients)."""
    if request.param == "memory":
        yield {}
    elif request.param == "disk":
        cache = disk_store(tmp_path)
        yield cache
        cache.close()
    elif request.param == "postgres":
        import psycopg_pool

        url = request.getfixturevalue("pg_url")
        with psycopg_pool.ConnectionPool(url, min_size=1, max_size=8) as pool:
            yield pool
    else:
        url = request.getfixturevalue("redis_url")
        client = redis.Redis.from_url(url)
        yield client
        client.close()


def is_postgres(store: Any) -> bool:
    return type(store).__module__.startswith("psycopg")


class Work:
    """Idempotent work that counts its runs and can be held until released."""

    def __init__(self, value: Any = "done", *, held: bool = False) -> None:
        self.value = value
        self.runs = 0
        self.entered = threading.Event()
        self.release = threading.Event()
        if not held:
            self.release.set()
        self._lock = threading.Lock()

    def __call__(self) -> Any:
        with self._lock:
            self.runs += 1
        self.entered.set()
        assert self.release.wait(30), "never released"
        return self.value


# -- one execution, waits and replays -----------------------------------------------------------


@pytest.mark.timeout(120)
def test_a_thousand_threads_on_one_key_run_it_once(store: Any) -> None:
    idem = Idempotency(store, lease_ttl=5)
    work = Work({"order": 42}, held=True)
    got: list[tuple[Any, bool]] = []
    lock = threading.Lock()

    def call() -> None:
        result = idem.do("order-42", work, fingerprint={"amount": 10})
        with lock:
            got.append(result)

    threads = run_threads(1000, call)
    assert work.entered.wait(30)
    work.release.set()
    join_all(threads, 60)
    assert work.runs == 1 and len(got) == 1000
    assert all(value == {"order": 42} for value, _ in got)
    assert sum(1 for _, replayed in got if not replayed) == 1  # only the one that ran
    assert idem.do("order-42", work, fingerprint={"amount": 10}) == ({"order": 42}, True)
    assert work.runs == 1 and idem.stats().executed == 1


def test_ten_thousand_tasks_on_one_key_run_it_once(redis_url: str) -> None:
    async def main() -> None:
        for store in ({}, redis.asyncio.Redis.from_url(redis_url)):
            idem = AsyncIdempotency(store)
            runs = 0
            gate = asyncio.Event()

            async def work(gate: asyncio.Event = gate) -> int:
                nonlocal runs
                runs += 1
                await gate.wait()
                return 7

            tasks = [asyncio.create_task(idem.do("job", work)) for _ in range(10_000)]
            while runs == 0:
                await asyncio.sleep(0)
            gate.set()
            results = await asyncio.gather(*tasks)
            assert runs == 1 and {value for value, _ in results} == {7}
            assert sum(1 for _, replayed in results if not replayed) == 1

    asyncio.run(asyncio.wait_for(main(), 60))


def test_another_instance_waits_for_the_running_one_and_replays(store: Any) -> None:
    first = Idempotency(store, lease_ttl=5)
    second = Idempotency(store, lease_ttl=5)  # another process's, as far as the store knows
    work = Work("paid", held=True)
    thread = threading.Thread(target=lambda: first.do("k", work))
    thread.start()
    assert work.entered.wait(10)
    out: list[Any] = []
    waiter = threading.Thread(target=lambda: out.append(second.do("k", work)))
    waiter.start()
    wait_until(lambda: second.stats().waited == 1, what="the second instance waiting")
    work.release.set()
    thread.join(10), waiter.join(10)
    assert out == [("paid", True)] and work.runs == 1


def test_a_different_fingerprint_is_refused_while_running_and_after(store: Any) -> None:
    idem = Idempotency(store, lease_ttl=5)
    other = Idempotency(store, lease_ttl=5)
    work = Work("v", held=True)
    thread = threading.Thread(target=lambda: idem.do("k", work, fingerprint=b"body-1"))
    thread.start()
    assert work.entered.wait(10)
    with pytest.raises(KeyReused):
        other.do("k", work, fingerprint=b"body-2")  # running
    with pytest.raises(KeyReused):
        idem.do("k", work, fingerprint=b"body-2")  # running, same instance
    work.release.set()
    thread.join(10)
    with pytest.raises(KeyReused):
        other.do("k", work, fingerprint=b"body-2")  # finished
    # The identical retry replays, on every store (the Powertools regression).
    assert other.do("k", work, fingerprint=b"body-1") == ("v", True)
    assert work.runs == 1 and other.stats().key_reused == 2


def test_reject_mode_answers_in_flight_at_once(store: Any) -> None:
    idem = Idempotency(store, lease_ttl=5)
    strict = Idempotency(store, on_conflict="reject")
    work = Work(held=True)
    thread = threading.Thread(target=lambda: idem.do("k", work))
    thread.start()
    assert work.entered.wait(10)
    with pytest.raises(InFlight) as caught:
        strict.do("k", work)
    assert caught.value.retry_after >= 1
    # A duplicate in the running instance's own process is refused too, not joined.
    same = Idempotency(store, on_conflict="reject")
    held = Work(held=True)
    thread2 = threading.Thread(target=lambda: same.do("k2", held))
    thread2.start()
    assert held.entered.wait(10)
    with pytest.raises(InFlight):
        same.do("k2", held)
    held.release.set()
    thread2.join(10)
    work.release.set()
    thread.join(10)
    assert strict.do("k", work) == ("done", True)


def test_a_wait_past_wait_timeout_is_in_flight(store: Any) -> None:
    idem = Idempotency(store, lease_ttl=5)
    impatient = Idempotency(store, wait_timeout=0.05)
    work = Work(held=True)
    thread = threading.Thread(target=lambda: idem.do("k", work))
    thread.start()
    assert work.entered.wait(10)
    with pytest.raises(InFlight):
        impatient.do("k", work)
    work.release.set()
    thread.join(10)


# -- what is recorded ---------------------------------------------------------------------------


class Declined(Exception):
    pass


def test_exceptions_release_the_key_unless_recorded(store: Any) -> None:
    idem = Idempotency(store, record_errors=(Declined,))
    runs = {"flaky": 0, "declined": 0}

    def flaky() -> str:
        runs["flaky"] += 1
        if runs["flaky"] == 1:
            raise ConnectionError("upstream blip")
        return "ok"

    with pytest.raises(ConnectionError):
        idem.do("a", flaky)
    assert idem.do("a", flaky) == ("ok", False)  # released: the retry ran
    assert idem.stats().released == 1

    def declined() -> str:
        runs["declined"] += 1
        raise Declined("card declined", 402)

    for _ in range(3):
        with pytest.raises(Declined) as caught:
            idem.do("b", declined)
        assert caught.value.args == ("card declined", 402)
    assert runs["declined"] == 1  # recorded: raised again, never run again


def test_an_exception_after_effect_started_is_recorded(store: Any) -> None:
    idem = Idempotency(store)
    runs = 0

    def charge() -> None:
        nonlocal runs
        runs += 1
        claim = stampede.idempotency.current()
        assert claim is not None
        claim.effect_started()
        raise Declined("after the charge")

    idem_errors = Idempotency(store, record_errors=(Declined,), namespace="idem2")
    for target in (idem, idem_errors):
        with pytest.raises(Declined):
            target.do("c", charge)
    # Recorded though not listed (its effect began); raised again only where the
    # type may be rebuilt, else the retry learns it cannot be replayed.
    with pytest.raises(ReplayUnavailable):
        idem.do("c", charge)
    with pytest.raises(Declined):
        idem_errors.do("c", charge)
    assert runs == 2


def test_an_outcome_that_cannot_be_recorded_is_never_run_again(store: Any) -> None:
    idem = Idempotency(store, max_record_size=256)
    runs = 0

    def big() -> str:
        nonlocal runs
        runs += 1
        return "x" * 10_000

    value, replayed = idem.do("big", big)
    assert len(value) == 10_000 and not replayed
    with pytest.raises(ReplayUnavailable):
        idem.do("big", big)

    def odd() -> object:
        nonlocal runs
        runs += 1
        return object()  # not data: the serializer refuses it

    idem.do("odd", odd)
    with pytest.raises(ReplayUnavailable):
        idem.do("odd", odd)
    assert runs == 2 and idem.stats().unreplayable == 2


def test_a_forged_record_is_never_decoded_into_code(redis_client: redis.Redis) -> None:
    import pickle

    idem = Idempotency(redis_client)
    idem.do("k", lambda: "real")
    key = next(k for k in redis_client.scan_iter("*") if not k.endswith((b":fence", b":lease")))
    redis_client.set(key, pickle.dumps(os.system), px=60_000)
    with pytest.raises(ReplayUnavailable, match="cannot be read"):
        idem.do("k", lambda: "again")


def test_the_claim_gives_a_fence_and_a_stable_derived_key(store: Any) -> None:
    idem = Idempotency(store)
    seen: list[tuple[int, str]] = []

    @idem.idempotent(key=lambda order_id, amount: order_id)
    def charge(order_id: str, amount: int) -> int:
        claim = stampede.idempotency.current()
        assert claim is not None
        seen.append((claim.fence, claim.derive_key("payments")))
        if len(seen) == 1:
            raise ConnectionError("released: the next call claims again")
        return amount

    with pytest.raises(ConnectionError):
        charge("o-1", 5)
    assert charge("o-1", 5) == 5 and charge("o-1", 5) == 5
    first, second = (fence for fence, _ in seen)
    assert second > first  # a new claim, a higher fence
    if not is_postgres(store):  # (PostgreSQL: a sequence shared by the keys)
        assert [first, second] == [1, 2]  # +1 on every claim
    assert seen[0][1] == seen[1][1]  # the derived key stays
    with pytest.raises(KeyReused):
        charge("o-1", 6)  # the bound arguments are the fingerprint
    assert stampede.idempotency.current() is None


# -- the store failing ----------------------------------------------------------------


def test_store_down_before_the_claim_refuses_or_runs_unprotected(fresh_redis_server: Any) -> None:
    client = redis.Redis.from_url(fresh_redis_server.url, socket_timeout=0.5)
    fresh_redis_server.stop()
    closed = Idempotency(client)
    runs = 0

    def work() -> str:
        nonlocal runs
        runs += 1
        return "ran"

    with pytest.raises(BackendUnavailable):
        closed.do("k", work)
    assert runs == 0
    open_ = Idempotency(client, on_backend_error="fail-open")
    assert open_.do("k", work) == ("ran", False)
    assert runs == 1 and open_.stats().unprotected == 1


def test_store_down_between_claim_and_commit_still_answers(fresh_redis_server: Any) -> None:
    client = redis.Redis.from_url(fresh_redis_server.url, socket_timeout=0.5)
    idem = Idempotency(client, lease_ttl=1)

    def work() -> str:
        fresh_redis_server.stop()  # after the claim, before the commit
        return "answered"

    assert idem.do("k", work) == ("answered", False)


# -- across processes -----------------------------------------------------------------


def worker(
    where: str, key: str, callers: int, workdir: Path, lease_ttl: float, mode: str
) -> subprocess.Popen[str]:
    args = [where, key, str(callers), str(workdir), str(lease_ttl), mode]
    return subprocess.Popen(
        [sys.executable, str(WORKER), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finished(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def where_of(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if kind == "redis":
        return str(request.getfixturevalue("redis_url"))
    if kind == "postgres":  # (the workers make the table together, on first use)
        return str(request.getfixturevalue("pg_url"))
    folder = tmp_path / "store"
    folder.mkdir(mode=0o700)
    return str(folder)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("kind", ["redis", "disk", "postgres"])
def test_eight_processes_of_25_callers_run_it_once(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    where = where_of(kind, request, tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    procs = [worker(where, "fleet-key", 25, work, 5, "fleet") for _ in range(8)]
    try:
        wait_until(lambda: len(list(work.glob("ready-*"))) == 8, 60, "workers ready")
        (work / "go").touch()
        wait_until(lambda: (work / "runs").exists(), 60, "the run")
        (work / "release").touch()
        reports = [finished(proc) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert len((work / "runs").read_text().splitlines()) == 1
    values = [value for report in reports for value in report["values"]]
    assert len(values) == 200 and len({json.dumps(v) for v in values}) == 1
    assert sum(report["replayed"] for report in reports) == 199


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["redis", "disk"])
def test_a_killed_owner_is_taken_over_after_its_lease(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    where = where_of(kind, request, tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    owner = worker(where, "k", 1, work, 1.0, "owner")
    try:
        wait_until(lambda: len(list(work.glob("running-*"))) == 1, 60, "the owner running")
        owner.kill()  # SIGKILL: no release, no commit
        owner.wait(10)
        (work / "release").touch()
        retry = worker(where, "k", 1, work, 1.0, "owner")
        report = finished(retry)
    finally:
        for proc in (owner,):
            if proc.poll() is None:
                proc.kill()
    assert report["values"] == [{"pid": retry.pid, "fence": 2}] and report["takeovers"] == 1
    assert len((work / "runs").read_text().splitlines()) == 2  # never stuck: it ran again


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["redis", "disk"])
def test_a_paused_owner_resumed_past_its_lease_is_fenced(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    where = where_of(kind, request, tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    owner = worker(where, "k", 1, work, 1.0, "owner")
    try:
        wait_until(lambda: len(list(work.glob("running-*"))) == 1, 60, "the owner running")
        os.kill(owner.pid, signal.SIGSTOP)  # its renewer stops too: the lease runs out
        (work / "release").touch()
        taker = worker(where, "k", 1, work, 1.0, "owner")
        taken = finished(taker)
        os.kill(owner.pid, signal.SIGCONT)
        resumed = finished(owner)
    finally:
        if owner.poll() is None:
            os.kill(owner.pid, signal.SIGCONT)
            owner.kill()
    assert taken["values"] == [{"pid": taker.pid, "fence": 2}]
    assert resumed["values"] == [{"pid": owner.pid, "fence": 1}]  # its caller got its own
    assert resumed["fenced"] == 1  # its commit was refused
    idem = Idempotency(redis.Redis.from_url(where) if kind == "redis" else stampede_disk(where))
    assert idem.do("k", lambda: None, fingerprint="same") == ({"pid": taker.pid, "fence": 2}, True)


def stampede_disk(where: str) -> Any:
    import diskcache

    return diskcache.Cache(where)


@pytest.mark.timeout(60)
def test_work_five_times_its_lease_with_retries_runs_once(redis_url: str) -> None:
    idem = Idempotency(redis.Redis.from_url(redis_url), lease_ttl=0.3)
    other = Idempotency(redis.Redis.from_url(redis_url), lease_ttl=0.3, on_conflict="reject")
    work = Work("slow", held=True)
    thread = threading.Thread(target=lambda: idem.do("slow", work))
    thread.start()
    assert work.entered.wait(10)
    rejected = 0
    end = time.monotonic() + 1.5  # five leases
    while time.monotonic() < end:
        with pytest.raises(InFlight):
            other.do("slow", work)  # never taken over: the lease is renewed
        rejected += 1
        time.sleep(0.1)
    work.release.set()
    thread.join(10)
    assert work.runs == 1 and rejected >= 10
    assert other.do("slow", work) == ("slow", True)


def test_a_retry_at_retention_expiry_runs_once(redis_client: redis.Redis, redis_url: str) -> None:
    idem = Idempotency(redis.Redis.from_url(redis_url), retention=0.2)
    runs = 0
    lock = threading.Lock()

    def work() -> int:
        nonlocal runs
        with lock:
            runs += 1
        time.sleep(0.05)
        return runs

    idem.do("k", work)
    wait_until(
        lambda: not any(
            not k.endswith((b":fence", b":lease")) for k in redis_client.scan_iter("*")
        ),
        what="the record to expire",
    )
    got: list[Any] = []
    threads = run_threads(10, lambda: got.append(idem.do("k", work)))
    join_all(threads)
    assert runs == 2 and {value for value, _ in got} == {2}


def test_a_cancelled_async_waiter_leaves_the_work_running() -> None:
    async def main() -> None:
        idem = AsyncIdempotency()
        gate = asyncio.Event()
        runs = 0

        async def work() -> str:
            nonlocal runs
            runs += 1
            await gate.wait()
            return "kept"

        first = asyncio.create_task(idem.do("k", work))
        second = asyncio.create_task(idem.do("k", work))
        while runs == 0:
            await asyncio.sleep(0)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        gate.set()
        assert await second == ("kept", True)
        assert await idem.do("k", work) == ("kept", True) and runs == 1

    asyncio.run(asyncio.wait_for(main(), 10))


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="on_conflict"):
        Idempotency(on_conflict="maybe")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="retention"):
        Idempotency(retention=0)
    with pytest.raises(TypeError, match="record_errors"):
        Idempotency(record_errors=(int,))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="async"):

        @Idempotency().idempotent(key=lambda: "k")
        async def job() -> None: ...

    with pytest.raises(TypeError, match="cannot keep idempotency records"):
        Idempotency(object())


def test_recursion_is_an_error_not_a_deadlock() -> None:
    idem = Idempotency()

    def again() -> Any:
        return idem.do("k", again)

    with pytest.raises(stampede.RecursiveLoad):
        idem.do("k", again)




def _commands(client: redis.Redis) -> int:
    stats = client.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if k.startswith("cmdstat_"))


def test_local_records_replay_with_no_round_trip_and_never_outlive_the_store(
    redis_client: redis.Redis, redis_url: str
) -> None:
    idem = Idempotency(redis.Redis.from_url(redis_url), local_records=16, retention=0.5)
    runs = 0

    def work() -> int:
        nonlocal runs
        runs += 1
        return runs

    assert idem.do("k", work) == (1, False)
    before = _commands(redis_client)
    assert idem.do("k", work) == (1, True)
    assert _commands(redis_client) - before == 1  # the INFO itself: the replay sent nothing
    other = Idempotency(redis.Redis.from_url(redis_url), local_records=16, retention=0.5)
    assert other.do("k", work) == (1, True)  # learned from the store, with its end
    with pytest.raises(KeyReused):
        idem.do("k", work, fingerprint="another")  # checked on the kept copy too
    wait_until(
        lambda: not any(
            not k.endswith((b":fence", b":lease")) for k in redis_client.scan_iter("*")
        ),
        what="the record to expire",
    )
    assert idem.do("k", work) == (2, False)  # the kept copy ended with the store's
    assert other.do("k", work) == (2, True)


def test_a_redis_cluster_keeps_a_record_its_lease_and_fence_together(redis_cluster: Any) -> None:
    client = redis.RedisCluster.from_url(redis_cluster.url)
    idem = Idempotency(client, lease_ttl=2)
    work = Work({"ok": 1})
    assert idem.do("cluster-key", work) == ({"ok": 1}, False)
    assert idem.do("cluster-key", work) == ({"ok": 1}, True)
    with pytest.raises(KeyReused):
        idem.do("cluster-key", work, fingerprint="other")
    assert work.runs == 1
    client.close()


# -- regressions found in review ---------------------------------------------------------------


def test_an_interrupt_after_the_effect_started_never_runs_again(store: Any) -> None:
    idem = Idempotency(store)
    runs = 0

    def charge() -> None:
        nonlocal runs
        runs += 1
        claim = stampede.idempotency.current()
        assert claim is not None
        claim.effect_started()
        raise KeyboardInterrupt  # a worker shutting down after the charge

    with pytest.raises(KeyboardInterrupt):
        idem.do("k", charge)
    with pytest.raises(ReplayUnavailable):
        idem.do("k", charge)
    assert runs == 1


def test_the_async_caller_running_the_work_is_not_cut_off_by_wait_timeout() -> None:
    async def main() -> None:
        idem = AsyncIdempotency(wait_timeout=0.05)
        gate = asyncio.Event()

        async def long_work() -> str:
            await gate.wait()
            return "done"

        leader = asyncio.create_task(idem.do("k", long_work))
        duplicate = asyncio.create_task(idem.do("k", long_work))
        with pytest.raises(InFlight):
            await duplicate  # a duplicate's wait is bounded
        gate.set()
        assert await leader == ("done", False)  # the caller running it is not

    asyncio.run(asyncio.wait_for(main(), 10))


def test_arguments_that_cannot_be_fingerprinted_say_so() -> None:
    idem = Idempotency()

    class Order:
        def __init__(self, order_id: str) -> None:
            self.id = order_id

    @idem.idempotent(key=lambda order: order.id)
    def charge(order: Order) -> str:
        return order.id

    with pytest.raises(TypeError, match="fingerprint="):
        charge(Order("o-1"))  # its repr changes from one object to the next

    @idem.idempotent(key=lambda order: order.id, fingerprint=lambda order: order.id)
    def charge_fingerprinted(order: Order) -> str:
        return order.id

    assert charge_fingerprinted(Order("o-2")) == charge_fingerprinted(Order("o-2")) == "o-2"
    with pytest.raises(TypeError):
        idem.do("k", lambda: 1, fingerprint={1: "a"})  # {1: ...} and {"1": ...} would merge


def test_a_fence_never_goes_back_while_its_claim_is_renewed() -> None:
    from stampede._idem_stores import CLAIMED, MemoryIdemStore

    store = MemoryIdemStore()
    first = store.claim("k", "t1", "", 0.1, 0.15, 10_000)  # lease 0.1 s, fence kept 0.15 s
    assert (first.state, first.number) == (CLAIMED, 1)
    end = time.monotonic() + 0.5  # renewed well past the fence's first lifetime
    while time.monotonic() < end:
        assert store.lease_renew("k", "t1", 0.1)
        time.sleep(0.02)
    taken = None
    deadline = time.monotonic() + 5
    while taken is None or taken.state != CLAIMED:  # the owner stalls: taken over
        assert time.monotonic() < deadline
        taken = store.claim("k", "t2", "", 0.1, 0.15, 10_000)
    assert taken.number == 2 and taken.takeover


def test_a_claim_whose_lease_lapsed_unclaimed_still_records(store: Any) -> None:
    """The store was away longer than the lease while the work ran: if no one claimed
    the key meanwhile, the outcome is recorded (a retry replays it, never runs it
    again); if someone did, the late commit is refused."""
    from stampede._idem_stores import CLAIMED, DONE

    backend = Idempotency(store)._core.store
    assert backend.claim("a", "t1", "", 0.1, 60, 10_000).state == CLAIMED  # fence 1
    lapsed = time.monotonic() + 0.3
    wait_until(lambda: time.monotonic() > lapsed, what="the lease to run out")
    assert backend.commit("a", "t1", b"record", 60, 1)  # nobody claimed: recorded
    assert backend.claim("a", "t9", "", 0.1, 60, 10_000).state == DONE

    first = backend.claim("b", "t1", "", 0.1, 60, 10_000)
    assert first.state == CLAIMED
    lapsed = time.monotonic() + 0.3
    wait_until(lambda: time.monotonic() > lapsed, what="the lease to run out")
    taken = backend.claim("b", "t2", "", 5, 60, 10_000)
    assert taken.state == CLAIMED and taken.number > first.number
    assert not backend.commit("b", "t1", b"late", 60, int(first.number))  # taken over: refused
    assert backend.commit("b", "t2", b"record", 60, int(taken.number))

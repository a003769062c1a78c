"""Idempotency records in PostgreSQL (DESIGN.md section 8; contract items 33-38, 44).

Against a real server the suite starts itself (``tests/pg_fixtures.py``): each
test gets a fresh database; fault tests get a server of their own to restart.
Both modes: the store's own pool, and the caller's transaction
(``do(..., transaction=conn)``), where a duplicate's claim waits on the unique
index until the first transaction ends. Waits are on events and on the server's
own view of its locks (``pg_locks``), never on sleeps.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import stampede
import stampede.idempotency
from stampede import (
    AsyncIdempotency,
    BackendUnavailable,
    Idempotency,
    InFlight,
    KeyReused,
    _idem_pg,
)
from stampede.backends._shared import StoreBusy
from stampede.testing import wait_until
from tests.helpers import in_thread, join_all, run_threads
from tests.test_idempotency import Work, finished, worker

psycopg = pytest.importorskip("psycopg")
psycopg_pool = pytest.importorskip("psycopg_pool")

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def pool(pg_url: str) -> Iterator[Any]:
    with psycopg_pool.ConnectionPool(pg_url, min_size=1, max_size=8, open=True) as p:
        yield p


def connect(url: str) -> Any:
    return psycopg.connect(url)


def waiting_on_a_lock(url: str, count: int = 1) -> Callable[[], bool]:
    """True once ``count`` backends of the database wait for a lock (the server says so)."""

    def check() -> bool:
        with psycopg.connect(url, autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock'"
            ).fetchone()
        return bool(row and row[0] >= count)

    return check


def sql(url: str, statement: str, params: Any = None) -> list[Any]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(statement, params)
        return cur.fetchall() if cur.description else []


# -- the store's own pool -------------------------------------------------------------------


def test_one_run_for_a_burst_then_replays(pool: Any) -> None:
    idem = Idempotency(pool)
    work = Work({"id": 7}, held=True)
    got: list[Any] = []
    threads = run_threads(20, lambda: got.append(idem.do("order-1", work, fingerprint="a")))
    assert work.entered.wait(10)
    work.release.set()
    join_all(threads)
    assert work.runs == 1 and len(got) == 20
    assert sorted(replayed for _, replayed in got) == [False] + [True] * 19
    again = Idempotency(pool)  # another process would see the same
    assert again.do("order-1", work, fingerprint="a") == ({"id": 7}, True)
    with pytest.raises(KeyReused):
        again.do("order-1", work, fingerprint="b")
    assert work.runs == 1


def test_a_url_makes_its_own_pool_and_table(pg_url: str) -> None:
    idem = Idempotency(pg_url)
    assert idem.do("k", lambda: 1) == (1, False)
    assert idem.do("k", lambda: 2) == (1, True)
    rows = sql(pg_url, f"SELECT key, fingerprint, token, record IS NOT NULL FROM {_idem_pg.TABLE}")
    assert len(rows) == 1 and rows[0][2] is None and rows[0][3] is True
    assert ":idem:" in rows[0][0] and re.search("[0-9a-f]{64}", rows[0][0])  # hashed


def test_a_duplicate_in_another_process_waits_for_the_record(
    pool: Any, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    owner, other = Idempotency(pool), Idempotency(pg_url)  # two shells: as two processes
    woken: list[str] = []
    wake = _idem_pg._Listener._wake

    def spy(listener: Any, key: str | None) -> None:
        if key is not None:
            woken.append(key)  # a NOTIFY the listening connection received
        wake(listener, key)

    monkeypatch.setattr(_idem_pg._Listener, "_wake", spy)
    work = Work("first", held=True)
    thread, out = in_thread(lambda: owner.do("k", work))
    assert work.entered.wait(10)
    waiting, got = in_thread(lambda: other.do("k", work))
    wait_until(lambda: other.stats().waited == 1, what="the duplicate waiting")
    listener = other._core.store.listener
    wait_until(listener.connected.is_set, what="the LISTEN connection")
    work.release.set()
    join_all([thread, waiting])
    assert out == [("first", False)] and got == [("first", True)] and work.runs == 1
    assert len(woken) == 1  # the waiter was woken by the commit's NOTIFY


def test_the_documented_table_is_the_one_created() -> None:
    page = (Path(__file__).resolve().parent.parent / "docs" / "idempotency.md").read_text()
    assert _idem_pg.DDL in page


def test_a_killed_owner_process_is_taken_over_after_its_lease(pg_url: str, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    owner = worker(pg_url, "k", 1, work, 1.0, "owner")
    try:
        wait_until(lambda: len(list(work.glob("running-*"))) == 1, 60, "the owner running")
        first = int(next(work.glob("running-*")).read_text())
        owner.kill()  # SIGKILL: no release, no commit, no more renewals
        owner.wait(10)
        (work / "release").touch()
        retry = worker(pg_url, "k", 1, work, 1.0, "owner")
        report = finished(retry)
    finally:
        if owner.poll() is None:
            owner.kill()
    (value,) = report["values"]
    assert value["pid"] == retry.pid and value["fence"] > first and report["takeovers"] == 1
    assert len((work / "runs").read_text().splitlines()) == 2


def test_a_stale_owners_commit_is_refused(pool: Any, pg_url: str) -> None:
    owner = Idempotency(pool, lease_ttl=30)  # no renewal during the test
    taker = Idempotency(pg_url, lease_ttl=30)
    work = Work("owner's", held=True)
    thread, out = in_thread(lambda: owner.do("k", work))
    assert work.entered.wait(10)
    first = sql(pg_url, f"SELECT fence FROM {_idem_pg.TABLE}")[0][0]
    # The owner stalls past its lease (as under a long pause): the server says it lapsed.
    sql(pg_url, f"UPDATE {_idem_pg.TABLE} SET lease_until = statement_timestamp() - interval '1s'")
    seen: list[int] = []

    def take() -> str:
        claim = stampede.idempotency.current()
        assert claim is not None
        seen.append(claim.fence)
        return "taker's"

    assert taker.do("k", take) == ("taker's", False)
    assert seen[0] > first and taker.stats().takeovers == 1
    work.release.set()
    join_all([thread])
    assert out == [("owner's", False)]  # its caller still gets its own value
    assert owner.stats().fenced == 1  # its commit was refused
    assert Idempotency(pg_url).do("k", work) == ("taker's", True)


def test_a_lapsed_lease_no_one_claimed_still_records(pool: Any, pg_url: str) -> None:
    idem = Idempotency(pool, lease_ttl=30)
    work = Work("kept", held=True)
    thread, out = in_thread(lambda: idem.do("k", work))
    assert work.entered.wait(10)
    sql(pg_url, f"UPDATE {_idem_pg.TABLE} SET lease_until = statement_timestamp() - interval '1s'")
    work.release.set()
    join_all([thread])
    assert out == [("kept", False)] and idem.stats().fenced == 0
    assert Idempotency(pg_url).do("k", work) == ("kept", True) and work.runs == 1


def test_server_restarted_between_claim_and_commit(fresh_pg_server: Any) -> None:
    url = fresh_pg_server.url("postgres")
    idem = Idempotency(url)
    runs = 0

    def work() -> str:
        nonlocal runs
        runs += 1
        fresh_pg_server.restart()  # after the claim, before the commit
        return "answered"

    assert idem.do("k", work) == ("answered", False)
    # The commit went through on a new connection: a retry replays, never runs again.
    assert Idempotency(url).do("k", work) == ("answered", True) and runs == 1


def test_server_down_before_the_claim_raises_or_runs_unprotected(fresh_pg_server: Any) -> None:
    url = fresh_pg_server.url("postgres")
    closed = Idempotency(url)
    assert closed.do("warm", lambda: 0) == (0, False)
    fresh_pg_server.kill()
    with pytest.raises(BackendUnavailable):
        closed.do("k", lambda: 1)
    fail_open = Idempotency(url, on_backend_error="fail-open")
    assert fail_open.do("k", lambda: 2) == (2, False)
    assert fail_open.stats().unprotected == 1


def test_expired_records_are_never_served(pool: Any, pg_url: str) -> None:
    idem = Idempotency(pool)
    assert idem.do("k", lambda: "old") == ("old", False)
    sql(pg_url, f"UPDATE {_idem_pg.TABLE} SET expires_at = statement_timestamp() - interval '1s'")
    # Not swept yet, and still not served: the claim takes an expired row over.
    assert idem.do("k", lambda: "new") == ("new", False)
    assert idem.do("k", lambda: "newer") == ("new", True)


def test_expired_rows_are_removed_in_bounded_batches(
    pool: Any, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    idem = Idempotency(pool)
    idem.do("live", lambda: 1)
    sql(
        pg_url,
        f"INSERT INTO {_idem_pg.TABLE} (key, fingerprint, fence, record, expires_at) "
        "SELECT 'old:' || i, '', i, '\\x00', statement_timestamp() - interval '1s' "
        "FROM generate_series(1, 450) AS i",
    )
    monkeypatch.setattr(_idem_pg, "SWEEP_BATCH", 100)
    monkeypatch.setattr(_idem_pg, "SWEEP_BATCHES", 2)
    store = idem._core.store
    assert store.sweep() == 200  # two statements of 100
    assert store.sweep() == 200
    assert store.sweep() == 50  # a short batch ends the sweep
    assert store.sweep() == 0
    rows = sql(pg_url, f"SELECT count(*) FROM {_idem_pg.TABLE}")
    assert rows == [(1,)] and idem.do("live", lambda: 2) == (1, True)


def test_reject_mode_and_released_keys(pool: Any) -> None:
    idem = Idempotency(pool)
    rejecting = Idempotency(pool, on_conflict="reject")
    work = Work("v", held=True)
    thread, _out = in_thread(lambda: idem.do("k", work))
    assert work.entered.wait(10)
    with pytest.raises(InFlight):
        rejecting.do("k", work)
    work.release.set()
    join_all([thread])

    def fails() -> None:
        raise RuntimeError("not recorded")

    with pytest.raises(RuntimeError):
        idem.do("released", fails)
    assert idem.do("released", lambda: "second try") == ("second try", False)


# -- in the caller's transaction ------------------------------------------------------------


def in_transaction(idem: Idempotency, url: str, key: str, fn: Callable[[], Any], end: str) -> Any:
    """``do`` in a transaction of its own, which ends by ``end`` ("commit"/"rollback")."""
    with connect(url) as conn:
        got = idem.do(key, fn, transaction=conn)
        getattr(conn, end)()
        return got


@pytest.mark.parametrize("first_ends", ["rollback", "commit"])
def test_two_transactions_with_one_key(pool: Any, pg_url: str, first_ends: str) -> None:
    idem = Idempotency(pool)
    first_conn = connect(pg_url)
    runs: list[str] = []
    try:
        first = idem.do(
            "pay-1", lambda: runs.append("first") or "charged once", transaction=first_conn
        )
        assert first == ("charged once", False)
        # The second transaction's claim waits on the unique index for the first.
        second, got = in_thread(
            lambda: in_transaction(
                idem, pg_url, "pay-1", lambda: runs.append("second") or "charged again", "commit"
            )
        )
        wait_until(waiting_on_a_lock(pg_url), what="the second transaction waiting")
        assert runs == ["first"]
        getattr(first_conn, first_ends)()
    finally:
        first_conn.close()
    join_all([second])
    if first_ends == "commit":
        assert got == [("charged once", True)] and runs == ["first"]  # replayed
    else:
        assert got == [("charged again", False)] and runs == ["first", "second"]  # ran once
    assert Idempotency(pool).do("pay-1", lambda: "never") == (got[0][0], True)


def test_the_record_and_the_business_rows_commit_or_roll_back_together(pg_url: str) -> None:
    sql(pg_url, "CREATE TABLE orders (id text PRIMARY KEY, total int)")
    idem = Idempotency(pg_url)
    for end in ("rollback", "commit"):
        with connect(pg_url) as conn:

            def place() -> str:
                conn.execute("INSERT INTO orders VALUES ('o1', 100)")
                return "placed"

            assert idem.do("o1", place, transaction=conn) == ("placed", False)
            getattr(conn, end)()
        count = sql(pg_url, "SELECT count(*) FROM orders")[0][0]
        assert count == (0 if end == "rollback" else 1)
    with connect(pg_url) as conn:
        # Replayed in a later transaction: the insert is not tried again.
        assert idem.do(
            "o1", lambda: conn.execute("INSERT INTO orders VALUES ('o1', 1)"), transaction=conn
        ) == ("placed", True)
        conn.commit()


def test_a_failed_transaction_is_not_written_to(pg_url: str) -> None:
    idem = Idempotency(pg_url)
    with connect(pg_url) as conn:
        with pytest.raises(psycopg.errors.UndefinedTable):
            idem.do("k", lambda: conn.execute("SELECT * FROM missing"), transaction=conn)
        conn.rollback()  # the claim goes with it
    assert idem.do("k", lambda: "ran") == ("ran", False)


def test_an_error_in_the_transaction_releases_the_key_in_it(pg_url: str) -> None:
    idem = Idempotency(pg_url)

    def fails() -> None:
        raise ValueError("card declined")

    with connect(pg_url) as conn:
        with pytest.raises(ValueError):
            idem.do("k", fails, transaction=conn)
        conn.commit()  # the application keeps its transaction: the key is free again
    assert idem.do("k", lambda: "retried") == ("retried", False)


def test_owner_backend_terminated_mid_work(pool: Any, pg_url: str) -> None:
    idem = Idempotency(pool)
    owner_conn = connect(pg_url)
    pid = owner_conn.info.backend_pid
    work = Work("owner", held=True)
    owner, owner_out = in_thread(lambda: idem.do("k", work, transaction=owner_conn))
    assert work.entered.wait(10)
    duplicate, got = in_thread(lambda: in_transaction(idem, pg_url, "k", lambda: "taker", "commit"))
    wait_until(waiting_on_a_lock(pg_url), what="the duplicate waiting")
    sql(pg_url, "SELECT pg_terminate_backend(%s)", (pid,))
    join_all([duplicate])  # the owner's transaction died with its backend: the key is free
    assert got == [("taker", False)]
    work.release.set()
    join_all([owner])
    assert isinstance(owner_out[0], psycopg.OperationalError)  # its record could not be written
    owner_conn.close()
    assert Idempotency(pool).do("k", work) == ("taker", True)


def test_owner_pool_backends_terminated_mid_work_renew_and_record(pg_url: str) -> None:
    """On the store's pool the lease is a row, not a connection: backends killed while
    the work runs (pg_terminate_backend) cost a reconnect, never a second run."""
    kwargs = {"application_name": "owner"}
    with psycopg_pool.ConnectionPool(pg_url, kwargs=kwargs, min_size=2, max_size=4) as pool:
        owner = Idempotency(pool, lease_ttl=3)  # renewed every second
        taker = Idempotency(pg_url, lease_ttl=3, on_conflict="reject")
        work = Work("once", held=True)
        thread, out = in_thread(lambda: owner.do("k", work))
        assert work.entered.wait(10)
        killed = sql(
            pg_url,
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = 'owner' AND datname = current_database()",
        )[0][0]
        assert killed >= 1
        renewed = sql(pg_url, f"SELECT lease_until FROM {_idem_pg.TABLE}")[0][0]
        wait_until(
            lambda: sql(pg_url, f"SELECT lease_until FROM {_idem_pg.TABLE}")[0][0] > renewed,
            what="a renewal on a new connection",
        )
        with pytest.raises(InFlight):
            taker.do("k", work)  # still held: never taken over
        work.release.set()
        join_all([thread])
        assert out == [("once", False)] and owner.stats().fenced == 0
        assert taker.do("k", work) == ("once", True) and work.runs == 1


def test_server_restarted_in_the_transaction_leaves_nothing(fresh_pg_server: Any) -> None:
    url = fresh_pg_server.url("postgres")
    idem = Idempotency(url)
    conn = connect(url)

    def work() -> str:
        fresh_pg_server.restart()
        return "lost with the transaction"

    with pytest.raises(psycopg.OperationalError):
        idem.do("k", work, transaction=conn)
    conn.close()
    assert Idempotency(url).do("k", lambda: "ran once") == ("ran once", False)


def test_transaction_argument_is_checked(pg_url: str, tmp_path: Path) -> None:
    with connect(pg_url) as conn, pytest.raises(TypeError, match="PostgreSQL store"):
        Idempotency({}).do("k", lambda: 1, transaction=conn)
    idem = Idempotency(pg_url)
    with pytest.raises(TypeError, match=r"psycopg\.Connection"):
        idem.do("k", lambda: 1, transaction=object())
    with psycopg.connect(pg_url, autocommit=True) as conn:
        with pytest.raises(ValueError, match="in a transaction"):
            idem.do("k", lambda: 1, transaction=conn)
        with conn.transaction():  # an explicit block on an autocommit connection is fine
            assert idem.do("k", lambda: 1, transaction=conn) == (1, False)
    with pytest.raises(TypeError, match="AsyncConnectionPool"):
        AsyncIdempotency(psycopg_pool.ConnectionPool(pg_url, open=False))


# -- asyncio --------------------------------------------------------------------------------


def test_async_pool_and_transaction(pg_url: str) -> None:
    async def main() -> None:
        idem = AsyncIdempotency(pg_url)
        runs = 0
        gate = asyncio.Event()

        async def work() -> str:
            nonlocal runs
            runs += 1
            await gate.wait()
            return "once"

        tasks = [asyncio.create_task(idem.do("a", work)) for _ in range(10)]
        while runs == 0:
            await asyncio.sleep(0.005)
        gate.set()
        got = await asyncio.gather(*tasks)
        assert runs == 1 and sorted(r for _, r in got) == [False] + [True] * 9

        for end in ("rollback", "commit"):
            async with await psycopg.AsyncConnection.connect(pg_url) as conn:
                assert await idem.do("t", lambda e=end: e, transaction=conn) == (end, False)
                await getattr(conn, end)()
        assert await idem.do("t", lambda: "never") == ("commit", True)

    asyncio.run(main())


def test_async_duplicate_waits_on_an_async_transaction(pg_url: str) -> None:
    async def main() -> None:
        idem = AsyncIdempotency(pg_url)
        first = await psycopg.AsyncConnection.connect(pg_url)
        assert await idem.do("k", lambda: "first", transaction=first) == ("first", False)
        waiting = asyncio.create_task(idem.do("k", lambda: "second"))  # the store's pool
        check = waiting_on_a_lock(pg_url)
        while not await asyncio.to_thread(check):
            await asyncio.sleep(0.01)
        await first.commit()
        await first.close()
        assert await waiting == ("first", True)

    asyncio.run(main())


def test_the_callers_row_factory_and_settings_do_not_matter(pg_url: str) -> None:
    from psycopg.rows import dict_row

    kwargs = {"row_factory": dict_row, "prepare_threshold": None, "connect_timeout": 3}
    with psycopg_pool.ConnectionPool(pg_url, kwargs=kwargs, min_size=1, max_size=2) as pool:
        idem = Idempotency(pool)
        assert idem.do("k", lambda: "v") == ("v", False)
        assert idem.do("k", lambda: "w") == ("v", True)
        with psycopg.connect(pg_url, row_factory=dict_row) as conn:
            assert idem.do("t", lambda: 1, transaction=conn) == (1, False)
            conn.commit()
            assert idem.do("t", lambda: 2, transaction=conn) == (1, True)


# -- what a review found ----------------------------------------------------------------------


def lease_of(url: str) -> Any:
    return sql(url, f"SELECT lease_until FROM {_idem_pg.TABLE}")[0][0]


def test_a_duplicate_in_a_transaction_never_stalls_the_owners_renewals(
    pool: Any, pg_url: str
) -> None:
    """A claim that does not take the key keeps no lock on its row: the owner on the
    pool renews and records while the duplicate's transaction stays open."""
    owner = Idempotency(pool, lease_ttl=1.5)  # renewed every 0.5 s
    work = Work("owner's", held=True)
    thread, out = in_thread(lambda: owner.do("k", work))
    assert work.entered.wait(10)
    with connect(pg_url) as conn:
        duplicate = Idempotency(pg_url, on_conflict="reject")
        with pytest.raises(InFlight):
            duplicate.do("k", lambda: "duplicate's", transaction=conn)
        assert conn.execute("SELECT 1").fetchone() == (1,)  # its transaction still usable
        before = lease_of(pg_url)
        wait_until(lambda: lease_of(pg_url) > before, what="a renewal, the transaction open")
        work.release.set()
        join_all([thread])
        assert out == [("owner's", False)] and owner.stats().fenced == 0
        assert duplicate.do("k", lambda: "never", transaction=conn) == ("owner's", True)
        conn.rollback()
    assert work.runs == 1


def test_a_replay_in_an_open_transaction_blocks_no_one(pool: Any, pg_url: str) -> None:
    idem = Idempotency(pool)
    assert idem.do("k", lambda: "recorded") == ("recorded", False)
    with connect(pg_url) as conn:
        assert idem.do("k", lambda: "never", transaction=conn) == ("recorded", True)
        # The transaction stays open: the others still replay at once.
        rejecting = Idempotency(pg_url, on_conflict="reject", wait_timeout=0.5)
        assert rejecting.do("k", lambda: "never") == ("recorded", True)
        with connect(pg_url) as other:
            assert idem.do("k", lambda: "never", transaction=other) == ("recorded", True)
            other.commit()
        conn.commit()


def test_a_duplicate_of_an_open_transaction_waits_and_keeps_its_own_usable(pg_url: str) -> None:
    idem = Idempotency(pg_url, wait_timeout=0.6)
    with connect(pg_url) as first:
        assert idem.do("k", lambda: "first", transaction=first) == ("first", False)
        with connect(pg_url) as second:
            with pytest.raises(InFlight):  # after wait_timeout: the first still open
                idem.do("k", lambda: "second", transaction=second)
            assert second.execute("SELECT 1").fetchone() == (1,)
            second.rollback()
        first.commit()
    assert idem.do("k", lambda: "never") == ("first", True)


def test_a_full_pool_is_busy_not_a_dead_server(pg_url: str) -> None:
    with psycopg_pool.ConnectionPool(pg_url, min_size=1, max_size=1, timeout=0.2) as pool:
        idem = Idempotency(pool)
        assert idem.do("warm", lambda: 0) == (0, False)
        held = pool.getconn()
        try:
            for _ in range(4):  # past the breaker's threshold: it must not open
                with pytest.raises(StoreBusy):  # (a BackendUnavailable)
                    idem.do("k", lambda: 1)
        finally:
            pool.putconn(held)
        assert idem.do("k", lambda: 1) == (1, False)  # at once: no circuit open


def test_a_commit_retried_after_its_reply_was_lost_is_not_fenced(pool: Any) -> None:
    store = Idempotency(pool)._core.store
    claimed = store.claim("k", "t1", "", 30, 60, 10_000)
    assert claimed.state == _idem_pg.CLAIMED
    fence = int(claimed.number)
    assert store.commit("k", "t1", b"record", 60, fence)
    assert store.commit("k", "t1", b"record", 60, fence)  # the same commit again: done
    assert not store.commit("k", "t2", b"forged", 60, fence + 1)  # another claim's: refused


def test_rows_are_swept_where_the_pool_sees_the_table(pg_url: str) -> None:
    sql(pg_url, "CREATE SCHEMA app")

    def configure(conn: Any) -> None:
        conn.execute("SET search_path TO app")
        conn.commit()

    with psycopg_pool.ConnectionPool(pg_url, configure=configure, min_size=1, max_size=2) as pool:
        idem = Idempotency(pool)
        idem.do("k", lambda: 1)
        table = f"app.{_idem_pg.TABLE}"
        sql(pg_url, f"UPDATE {table} SET expires_at = statement_timestamp() - interval '1s'")
        assert idem._core.store.sweep() == 1
        assert sql(pg_url, f"SELECT count(*) FROM {table}") == [(0,)]


def test_work_that_rolls_its_transaction_back_is_an_error(pg_url: str) -> None:
    idem = Idempotency(pg_url)
    with connect(pg_url) as conn, pytest.raises(stampede.IdempotencyError, match="rolled back"):
        idem.do("k", conn.rollback, transaction=conn)
    assert idem.do("k", lambda: "ran") == ("ran", False)


def test_an_async_store_from_a_url_serves_one_loop_after_another(fresh_pg_server: Any) -> None:
    url = fresh_pg_server.url("postgres")
    idem = AsyncIdempotency(url)
    assert asyncio.run(idem.do("a", lambda: 1)) == (1, False)
    assert asyncio.run(idem.do("a", lambda: 2)) == (1, True)
    fresh_pg_server.restart()
    assert asyncio.run(idem.do("b", lambda: 3)) == (3, False)  # a new pool, in this loop
    assert asyncio.run(idem.do("b", lambda: 4)) == (3, True)

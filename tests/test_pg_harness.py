"""Tests of the private-PostgreSQL harness (tests.support.pg_server) and its fixtures."""

from __future__ import annotations

import os
import urllib.parse
from pathlib import Path

import pytest

from tests import pg_fixtures
from tests.support import pg_server as harness
from tests.support.pg_server import (
    BINDIR_ENV,
    MISSING_DRIVER_MESSAGE,
    REQUIRE_ENV,
    SHARED_DEFAULT_PORT,
    SUPERUSER,
    TEST_DB_PREFIX,
    URL_ENV,
    AnyPostgres,
    ExternalPostgres,
    PostgresServer,
    PostgresServerError,
    find_postgres_binaries,
    postgres_required,
)

try:
    import psycopg
except ImportError:
    if postgres_required():  # CI: a missing driver is a failure
        raise
    pytest.skip(MISSING_DRIVER_MESSAGE, allow_module_level=True)


# -- helpers ------------------------------------------------------------------------------


def dbname_of(url: str) -> str:
    return urllib.parse.unquote(urllib.parse.urlsplit(url).path.lstrip("/"))


def database_exists(server: AnyPostgres, name: str) -> bool:
    with psycopg.connect(server.url(), connect_timeout=5) as conn:
        query = "SELECT count(*) FROM pg_database WHERE datname = %s"
        row = conn.execute(query, (name,)).fetchone()
    return bool(row and row[0])


def process_uid(pid: int) -> int:
    """The real uid of ``pid``, from /proc (skip without /proc)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        pytest.skip("needs /proc")
    for line in status.splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line in /proc/{pid}/status")


# -- the fixtures ---------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_pg_url_connects_and_selects(pg_url: str, pg_server: AnyPostgres) -> None:
    name = dbname_of(pg_url)
    assert name.startswith(TEST_DB_PREFIX)
    with psycopg.connect(pg_url, connect_timeout=5) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert conn.execute("SELECT current_database()").fetchone() == (name,)
        tables = conn.execute(
            "SELECT count(*) FROM pg_tables"
            " WHERE schemaname NOT IN ('pg_catalog', 'information_schema')"
        ).fetchone()
        assert tables == (0,)  # a fresh database
        if isinstance(pg_server, PostgresServer):
            assert conn.execute("SELECT current_user").fetchone() == (SUPERUSER,)
            assert pg_url == f"postgresql://{SUPERUSER}@127.0.0.1:{pg_server.port}/{name}"


_seen_by_round: dict[int, str] = {}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("round_", [1, 2])
def test_pg_url_is_a_new_database_each_test_and_the_last_one_is_gone(
    round_: int, pg_url: str, pg_server: AnyPostgres
) -> None:
    name = dbname_of(pg_url)
    _seen_by_round[round_] = name
    assert database_exists(pg_server, name)
    earlier = _seen_by_round.get(round_ - 1)
    if earlier is not None:  # not when this round runs alone (-k, a rerun)
        assert earlier != name
        assert not database_exists(pg_server, earlier), "the last test's database was not dropped"


@pytest.mark.timeout(60)
def test_temporary_databases_are_distinct_and_dropped(pg_server: AnyPostgres) -> None:
    with pg_server.temporary_database() as a, pg_server.temporary_database() as b:
        names = dbname_of(a), dbname_of(b)
        assert names[0] != names[1]
        assert all(database_exists(pg_server, n) for n in names)
        left_open = psycopg.connect(a, connect_timeout=5)  # WITH (FORCE) ends it
        left_open.execute("CREATE TABLE only_in_a (x int)")
        left_open.commit()
        with pytest.raises(psycopg.errors.UndefinedTable), psycopg.connect(b) as other:
            other.execute("SELECT * FROM only_in_a")
    try:
        assert not any(database_exists(pg_server, n) for n in names)
        with pytest.raises(psycopg.OperationalError):
            left_open.execute("SELECT 1")
    finally:
        left_open.close()


@pytest.mark.timeout(60)
def test_pg_url_starts_a_killed_session_server_again(pg_server: AnyPostgres) -> None:
    if not isinstance(pg_server, PostgresServer):
        pytest.skip(f"{URL_ENV} names an existing server: not ours to kill")
    port = pg_server.port
    pg_server.kill()
    assert not pg_server.running
    # what pg_url does
    with pg_server.temporary_database() as url, psycopg.connect(url, connect_timeout=5) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert pg_server.port == port


# -- faults -------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_kill_fails_connections_and_start_again_keeps_checkpointed_data(
    fresh_pg_server: PostgresServer,
) -> None:
    server = fresh_pg_server
    port, pid = server.port, server.pid
    with server.connect(autocommit=True) as conn:
        conn.execute("CREATE TABLE survivor (x int)")
        conn.execute("INSERT INTO survivor VALUES (42)")
        conn.execute("CHECKPOINT")
    open_conn = server.connect()
    try:
        server.kill()
        assert not server.running
        with pytest.raises(psycopg.OperationalError):
            open_conn.execute("SELECT 1")
    finally:
        open_conn.close()
    with pytest.raises(psycopg.OperationalError):
        server.connect(connect_timeout=2)

    server.start_again()
    assert server.running and server.port == port and server.pid != pid
    with server.connect() as conn:
        assert conn.execute("SELECT x FROM survivor").fetchall() == [(42,)]


@pytest.mark.timeout(60)
def test_restart_keeps_data_and_port(fresh_pg_server: PostgresServer) -> None:
    server = fresh_pg_server
    port = server.port
    name = server.create_database()
    with server.connect(name, autocommit=True) as conn:
        conn.execute("CREATE TABLE kept (x int)")  # no CHECKPOINT: a fast stop writes one
    server.restart(mode="fast")
    assert server.port == port
    with server.connect(name) as conn:
        assert conn.execute("SELECT count(*) FROM kept").fetchone() == (0,)
    server.kill()
    server.restart()  # after a kill: just starts again
    assert server.running and server.port == port
    server.drop_database(name)
    assert not database_exists(server, name)


@pytest.mark.timeout(60)
def test_private_server_listens_on_loopback_only_and_never_on_5432(
    fresh_pg_server: PostgresServer,
) -> None:
    server = fresh_pg_server
    assert server.port != SHARED_DEFAULT_PORT
    assert server.url() == f"postgresql://{SUPERUSER}@127.0.0.1:{server.port}/postgres"
    with server.connect() as conn:
        assert conn.execute("SHOW listen_addresses").fetchone() == ("127.0.0.1",)
        assert conn.execute("SHOW port").fetchone() == (str(server.port),)
        assert conn.execute("SHOW fsync").fetchone() == ("off",)
        assert conn.execute("SHOW max_connections").fetchone() == ("200",)
    with pytest.raises(PostgresServerError, match="5432"):
        PostgresServer(server.binaries, port=SHARED_DEFAULT_PORT).start()


@pytest.mark.timeout(60)
def test_runs_as_an_unprivileged_user_when_root(fresh_pg_server: PostgresServer) -> None:
    server = fresh_pg_server
    assert server.pid is not None and server.data_dir is not None
    if os.geteuid() != 0:
        assert server.run_as is None
        assert process_uid(server.pid) == os.geteuid()
        return
    assert server.run_as is not None and server.run_as.name in ("postgres", "nobody")
    assert process_uid(server.pid) == server.run_as.uid != 0
    assert os.stat(server.data_dir).st_uid == server.run_as.uid


@pytest.mark.timeout(60)
def test_stop_leaves_nothing_behind(fresh_pg_server: PostgresServer) -> None:
    server = fresh_pg_server
    directory, process = server.directory, server.process
    assert directory is not None and process is not None
    server.stop()
    assert not server.running and process.returncode is not None
    assert not os.path.exists(directory)
    server.stop()  # idempotent


# -- an existing server ---------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_external_server_drops_only_its_own_databases(fresh_pg_server: PostgresServer) -> None:
    foreign = fresh_pg_server.create_database("not_ours")
    external = ExternalPostgres(fresh_pg_server.url("postgres"))
    with external:
        name = external.create_database()
        assert name.startswith(TEST_DB_PREFIX)
        assert external.url(name) == fresh_pg_server.url(name)
        with pytest.raises(PostgresServerError, match="refusing"):
            external.drop_database(foreign)
        kept = external.create_database()
        external.drop_database(name)
        assert not database_exists(fresh_pg_server, name)
        assert database_exists(fresh_pg_server, kept)
    assert not database_exists(fresh_pg_server, kept)  # stop() dropped the rest
    assert database_exists(fresh_pg_server, foreign)


# -- finding binaries, skipping and failing ------------------------------------------------------


@pytest.mark.timeout(30)
def test_binary_lookup_order(tmp_path: Path) -> None:
    found = pg_fixtures.pg_binaries_or_skip()
    overridden = find_postgres_binaries({BINDIR_ENV: found.bindir, "PATH": ""})
    assert overridden is not None and overridden.origin == f"${BINDIR_ENV}"
    assert overridden.bindir == found.bindir and overridden.version == found.version
    assert find_postgres_binaries({"PATH": ""}, path="") is None
    with pytest.raises(harness.PostgresBinariesError, match=BINDIR_ENV):
        find_postgres_binaries({BINDIR_ENV: str(tmp_path)})


@pytest.mark.timeout(30)
def test_missing_binaries_skip_or_fail(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(BINDIR_ENV, raising=False)
    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv(REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match=BINDIR_ENV):
        pg_fixtures.pg_binaries_or_skip()
    monkeypatch.setenv(REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match=REQUIRE_ENV):
        pg_fixtures.pg_binaries_or_skip()
    monkeypatch.setenv(BINDIR_ENV, str(tmp_path))  # set but broken: always a failure
    monkeypatch.setenv(REQUIRE_ENV, "0")
    with pytest.raises(pytest.fail.Exception, match=BINDIR_ENV):
        pg_fixtures.pg_binaries_or_skip()

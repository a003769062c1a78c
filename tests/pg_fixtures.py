"""Pytest fixtures for tests against a real PostgreSQL: a private server, or an
existing one named by ``$STAMPEDE_POSTGRES_URL``.

Built on ``tests.support.pg_server``. Load them in any of these ways:
``pytest_plugins = ["tests.pg_fixtures"]`` in the root ``conftest.py`` (done),
``from tests.pg_fixtures import *`` there, or ``pytest -p tests.pg_fixtures``.

Fixtures:

- ``pg_server`` (session): one private ``PostgresServer`` for the whole run,
  on a free loopback port (checked to not be 5432), started on first use; or,
  when ``$STAMPEDE_POSTGRES_URL`` is set, an ``ExternalPostgres`` on that
  server (nothing is started; only databases it creates are ever dropped).
- ``pg_url`` (function): the URL of a fresh database made for this test
  (``stampede_test_<hex>``), dropped after it ``WITH (FORCE)``. A private
  server an earlier test left killed or stopped is started again first.
- ``fresh_pg_server`` (function): a private ``PostgresServer`` of the test's
  own, for fault tests that kill or restart it (``server.url("postgres")``, or
  ``server.create_database()``); stopped after the test. It needs the server
  binaries even when ``$STAMPEDE_POSTGRES_URL`` is set.

No server binaries (and no ``$STAMPEDE_POSTGRES_URL``), or no importable
psycopg, makes these fixtures skip, naming how to get them; with
``STAMPEDE_REQUIRE_POSTGRES=1`` (CI) that is a failure instead. A set but
broken ``STAMPEDE_PG_BINDIR`` always fails.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NoReturn

import pytest

from tests.support.pg_server import (
    BINDIR_ENV,
    MISSING_BINARIES_MESSAGE,
    MISSING_DRIVER_MESSAGE,
    REQUIRE_ENV,
    SHARED_DEFAULT_PORT,
    URL_ENV,
    AnyPostgres,
    ExternalPostgres,
    PostgresBinaries,
    PostgresBinariesError,
    PostgresServer,
    find_postgres_binaries,
    postgres_required,
)

__all__ = [
    "fresh_pg_server",
    "pg_binaries_or_skip",
    "pg_server",
    "pg_url",
    "psycopg_or_skip",
]


def _no_postgres(message: str) -> NoReturn:
    if postgres_required():
        pytest.fail(
            f"{message} ({REQUIRE_ENV} is set, so a missing PostgreSQL is a failure, not a skip)",
            pytrace=False,
        )
    pytest.skip(message)


def psycopg_or_skip() -> None:
    """Skip (fail under ``STAMPEDE_REQUIRE_POSTGRES=1``) unless psycopg imports."""
    try:
        import psycopg  # noqa: F401
    except ImportError as exc:
        _no_postgres(f"{MISSING_DRIVER_MESSAGE} ({exc})")


def pg_binaries_or_skip(*, for_what: str = "") -> PostgresBinaries:
    """The server binaries, or skip (fail under ``STAMPEDE_REQUIRE_POSTGRES=1``)."""
    try:
        binaries = find_postgres_binaries()
    except PostgresBinariesError as exc:
        pytest.fail(f"unusable PostgreSQL binaries ({BINDIR_ENV}?): {exc}", pytrace=False)
    if binaries is None:
        _no_postgres(f"{for_what}{MISSING_BINARIES_MESSAGE}")
    return binaries


def _check_private(server: PostgresServer) -> None:
    assert server.port != SHARED_DEFAULT_PORT, "refusing to test against port 5432"
    assert server.running, f"the private server is not running: {server!r}"


@pytest.fixture(scope="session")
def pg_server() -> Iterator[AnyPostgres]:
    """The session's PostgreSQL: private, or the one ``$STAMPEDE_POSTGRES_URL`` names."""
    psycopg_or_skip()
    external = ExternalPostgres.from_env()
    if external is not None:
        with external:
            external.ensure_running()
            yield external
        return
    with PostgresServer(pg_binaries_or_skip()) as server:
        _check_private(server)
        yield server


@pytest.fixture
def pg_url(pg_server: AnyPostgres) -> Iterator[str]:
    """A fresh database on the session server for this test; dropped after it."""
    with pg_server.temporary_database() as url:
        if isinstance(pg_server, PostgresServer):
            _check_private(pg_server)
        yield url


@pytest.fixture
def fresh_pg_server() -> Iterator[PostgresServer]:
    """A private server for this test only (kill and restart at will)."""
    psycopg_or_skip()
    hint = f"fault tests need a server of their own ({URL_ENV} is not enough): "
    binaries = pg_binaries_or_skip(for_what=hint if ExternalPostgres.from_env() else "")
    with PostgresServer(binaries) as server:
        _check_private(server)
        yield server

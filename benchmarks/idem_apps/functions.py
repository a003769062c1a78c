"""The function-level surface of each library, for ``bench_idempotency.py``'s thread bursts.

``make_call(library, ...)`` returns ``call(key, body) -> dict``: the same work as
the apps' handler (``INCR`` a run counter, sleep, return the order with the run's
number and a nonce) run once per key by that library's function API:

- ``stampede``: ``Idempotency(redis.Redis).do(key, work, fingerprint=body)``;
- ``stampede-pg``: the same on PostgreSQL, ``Idempotency("postgresql://...")`` (the
  store's own pool, its defaults: up to 10 connections), ``store_url`` being that URL;
- ``stampede-pg-tx``: the caller's transaction: each call takes a connection of
  its own (a pool of ``connections``, opened beforehand, autocommit off), runs
  ``do(key, work, fingerprint=body, transaction=conn)`` where the work also
  ``INSERT``s the order into ``bench_orders`` in that transaction, then commits
  (a rollback if anything raised). Runs are counted twice: the work's ``INCR``
  (every call of it, a rolled-back one too) and the committed ``bench_orders``
  rows (``committed_rows``). The table is made beforehand (``create_orders_table``);
- ``idemkit``: ``@idempotent_sync`` on a ``RedisBackend`` (its sync facade: the
  core runs on one background event loop, the work on a thread), keyed on the
  ``key`` argument, the body as its ``validation_fingerprint``;
- ``powertools``: ``@idempotent_function`` on a ``RedisCachePersistenceLayer``,
  keyed on ``key`` (``event_key_jmespath``); an in-progress duplicate raises
  ``IdempotencyAlreadyInProgressError``.

``serve`` is the body of one process of the cross-process burst. ``close_calls()``
closes the connections the calls made so far hold (the PostgreSQL ones).
"""

from __future__ import annotations

import contextlib
import json
import secrets
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import redis

# redis-py 8's pools refuse a 101st connection; 200 threads of one process may each
# hold one (Powertools: every call), so the pools are sized past any burst here.
POOL = 1024

FUNCTION_LIBRARIES = ("stampede", "stampede-pg", "stampede-pg-tx", "idemkit", "powertools")
POSTGRES_LIBRARIES = ("stampede-pg", "stampede-pg-tx")

Call = Callable[[str, dict[str, Any]], dict[str, Any]]

ORDERS_TABLE = """
CREATE TABLE IF NOT EXISTS bench_orders (
    id      bigserial PRIMARY KEY,
    ns      text NOT NULL,
    key     text NOT NULL,
    run     integer NOT NULL,
    body    text NOT NULL
)"""
# No unique key on (ns, key): a second committed run would show as a second row.
INSERT_ORDER = "INSERT INTO bench_orders (ns, key, run, body) VALUES (%s, %s, %s, %s)"

_closers: list[Callable[[], None]] = []


def create_orders_table(url: str) -> None:
    """The business table of ``stampede-pg-tx`` (once, before any process uses it)."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(ORDERS_TABLE)


def committed_rows(url: str, ns: str, key: str) -> int:
    """The ``bench_orders`` rows committed for ``key`` (runs that were not rolled back)."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM bench_orders WHERE ns = %s AND key = %s", (ns, key)
        ).fetchone()
    return int(row[0]) if row else 0


def close_calls() -> None:
    """Close what the calls made so far hold open (their PostgreSQL connections)."""
    while _closers:
        closer = _closers.pop()
        with contextlib.suppress(Exception):  # (a cleanup: never over the results)
            closer()


def _answer(body: dict[str, Any], run: int) -> dict[str, Any]:
    return {**body, "nonce": secrets.token_hex(8), "pid": 0, "run": run}


def make_call(
    library: str,
    store_url: str,
    counter_url: str,
    ns: str,
    work_s: float,
    connections: int = 1,
) -> Call:
    """``call(key, body)`` through ``library``'s function API (see the module);
    ``connections``: how many callers at once (``stampede-pg-tx``: its own pool)."""
    counter = redis.Redis.from_url(counter_url, max_connections=POOL)

    def work(key: str, body: dict[str, Any]) -> dict[str, Any]:
        run = int(counter.incr(f"runs:{ns}:{key}"))
        time.sleep(work_s)
        return _answer(body, run)

    if library in ("stampede", "stampede-pg"):
        import stampede

        # Redis: a client of the records' server; PostgreSQL: the URL (the store's pool).
        where: Any = store_url
        if library == "stampede":
            where = redis.Redis.from_url(store_url, max_connections=POOL)
        idem = stampede.Idempotency(where, namespace=ns)
        if library == "stampede-pg":
            _closers.append(store_pool_closer(idem))

        def stampede_call(key: str, body: dict[str, Any]) -> dict[str, Any]:
            value, _ = idem.do(key, lambda: work(key, body), fingerprint=body)
            return value

        return stampede_call
    if library == "stampede-pg-tx":
        import psycopg_pool

        import stampede

        tx_idem = stampede.Idempotency(store_url, namespace=ns)
        _closers.append(store_pool_closer(tx_idem))
        # Each caller's own connection, opened before the burst (autocommit off).
        callers = psycopg_pool.ConnectionPool(
            store_url,
            min_size=connections,
            max_size=connections,
            timeout=60.0,
            open=True,
            name="bench-callers",
        )
        callers.wait(60.0)
        _closers.append(callers.close)
        text = json.dumps

        def stampede_pg_tx_call(key: str, body: dict[str, Any]) -> dict[str, Any]:
            with callers.connection() as conn:

                def in_transaction() -> dict[str, Any]:
                    run = int(counter.incr(f"runs:{ns}:{key}"))
                    conn.execute(INSERT_ORDER, (ns, key, run, text(body, sort_keys=True)))
                    time.sleep(work_s)
                    return _answer(body, run)

                try:
                    value, _ = tx_idem.do(key, in_transaction, fingerprint=body, transaction=conn)
                    conn.commit()
                except BaseException:
                    conn.rollback()
                    raise
                return value

        return stampede_pg_tx_call
    if library == "idemkit":
        # From their modules: ``idemkit`` itself exports them through ``__getattr__``.
        from idemkit.adapters.ai import idempotent_sync
        from idemkit.backends.redis import RedisBackend
        from idemkit.core.policy import MethodConfig

        with warnings.catch_warnings():  # no scope: single-tenant, on purpose
            warnings.simplefilter("ignore")

            @idempotent_sync(
                backend=RedisBackend.from_url(store_url, namespace=ns, max_connections=POOL),
                config=MethodConfig(
                    key_fields=["key"],
                    validation_fingerprint=lambda args: json.dumps(
                        args["body"], sort_keys=True
                    ).encode(),
                ),
            )
            def create(key: str, body: dict) -> dict:  # type: ignore[type-arg]
                return work(key, body)

        def idemkit_call(key: str, body: dict[str, Any]) -> dict[str, Any]:
            value: dict[str, Any] = create(key=key, body=body)
            return value

        return idemkit_call
    if library == "powertools":
        with warnings.catch_warnings():  # the Redis layer's class is marked deprecated for v4
            warnings.simplefilter("ignore", DeprecationWarning)
            from aws_lambda_powertools.utilities.idempotency import (
                IdempotencyConfig,
                idempotent_function,
            )
            from aws_lambda_powertools.utilities.idempotency.persistence.redis import (
                RedisCachePersistenceLayer,
            )

            # redis.Redis is the client it is written for (its Protocol is narrower).
            client: Any = redis.Redis.from_url(store_url, max_connections=POOL)
            layer = RedisCachePersistenceLayer(client=client)
        warnings.filterwarnings("ignore", message="Couldn't determine the remaining time left")

        @idempotent_function(  # type: ignore[untyped-decorator]
            data_keyword_argument="request",
            persistence_store=layer,
            config=IdempotencyConfig(event_key_jmespath="key"),
            key_prefix=ns,
        )
        def process(request: dict[str, Any]) -> dict[str, Any]:
            return work(request["key"], request["body"])

        def powertools_call(key: str, body: dict[str, Any]) -> dict[str, Any]:
            value: dict[str, Any] = process(request={"key": key, "body": body})
            return value

        return powertools_call
    raise ValueError(f"no function surface for {library!r}: {', '.join(FUNCTION_LIBRARIES)}")


def store_pool_closer(idem: Any) -> Callable[[], None]:
    """Closes the pool ``Idempotency`` made for its URL (it keeps it for its lifetime)."""

    def close() -> None:
        pool = getattr(getattr(getattr(idem, "_core", None), "store", None), "pool", None)
        if pool is not None:
            pool.close()

    return close


def outcome(call: Call, key: str, body: dict[str, Any]) -> tuple[str, Any]:
    """("value", the run number in the value) or ("error", the exception's type name)."""
    try:
        return "value", call(key, body)["run"]
    except Exception as exc:
        return "error", type(exc).__name__


def thread_burst(
    call: Call,
    key: str,
    body: dict[str, Any],
    threads: int,
    timeout: float,
    ready: Callable[[], None] = lambda: None,
) -> list[tuple[str, Any]]:
    """``threads`` threads released together call ``call(key, body)``: their outcomes.

    ``ready`` runs once every thread is started and waiting (the cross-process burst
    meets the other processes there); if it raises, no thread calls and it is raised
    again. A thread still running after ``timeout`` counts as ``("error", "hung")``
    (a daemon: it cannot hold the process up)."""
    start = threading.Event()
    go = [True]
    results: list[tuple[str, Any] | None] = [None] * threads

    def run(i: int) -> None:
        start.wait()
        if go[0]:
            results[i] = outcome(call, key, body)

    pool = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(threads)]
    for t in pool:
        t.start()
    try:
        ready()
    except BaseException:
        go[0] = False
        raise
    finally:
        start.set()
    end = time.monotonic() + timeout
    for t in pool:
        t.join(max(0.0, end - time.monotonic()))
    return [r if r is not None else ("error", "hung") for r in results]


def serve(
    store_url: str,
    pg_url: str | None,
    counter_url: str,
    ns: str,
    work_s: float,
    threads: int,
    commands: Any,
    results: Any,
    barrier: Any,
) -> None:
    """One process of the cross-process burst: for each ``(library, key, body,
    timeout)`` from ``commands`` (``None``: stop), ``threads`` threads call it once
    every process has its threads waiting (``barrier``); the outcomes, or why there
    are none, go to ``results``. The PostgreSQL libraries' records are at ``pg_url``,
    the others' at ``store_url``."""
    calls: dict[str, Call] = {}
    while True:
        command = commands.get(timeout=120)
        if command is None:
            close_calls()
            return
        library, key, body, timeout = command
        try:
            if library not in calls:
                url = store_url
                if library in POSTGRES_LIBRARIES:
                    if pg_url is None:
                        raise RuntimeError("no PostgreSQL server")
                    url = pg_url
                calls[library] = make_call(library, url, counter_url, ns, work_s, threads)
        except Exception as exc:
            barrier.abort()  # the other processes stop waiting for this one
            results.put(("n/a", f"{type(exc).__name__}: {exc}"))
            continue

        def meet(seconds: float = timeout) -> None:
            barrier.wait(seconds)

        try:
            done = thread_burst(calls[library], key, body, threads, timeout, meet)
        except threading.BrokenBarrierError:
            results.put(("n/a", "another process could not set up or join the burst"))
            continue
        results.put(("done", done))

"""The leader's work of an idempotent call, written once.

Written once, as async code, in ``stampede/_async/idempotency.py``; the sync
twin ``stampede/_sync/idempotency.py`` is generated from it by
``scripts/make_sync.py``. Edit this file, then run the script.

``run`` is what the first caller of a key in this process does (the others
join its flight in the shell): claim the key in the store (``_idem_stores``),
then, by what the claim found,

- a record: replay it (the same fingerprint), or ``KeyReused``;
- a running claim elsewhere: ``KeyReused`` for another fingerprint, ``InFlight``
  at once in reject mode, else wait for its wake-up and claim again, until
  ``wait_timeout`` (then ``InFlight``);
- the claim is ours: run the work under a renewed lease, with ``current()``
  telling it its fence; record the outcome with the token (a lost lease:
  refused, counted ``fenced``; the caller still gets its value). An exception
  not listed in ``record_errors`` (and before ``effect_started()``) releases
  the key instead, so a retry runs again.

The store failing before the claim: ``BackendUnavailable`` (``on_backend_error=
"raise"``), or the work runs unprotected (``"fail-open"``, counted). Failing
after the work ran: the caller gets its value and the failure is logged; the
lease runs out and a retry may run the work again (documented).
"""

from __future__ import annotations

import logging
import secrets
from typing import Any, Protocol

from .._errors import BackendUnavailable, InFlight, KeyReused
from .._idem import Claim, _current
from .._idem_stores import DONE, RUNNING, Claimed
from .._primitives import ALoader, AsyncRenewer, acall_loader

log = logging.getLogger("stampede")


class AsyncWaker(Protocol):
    async def wait(self, timeout: float) -> None: ...


class AsyncIdemCore(Protocol):
    """What the shell gives the leader's work (``_idempotency.Core``)."""

    store: Any
    options: Any
    counters: Any

    def clock(self) -> float: ...

    def replay(self, key: str, data: bytes | int | None, fingerprint: str) -> Any: ...

    def remember(self, key: str, data: bytes | int | None, seconds: float) -> None: ...

    def recorded(self, key: str, fingerprint: str, fence: int, value: Any) -> bytes: ...

    def recorded_error(
        self, key: str, fingerprint: str, fence: int, exc: BaseException
    ) -> bytes: ...

    def unreplayable(self, key: str, fingerprint: str, fence: int) -> bytes: ...


async def run(
    core: AsyncIdemCore, k: str, fn: ALoader[Any], fp: str, store: Any = None
) -> tuple[Any, bool]:
    """Claim ``k`` and run ``fn`` once for it, or replay its record: (value, replayed).

    ``store``: the core's store, or its steps in the caller's transaction
    (``InTransaction``: nothing is kept in this process, since it may roll back).
    """
    store = core.store if store is None else store
    opts = core.options
    token = secrets.token_hex(16)
    fence_ttl = opts.retention + opts.lease_ttl  # a fence outlives the record it numbers
    deadline = None
    waited = False
    listening = False
    while True:
        try:
            if not listening:
                # The first look without a listener: most claims find a record or
                # take the key, and a wake-up registration costs more than a claim.
                found: Claimed = await store.aclaim(
                    k, token, fp, opts.lease_ttl, fence_ttl, opts.max_record_size
                )
                if found.state == RUNNING:
                    _still_running(core, found, fp, None)  # KeyReused, or InFlight (reject)
                    listening = True
                    continue  # then listening before claiming again: no lost wake-up
            else:
                async with store.alease_listen(k) as wake:
                    found = await store.aclaim(
                        k, token, fp, opts.lease_ttl, fence_ttl, opts.max_record_size
                    )
                    if found.state == RUNNING:
                        now = core.clock()
                        if deadline is None:
                            deadline = now + opts.wait_timeout
                        _still_running(core, found, fp, deadline - now)
                        if not waited:
                            waited = True
                            core.counters.count("waited")
                        await wake.wait(min(deadline - now, 0.25))
                        continue
            if found.state == DONE:
                core.counters.count("replayed")
                if not store.transactional:
                    core.remember(k, found.data, found.number)
                return core.replay(k, found.data, fp), True
            break  # CLAIMED
        except BackendUnavailable:
            if not opts.fail_open or store.transactional:
                raise
            core.counters.count("unprotected")
            log.warning("idempotency store unavailable: running the work unprotected")
            return await acall_loader(fn), False
    if found.takeover:
        core.counters.count("takeovers")
    return await _lead(core, store, k, fn, fp, token, int(found.number))


def _still_running(core: AsyncIdemCore, found: Claimed, fp: str, left: float | None) -> None:
    """Another execution holds the key: ``KeyReused`` for another fingerprint; ``InFlight``
    in reject mode or once the wait is over (``left``: seconds of it remaining)."""
    if found.holder != fp:
        core.counters.count("key_reused")
        raise KeyReused("this idempotency key is in use with another fingerprint")
    if core.options.reject or (left is not None and left <= 0):
        core.counters.count("rejected")
        raise InFlight(
            "this idempotency key's first execution is still running",
            retry_after=max(1.0, float(found.number)),
        )


async def _lead(
    core: AsyncIdemCore, store: Any, k: str, fn: ALoader[Any], fp: str, token: str, fence: int
) -> tuple[Any, bool]:
    """Run the work under the claim, then record its outcome (or release the key)."""
    opts = core.options
    claim = Claim(k, fence)
    reset = _current.set(claim)
    try:
        # (In the caller's transaction there is no lease: the transaction holds the row.)
        async with AsyncRenewer(store, [] if store.transactional else k, token, opts.lease_ttl):
            try:
                value = await acall_loader(fn)
            except Exception as exc:
                core.counters.count("executed")
                releases = getattr(exc, "releases_key", False)  # (the HTTP layer's signal)
                if not releases and (isinstance(exc, opts.record_errors) or claim.effect):
                    await _commit(
                        core, store, k, token, fence, core.recorded_error(k, fp, fence, exc)
                    )
                else:
                    core.counters.count("released")
                    await _commit(core, store, k, token, fence, None)
                raise
            except BaseException:
                core.counters.count("executed")
                if claim.effect:
                    # Interrupted after its side effect began: never run again.
                    await _commit(core, store, k, token, fence, core.unreplayable(k, fp, fence))
                else:
                    # Interrupted or cancelled before: free the key (a retry runs
                    # again, as after a crash).
                    await _commit(core, store, k, token, fence, None)
                raise
    finally:
        _current.reset(reset)
    core.counters.count("executed")
    data = core.recorded(k, fp, fence, value)
    if await _commit(core, store, k, token, fence, data) and not store.transactional:
        core.remember(k, data, opts.retention)
    return value, False


async def _commit(
    core: AsyncIdemCore, store: Any, k: str, token: str, fence: int, data: bytes | None
) -> bool:
    """Record (or release, ``data`` None) if the claim is still ours (its lease, or
    its fence the latest); whether it was. A failing store is logged, never raised
    over the work's own outcome."""
    try:
        if await store.acommit(k, token, data, core.options.retention, fence):
            return True
        core.counters.count("fenced")  # taken over meanwhile: its record stands
    except BackendUnavailable:
        log.warning(
            "idempotency store failed while recording: the lease runs out and a retry "
            "may run the work again",
            exc_info=True,
        )
    return False

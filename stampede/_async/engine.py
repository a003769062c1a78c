"""The leader's work and the store I/O of a cache, written once.

Written once, as async code, in ``stampede/_async/engine.py``; the sync twin
``stampede/_sync/engine.py`` is generated from it by ``scripts/make_sync.py``
(``async``/``await`` dropped, ``a``-prefixed store methods and ``Async``
names mapped to their sync twins), and CI fails when the generated file
differs. Edit the async file, then run the script.

What runs here, for one key ``k`` (already a store key):

- ``read``: one store read, shared by this process's concurrent readers of
  the key when the store is shared (``_reads``); a failure follows the
  store-failure rules (``_failures``) for every reader, a foreign object is
  a counted miss.
- ``load``: the leader's work. Local: a second look (someone may have stored
  the key since the caller's read), the loader, the entry, the commit under
  the key's fence unless the call was fenced. Distributed: the same inside
  the fleet's lease (``_load_leased``): listen, then try the lease and read
  the value in one round trip; answer, lead, skip or wait (``_leader.look``);
  load under a renewer; commit with the token (or only free the lease).
- ``lookup``, ``store_value``, ``invalidate``, ``clear``: ``get``, ``set``,
  ``invalidate`` and ``clear`` of the cache, fencing in-flight loads.

The decisions are in ``_leader`` (no I/O); what differs by flavour is in
``_primitives`` (loader calls, lease renewers, fences) and in the shells'
single-flights.
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Callable, Hashable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol, TypeVar, cast

from .._entry import MISSING, Entry
from .._errors import BackendUnavailable
from .._leader import Failed, Fenced, Host, Patience, Step, look, picked
from .._near import NearTier
from .._primitives import ALoader, AsyncRenewer, acall_loader
from .._reads import AsyncReadGroup
from ..backends._shared import StoreBusy

V = TypeVar("V")

Keep = Callable[[Any], bool] | None  # a cache_if: is a loaded value stored?


class AsyncWaker(Protocol):
    async def wait(self, timeout: float) -> None: ...


class AsyncEntryStore(Protocol):
    """The store operations the cache's I/O needs (in-process or shared)."""

    local: bool

    async def aget(self, key: Hashable) -> Entry[Any] | None: ...

    async def aset(self, key: Hashable, entry: Entry[Any]) -> None: ...

    async def adelete(self, key: Hashable) -> None: ...

    async def aclear(self) -> None: ...

    def near_watch(self, near: NearTier) -> None: ...


class AsyncLeaseStore(AsyncEntryStore, Protocol):
    """What ``distributed=True`` needs of a shared store: token-fenced leases."""

    def decode(
        self, key: str, data: bytes | int | None, remaining: float | None
    ) -> Entry[Any] | None: ...

    async def alease_acquire(
        self, key: str, token: str, lease_ttl: float
    ) -> tuple[bool, bytes | int | None, float | None]: ...

    async def alease_renew(self, key: str, token: str, lease_ttl: float) -> bool: ...

    async def alease_commit(
        self, key: str, token: str, entry: Entry[Any] | None, drop: bool = False
    ) -> bool: ...

    async def alease_break(
        self, key: str, drop_value: bool, entry: Entry[Any] | None = None
    ) -> None: ...

    def alease_listen(self, key: str) -> AbstractAsyncContextManager[AsyncWaker]: ...


class AsyncManyStore(AsyncEntryStore, Protocol):
    """A shared store's batch read (``get_many``: one round trip)."""

    async def aget_many(self, keys: Sequence[str]) -> list[Entry[Any] | Exception | None]: ...


class AsyncFencing(Protocol):
    reads: AsyncReadGroup | None  # a shared store's coalesced reads

    def fence(self, k: Hashable) -> AbstractAsyncContextManager[Any]: ...

    def fence_all(self) -> AbstractAsyncContextManager[Any]: ...


AsyncHost = Host[AsyncEntryStore, AsyncLeaseStore, AsyncFencing]


async def read(
    host: AsyncHost, k: Hashable, count_foreign: bool = True, shared: bool = True
) -> Entry[Any] | None:
    """The entry under ``k``, or None (a miss, a failed read, a foreign object).

    A shared store's read is shared with this process's other readers of ``k``
    meanwhile (``_reads``); ``shared=False``: a read of its own, begun now (the
    leader's second look, which must not take an older read's answer; a ``set``).
    """
    reads = host.fences.reads if shared else None
    near = host.near if shared else None
    if near is not None:
        kept = near.entry(k, host.options.clock())
        if kept is not None:
            return kept  # the shared entry as read a moment ago: the policy decides
    if reads is None:
        try:
            entry = await host.store.aget(k)
        except Exception as exc:
            host.read_failed(exc, count_foreign)
            return None
    else:
        read = host.store.aget if near is None else functools.partial(filled, host)
        entry, failure = await reads.read(k, read)
        if failure is not None:  # every reader of the failed read: its own failure rules
            host.read_failed(failure, count_foreign)
            return None
    return host.valid(entry, count_foreign)


async def filled(host: AsyncHost, k: Hashable) -> Any:
    """A store read of ``k`` whose entry the near cache keeps."""
    near = host.near
    assert near is not None
    host.store.near_watch(near)  # (an asyncio store: on this event loop's listener)
    began = near.begin()
    entry = await host.store.aget(k)
    near.keep(k, entry, began)
    return entry


async def load(
    host: AsyncHost,
    k: Hashable,
    loader: ALoader[V],
    previous: Entry[V] | None,
    call: Fenced,
    *,
    force: bool = False,
    background: bool = False,
    early: bool = False,
    cache_if: Keep = None,
) -> V:
    """Load ``k`` as its leader: for this process, or for the fleet when distributed.

    ``previous``: the entry the caller read (the value to fall back on);
    ``force``: load whatever is stored (``refresh``); ``background``: a
    refresh that readers do not wait for; ``early``: an XFetch refresh;
    ``cache_if``: this call's, instead of the cache's.
    """
    if host.leases is not None:
        return await _load_leased(
            host, host.leases, k, loader, previous, call, force, background, early, cache_if
        )
    return await _load_here(host, k, loader, previous, call, force, cache_if)


async def reload(host: AsyncHost, k: Hashable, loader: ALoader[V], call: Fenced) -> V:
    """``refresh``: load ``k`` whatever is stored; what is stored when the load
    starts is the value kept if it fails (stale-if-error). Run by the leader only:
    callers that join a refresh in flight read nothing."""
    previous: Entry[V] | None = await read(host, k)
    return await load(host, k, loader, previous, call, force=True)


async def _load_here(
    host: AsyncHost,
    k: Hashable,
    loader: ALoader[V],
    previous: Entry[V] | None,
    call: Fenced,
    force: bool,
    cache_if: Keep = None,
) -> V:
    """The leader's work for this process alone."""
    if not force:
        current: Entry[V] | None = await read(host, k, count_foreign=False, shared=False)
        found, previous = host.second_look(current, previous)
        if found is not None:
            return host.answer(found)
    clock = host.options.clock
    started = clock()
    try:
        value = await acall_loader(loader)
    except BaseException as exc:
        entry, instead, spent = host.failure(k, call, exc, previous, started)
        if entry is not None:
            await _commit(host, k, call, entry)
        host.rec.count_load("load_errors", spent)
        if instead is MISSING:
            raise
        return cast(V, instead)  # the previous value, served instead (stale-if-error)
    stored, delta = host.loaded(value, started, cache_if)
    if stored is not None:
        await _commit(host, k, call, stored)
    elif previous is not None:
        await _drop(host, k, call)  # outdated by a value that is not to be stored
    host.rec.count_load("loads", delta)
    return value


async def _commit(host: AsyncHost, k: Hashable, call: Fenced, entry: Entry[Any]) -> bool:
    """Store ``entry`` unless the call was fenced; a failing store is counted, not raised."""
    failure: Exception | None = None
    # The fence spans the write: an invalidate of this key either marks the call
    # fenced before the check, or deletes after the write has landed.
    async with host.fences.fence(k):
        fenced = call.fenced
        if not fenced:
            try:
                await host.store.aset(k, entry)
            except Exception as exc:
                failure = exc
    # Counted (and the metrics hook called) once the fence is released.
    return host.committed(fenced, failure)


async def _drop(host: AsyncHost, k: Hashable, call: Fenced) -> None:
    """Delete ``k``'s entry unless the call was fenced (a newer write stands)."""
    failure: Exception | None = None
    async with host.fences.fence(k):
        if not call.fenced:
            try:
                await host.store.adelete(k)
            except Exception as exc:
                failure = exc
    if failure is not None:
        host.write_failed(failure)


async def _load_leased(
    host: AsyncHost,
    store: AsyncLeaseStore,
    k: Hashable,
    loader: ALoader[V],
    previous: Entry[V] | None,
    call: Fenced,
    force: bool,
    background: bool,
    early: bool,
    cache_if: Keep,
) -> V:
    """The leader of this process loads ``k`` for the fleet, or waits for who does."""
    assert isinstance(k, str)  # a shared store's key
    lease_ttl = host.options.lease_ttl
    token = secrets.token_hex(16)
    patience = Patience(host)
    try:
        while True:
            async with store.alease_listen(k) as wake:  # listening before looking: no lost wake-up
                try:
                    taken, data, remaining = await store.alease_acquire(k, token, lease_ttl)
                except StoreBusy:
                    await wake.wait(patience.poll)  # the client's pool is full for a moment
                    continue
                except BackendUnavailable as exc:
                    host.read_failed(exc)  # counted; raises when configured to
                    patience.finish()  # not the local load's time
                    # Fail open: this process's single-flight only.
                    return await _load_here(host, k, loader, previous, call, force, cache_if)
                except BaseException:
                    # Cancelled (or interrupted) mid-request: the lease may be ours
                    # (the request ran, or the client swallowed the cancel); free
                    # it, or the fleet would wait for lease_ttl.
                    await _release(host, store, k, token)
                    raise
                current: Entry[V] | None = host.decoded(k, data, remaining)
                step, found, previous = look(
                    host, k, taken, current, previous, force=force, background=background
                )
                if step is Step.ANSWER:
                    assert found is not None
                    if taken:
                        await _release(host, store, k, token)
                    return host.answer(found)
                if step is Step.LEAD:
                    break
                if step is Step.SKIP:
                    assert previous is not None
                    return previous.value  # type: ignore[return-value] # someone else refreshes
                await wake.wait(patience.next_wait())
    finally:
        patience.finish()
    patience.leading(early)
    started = host.options.clock()
    async with AsyncRenewer(store, k, token, lease_ttl) as renewer:
        try:
            value = await acall_loader(loader)
        except BaseException as exc:
            entry, instead, spent = host.failure(k, call, exc, previous, started)
            await _commit_leased(host, store, k, token, call, entry)
            host.rec.count_load("load_errors", spent)
            if instead is MISSING:
                raise
            return cast(V, instead)  # the previous value, served instead
    stored, delta = host.loaded(value, started, cache_if)
    if renewer.lost:
        await _release(host, store, k, token)
        host.rec.count("fenced")
    else:
        drop = stored is None and previous is not None  # outdated by a refused value
        await _commit_leased(host, store, k, token, call, stored, drop)
    host.rec.count_load("loads", delta)
    return value


async def _commit_leased(
    host: AsyncHost,
    store: AsyncLeaseStore,
    k: str,
    token: str,
    call: Fenced,
    entry: Entry[Any] | None,
    drop: bool = False,
) -> None:
    """Write ``entry`` (or, with ``drop``, delete the value it would have replaced) and
    free the lease, if both this process and the fleet allow it: the token decides,
    so a leader that lost its lease neither writes nor drops."""
    failure: Exception | None = None
    written = False
    async with host.fences.fence(k):
        fenced = call.fenced  # invalidated here meanwhile: only free the lease
        try:
            if fenced:
                written = await store.alease_commit(k, token, None)
            else:
                written = await store.alease_commit(k, token, entry, drop)
        except Exception as exc:
            failure = exc
        except BaseException:
            # Cancelled (or interrupted) mid-commit: whether it ran is unknown; free the lease if it
            # is still ours (the token decides), or the fleet waits for lease_ttl.
            await _release(host, store, k, token)
            raise
    if host.committed(fenced, failure) and not written and entry is not None:
        host.rec.count("fenced")  # the lease was lost: a newer load or an invalidate wins


async def _release(host: AsyncHost, store: AsyncLeaseStore, k: str, token: str) -> None:
    try:
        await store.alease_commit(k, token, None)
    except Exception as exc:
        host.write_failed(exc)


# -- many keys at once: get_many, get_or_load_many ------------------------------------


async def read_many(
    host: AsyncHost, ks: Sequence[Hashable], near: bool = True
) -> list[Entry[Any] | None]:
    """The entries under ``ks`` (None: a miss, a failed read, a foreign object): near
    copies first, then one store round trip for the rest. ``near=False``: a read of
    its own, from the store only (the leader's second look, which does not count
    what the first read counted already)."""
    count = near
    found: list[Entry[Any] | None] = [None] * len(ks)
    tier = host.near if near else None
    todo: list[int] = []
    if tier is not None:
        now = host.options.clock()
        for i, k in enumerate(ks):
            kept = tier.entry(k, now)
            if kept is None:
                todo.append(i)
            else:
                found[i] = kept
    else:
        todo = list(range(len(ks)))
    if not todo:
        return found
    if host.local:  # a mapping of this process: no round trip to save
        for i in todo:
            try:
                found[i] = host.valid(await host.store.aget(ks[i]), count)
            except Exception as exc:
                host.read_failed(exc, count)
        return found
    store = cast(AsyncManyStore, host.store)
    began = 0
    if tier is not None:
        store.near_watch(tier)
        began = tier.begin()
    try:
        entries = await store.aget_many([cast(str, ks[i]) for i in todo])
    except Exception as exc:
        host.read_failed(exc, count)  # one failed round trip: counted once
        return found
    for i, entry in zip(todo, entries, strict=True):
        if isinstance(entry, Exception):  # unreadable bytes: a counted miss
            host.read_failed(entry, count)
            continue
        if tier is not None:
            tier.keep(ks[i], entry, began)
        found[i] = host.valid(entry, count)
    return found


async def load_many(
    host: AsyncHost,
    ks: Sequence[Hashable],
    keys: Sequence[Hashable],
    previous: list[Entry[Any] | None],
    calls: Sequence[Fenced],
    loader: Callable[[list[Hashable]], Any],
    cache_if: Keep = None,
) -> list[Any]:
    """Lead the loads of the store keys ``ks`` (user keys ``keys``) together: one
    ``loader(keys)`` call for those this process leads.

    Each key is still single-flight in the fleet when distributed: its lease is
    taken first; a key whose lease another process holds is waited for, as a
    one-key load would (``load``). Returns each key's value or ``Failed``.
    """
    n = len(ks)
    out: list[Any] = [None] * n
    here: list[int] = []  # loaded without a lease: local, or the store failing (fail open)
    leased: list[int] = []  # this process holds the key's lease
    elsewhere: list[int] = []  # another process loads it (or the pool was busy)
    token = secrets.token_hex(16)
    leases = host.leases
    if leases is None:
        current = await read_many(host, ks, near=False)
        for i in range(n):
            found, previous[i] = host.second_look(current[i], previous[i])
            if found is None:
                here.append(i)
            else:
                out[i] = _answered(host, found)
    else:
        await _take_leases(host, leases, ks, token, previous, out, here, leased, elsewhere)
    batch = sorted(here + leased)
    if batch:
        await _load_batch(
            host, ks, keys, previous, calls, loader, cache_if, token, batch, leased, out
        )
    for i in elsewhere:
        one = functools.partial(_one, loader, keys[i])
        try:
            out[i] = await load(host, ks[i], one, previous[i], calls[i], cache_if=cache_if)
        except Exception as exc:
            out[i] = Failed(exc)
    return out


def _answered(host: AsyncHost, entry: Entry[Any]) -> Any:
    try:
        return host.answer(entry)
    except Exception as exc:  # a negative entry: its error, for this key's callers
        return Failed(exc)


async def _one(loader: Callable[[list[Hashable]], Any], key: Hashable) -> Any:
    """One key's value through the batch loader (a key loaded alone)."""
    return picked(await acall_loader(functools.partial(loader, [key])), key)


async def _take_leases(
    host: AsyncHost,
    store: AsyncLeaseStore,
    ks: Sequence[Hashable],
    token: str,
    previous: list[Entry[Any] | None],
    out: list[Any],
    here: list[int],
    leased: list[int],
    elsewhere: list[int],
) -> None:
    """Try each key's lease (reading its value): sort the keys into answered, led
    here with the lease, led here without one (fail open), or led elsewhere."""
    lease_ttl = host.options.lease_ttl
    try:
        for i, k in enumerate(ks):
            assert isinstance(k, str)
            try:
                taken, data, remaining = await store.alease_acquire(k, token, lease_ttl)
            except StoreBusy:
                elsewhere.append(i)  # the one-key path waits for a connection
                continue
            except BackendUnavailable as exc:
                host.read_failed(exc)  # counted; raises when configured to
                here.append(i)
                continue
            except BaseException:
                await _release(host, store, k, token)  # cancelled mid-request: may be ours
                raise
            current: Entry[Any] | None = host.decoded(k, data, remaining)
            step, found, previous[i] = look(
                host, k, taken, current, previous[i], force=False, background=False
            )
            if step is Step.ANSWER:
                assert found is not None
                if taken:
                    await _release(host, store, k, token)
                out[i] = _answered(host, found)
            elif step is Step.LEAD:
                leased.append(i)
            else:
                elsewhere.append(i)
    except BaseException:
        # Raised (the store failing under "raise", a cancel): the leases taken so
        # far are freed, or the fleet would wait lease_ttl for them.
        for j in leased:
            await _release(host, store, cast(str, ks[j]), token)
        raise


async def _load_batch(
    host: AsyncHost,
    ks: Sequence[Hashable],
    keys: Sequence[Hashable],
    previous: list[Entry[Any] | None],
    calls: Sequence[Fenced],
    loader: Callable[[list[Hashable]], Any],
    cache_if: Keep,
    token: str,
    batch: list[int],
    leased: list[int],
    out: list[Any],
) -> None:
    """One loader call for the keys of ``batch``; each key's outcome committed as its
    one-key load would commit it (``leased``: with the token)."""
    store = host.leases
    holds = set(leased)
    started = host.options.clock()
    renewer = AsyncRenewer(
        cast(Any, store), [cast(str, ks[i]) for i in leased], token, host.options.lease_ttl
    )
    try:
        async with renewer:
            loaded = await acall_loader(functools.partial(loader, [keys[i] for i in batch]))
    except BaseException as exc:
        spent = 0.0
        for i in batch:
            entry, instead, spent = host.failure(ks[i], calls[i], exc, previous[i], started)
            if i in holds:
                assert store is not None
                await _commit_leased(host, store, cast(str, ks[i]), token, calls[i], entry)
            elif entry is not None:
                await _commit(host, ks[i], calls[i], entry)
            out[i] = Failed(exc) if instead is MISSING else instead
        host.rec.count_load("load_errors", spent)
        if not isinstance(exc, Exception):
            raise
        return
    delta = 0.0
    pending = set(holds)  # leases not yet committed nor freed
    try:
        for i in batch:
            held = i in holds
            delta = await _settle_one(
                host, ks, keys, previous, calls, cache_if, token, renewer, loaded, started, i, out,
                held,
            )  # fmt: skip
            pending.discard(i)
    except BaseException:
        for i in pending:  # interrupted between commits: free the rest
            assert store is not None
            await _release(host, store, cast(str, ks[i]), token)
        raise
    host.rec.count_load("loads", delta)


async def _settle_one(
    host: AsyncHost,
    ks: Sequence[Hashable],
    keys: Sequence[Hashable],
    previous: list[Entry[Any] | None],
    calls: Sequence[Fenced],
    cache_if: Keep,
    token: str,
    renewer: AsyncRenewer,
    loaded: object,
    started: float,
    i: int,
    out: list[Any],
    held: bool,
) -> float:
    """Key ``i``'s outcome in a batch loaded together, committed as its one-key load
    would commit it (with its lease, if ``held``); the load's duration."""
    store = host.leases
    try:
        value = picked(loaded, keys[i])
    except (KeyError, TypeError) as exc:
        out[i] = Failed(exc)  # not loaded: nothing stored, the lease freed
        if held:
            assert store is not None
            await _release(host, store, cast(str, ks[i]), token)
        return 0.0
    stored, delta = host.loaded(value, started, cache_if)
    out[i] = value
    try:
        if held:
            assert store is not None
            k = cast(str, ks[i])
            if k in renewer.lost_keys:
                await _release(host, store, k, token)
                host.rec.count("fenced")
                return delta
            drop = stored is None and previous[i] is not None
            await _commit_leased(host, store, k, token, calls[i], stored, drop)
        elif stored is not None:
            await _commit(host, ks[i], calls[i], stored)
        elif previous[i] is not None:
            await _drop(host, ks[i], calls[i])
    except Exception as exc:  # this key's write failed: its callers still get the value
        host.write_failed(exc)
    return delta


# -- get, set, invalidate, clear -----------------------------------------------------


async def lookup(host: AsyncHost, k: Hashable, default: Any) -> Any:
    """``get``: the value under ``k`` if servable (fresh or stale), else ``default``."""
    return host.looked_up(await read(host, k), default)


async def store_value(host: AsyncHost, k: Hashable, value: Any, ttl: float | None) -> None:
    """``set``: write ``value`` and fence the key's loads in flight (here and, when
    distributed, in the fleet: the write and the lease break are one step)."""
    # A read of its own: a write does not wait behind someone else's read in flight.
    entry = host.set_entry(value, ttl, await read(host, k, shared=False))
    if entry is None:  # its ttl function says: not to be stored
        await invalidate(host, k)
        return
    async with host.fences.fence(k):
        host.flight.forget(k)
        if host.leases is not None:
            assert isinstance(k, str)
            await host.leases.alease_break(k, False, entry)
        else:
            await host.store.aset(k, entry)


async def invalidate(host: AsyncHost, k: Hashable) -> None:
    """``invalidate``: drop ``k``'s entry and fence its loads in flight."""
    async with host.fences.fence(k):
        host.flight.forget(k)
        if host.leases is not None:
            assert isinstance(k, str)
            await host.leases.alease_break(k, drop_value=True)
        else:
            await host.store.adelete(k)


async def clear(host: AsyncHost) -> None:
    """``clear``: drop the cache's namespace and fence every load in flight."""
    async with host.fences.fence_all():  # every stripe: no commit runs meanwhile
        host.flight._forget_all()
        await host.store.aclear()

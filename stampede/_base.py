"""What ``CoalescingCache`` and ``AsyncCoalescingCache`` are made of: a store,
checked options, counters, a single-flight, and the one hit path.

The shells (``_cache.py``, ``_acache.py``) add only what differs by flavour:
how a miss waits for its load (the sync leader loads on the caller's thread;
every async caller waits for a task) and how a background refresh starts
(a thread pool or a task). Everything a load does is in the engine
(``_async/engine.py``, written once; ``_sync/engine.py`` generated) and what
it decides in ``_leader`` and ``_policy``.

The hit path is written once (``_hitpath``): ``peek``, built per cache, is
what ``get_or_load`` of both shells calls; each ``@cached`` wrapper is built
from the same template. Anything else (a stale, negative, missing or foreign
entry, a failing read, a shared store whose read is a round trip) goes to
the shell's slow path, which reads again and lets the policy decide.
"""

from __future__ import annotations

import copy
import functools
import sys
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any, Generic, TypeVar

from ._entry import MISSING, Entry
from ._hitpath import make_peek
from ._leader import Host
from ._near import NearTier
from ._options import CacheOptions, Options
from ._policy import Decision
from ._primitives import AsyncFences, Fences
from ._reads import ReadGroup
from ._singleflight import AsyncSingleFlight, SingleFlight
from ._stats import Recorder, Stats
from .backends import SharedStore, Store, resolve
from .backends._shared import Codec
from .backends.memory import MemoryBackend, check_lifetime

# At run time too: tools read these hints (typing.get_type_hints, inspect).
if sys.version_info >= (3, 11):
    from typing import Unpack
else:
    from typing_extensions import Unpack

V = TypeVar("V")


class CacheBase(Generic[V]):
    """Configuration and state of ``CoalescingCache`` / ``AsyncCoalescingCache``."""

    _asynchronous = False  # the flavour of store I/O the shell does

    _flight: Any  # SingleFlight or AsyncSingleFlight, as the shell declares

    def __init__(self, backend: Any = None, **options: Unpack[CacheOptions]) -> None:
        """Wrap ``backend`` in a single-flight, early-refreshing, failure-aware cache.

        Args:
            backend: where entries live: ``None`` for a bounded in-process LRU
                (``maxsize`` entries), a ``dict``, a cachetools or cachebox
                cache or any mutable mapping, a ``diskcache.Cache`` /
                ``FanoutCache``, a ``redis.Redis`` (``redis.asyncio.Redis`` for
                the async cache) or ``RedisCluster`` client, or a URL:
                ``memory://``, ``disk:///path``, ``redis://``, ``rediss://``, ``unix://``.
            **options: the keyword options below (``CacheOptions``; all optional).

        Other Parameters:
            ttl (float): seconds a loaded value is fresh (default 60).
            beta (float): XFetch eagerness: how early a hot key is refreshed in the
                background, relative to how long its load took (default 1;
                ``0`` turns early refresh off).
            stale_ttl (float): seconds after ``ttl`` during which an expired value is
                still served, while one caller refreshes it in the background
                (stale-while-revalidate) or when the refresh fails
                (stale-if-error); default 0.
            cache_errors (type | tuple | Callable): exception types (or a
                predicate on the exception) whose raising by the loader is cached for ``error_ttl``
                seconds and raised again to readers (negative caching). Other
                errors are shared by the callers of the load, never stored.
            error_ttl (float): seconds a cached error lives; also how long a failed
                background refresh waits before the next try (default 5).
            wait_timeout (float | None): the most seconds a caller waits for another
                caller's load (``LoadTimeout`` past it); ``None`` (default): no bound.
            namespace (str): prefix of this cache's keys in a shared store, and the
                scope of ``clear()``.
            serializer (Serializer): how values are encoded in shared stores (default
                ``DataSerializer``, data only); ignored by in-process stores.
            distributed (bool): single-flight across processes and hosts with a
                per-key lease in the store (Redis, diskcache).
            lease_ttl (float): seconds a lease lives without renewal (default 10); a
                loader that runs longer keeps it renewed.
            maxsize (int): entries of the default in-process LRU (default 4096).
            near_maxsize (int): for a shared store (Redis, diskcache), copies of its
                entries kept in this process and served with no I/O, kept coherent by
                the writes' announcements (default 0: off; docs/concepts/near-cache.md).
            near_ttl (float): the most seconds a near copy is served after its read
                (default 5).
            name (str): the cache's name for the metrics hook (default: the
                namespace, else ``"default"``).
            metrics (MetricsHook): a ``MetricsHook`` told of misses, loads, waits, errors.
            on_backend_error ('fail-open' | 'raise'): ``"fail-open"`` (default: load as if the store
                were empty, behind a circuit breaker) or ``"raise"``
                (``BackendUnavailable``).
            clock (Callable[[], float]): monotonic seconds; tests pass a fake clock.
            random (Callable[[], float]): uniform draws in ``[0, 1)`` for XFetch; tests script them.

        Raises:
            TypeError: an unknown option, or an option of the wrong type.
            ValueError: an option out of range, or ``distributed=True`` or
                ``near_maxsize`` on a store that lives in this process only.
        """
        opts = Options.parse(options, where=type(self).__name__)
        store = resolve(backend, maxsize=opts.maxsize, asynchronous=self._asynchronous)
        # A wrapped mapping that expires entries before they stop being served (unknown
        # with a ttl function). Warns; see backends/memory.py.
        check_lifetime(store, None if opts.ttl_of else opts.ttl + opts.stale_ttl)
        if opts.distributed and store.local:
            raise ValueError(
                "distributed=True needs a backend shared between processes (Redis, "
                f"diskcache); {store!r} lives in this process only"
            )
        if opts.distributed and not getattr(store, "supports_leases", False):
            why = getattr(store, "no_leases_reason", None) or (
                "a diskcache FanoutCache spreads a value and its lease over shards: "
                "use a plain Cache"
            )
            raise ValueError(f"distributed=True needs leases, which {store!r} cannot hold ({why})")
        if opts.near_maxsize and store.local:
            raise ValueError(
                "near_maxsize keeps near copies of a store shared between processes "
                f"(Redis, diskcache); {store!r} lives in this process already"
            )
        if isinstance(store, SharedStore):
            serializer = opts.serializer
            if serializer is None:
                from .serializers import DataSerializer

                serializer = opts.serializer = DataSerializer()
            for attr in ("name", "dumps", "loads"):
                if not hasattr(serializer, attr):
                    raise TypeError(f"serializer {serializer!r} has no {attr!r}")
            codec = Codec(
                serializer, clock=opts.clock, beta=opts.beta, error_types=opts.error_types
            )
            store = store.bind(codec, opts.namespace)
        else:
            store = store.bind(opts.namespace)
        self._options = opts
        self._root: CacheBase[Any] = self  # the cache a policy view (_with_policy) was made from
        self._backend: Store = store
        self._rec = Recorder(opts.metrics, opts.name)
        self._counters = self._rec.counters
        self._clock = opts.clock
        # How keys become store keys; None: used as they are (the hit path's fast case).
        self._make_key = store.key_maker(opts.namespace)
        # The near cache of a shared store (near_maxsize), if any.
        self._near: NearTier | None = None
        if opts.near_maxsize and isinstance(store, SharedStore):
            self._near = NearTier(
                opts.near_maxsize, opts.near_ttl, opts.clock, watched=store.announces
            )
            if not self._asynchronous:
                store.near_watch(self._near)  # an asyncio store's, on each loop it runs on
        # The hit path's read: an in-process store's, or the near cache's; a shared
        # store has none (its read is a round trip, made once, by the slow path).
        near = self._near
        self._hit_get = store.get if store.local else None if near is None else near.get
        self._peek = make_peek(self._hit_get, opts.clock, self._counters, near=near is not None)
        leases = store if opts.distributed else None
        # Fencing of in-process stores: thread locks, whatever the flavour.
        self._thread_fences: Fences | None = None
        self._host: Host[Any, Any, Any]
        if self._asynchronous:
            self._flight = AsyncSingleFlight()
            fences = AsyncFences(store.local, near)
            self._thread_fences = fences.threads
            self._host = Host(store, leases, opts, self._rec, self._flight, fences, near)
        else:
            self._flight = SingleFlight()
            self._thread_fences = Fences(None if store.local else ReadGroup(), near)
            self._host = Host(
                store, leases, opts, self._rec, self._flight, self._thread_fences, near
            )

    # -- introspection -------------------------------------------------------

    @property
    def ttl(self) -> float:
        return self._options.ttl

    @property
    def beta(self) -> float:
        return self._options.beta

    @property
    def stale_ttl(self) -> float:
        return self._options.stale_ttl

    @property
    def error_ttl(self) -> float:
        return self._options.error_ttl

    @property
    def wait_timeout(self) -> float | None:
        return self._options.wait_timeout

    @property
    def namespace(self) -> str:
        return self._options.namespace

    @property
    def backend(self) -> Store:
        return self._backend

    @property
    def name(self) -> str:
        """The name given to the metrics hook (``name=``, else the namespace)."""
        return self._options.name

    def stats(self) -> Stats:
        """A frozen snapshot of the counters."""
        return self._counters.snapshot()

    def __repr__(self) -> str:
        o = self._options
        return (
            f"{type(self).__name__}({self._backend!r}, ttl={o.ttl}, beta={o.beta}, "
            f"stale_ttl={o.stale_ttl}, namespace={o.namespace!r})"
        )

    # -- for the shells and the decorator ---------------------------------------

    def _with_policy(self, policy: Mapping[str, Any], *, where: str = "cached") -> Any:
        """A view of this cache with its own policy options (``POLICY_NAMES``): the
        same store, keys, single-flight, fences, counters and near cache.

        ``@cached(cache=<this cache>, ttl=...)`` decorates with one. Raises
        ``TypeError`` for an option that defines the store (see ``with_policy``).
        """
        opts = self._options.with_policy(policy, where=where)
        view = copy.copy(self)
        view._options = opts
        store = self._backend
        if isinstance(store, SharedStore) and store.codec is not None:
            # A reader of a shared store draws its XFetch point with its own beta and
            # rebuilds the error types it names: a codec of the view's own.
            codec = Codec(
                store.codec.serializer,
                clock=opts.clock,
                beta=opts.beta,
                error_types=opts.error_types,
            )
            store = store.bind(codec, opts.namespace)
        view._backend = store
        host = self._host
        view._host = Host(
            store,
            store if host.leases is not None else None,
            opts,
            self._rec,
            self._flight,
            host.fences,
            self._near,
        )
        view._root = self._root
        return view


    def _key(self, key: Hashable) -> Hashable:
        return key if self._make_key is None else self._make_key(key)

    # -- many keys at once: what both shells' get_many / get_or_load_many share ---------

    def _many(self, keys: Iterable[Any]) -> dict[Any, Hashable]:
        """Each distinct key asked, in order, with its store key."""
        make_key = self._make_key
        ks: dict[Any, Hashable] = {}
        for key in keys:
            if key not in ks:
                ks[key] = key if make_key is None else make_key(key)
        return ks

    def _peek_many(self, ks: dict[Any, Hashable], found: dict[Any, Any]) -> list[Any]:
        """Serve what the hit path can into ``found``; the keys it could not."""
        peek = self._peek
        todo = []
        for key, k in ks.items():
            value = peek(k)
            if value is MISSING:
                todo.append(key)
            else:
                found[key] = value
        return todo

    def _looked_up_many(
        self, ks: dict[Any, Hashable], entries: list[Entry[Any] | None]
    ) -> dict[Any, Any]:
        """What ``get_many`` answers for the entries read."""
        host = self._host
        found = {}
        for key, entry in zip(ks, entries, strict=True):
            value = host.looked_up(entry, MISSING)
            if value is not MISSING:
                found[key] = value
        return found

    def _served_many(
        self,
        todo: list[tuple[Any, Hashable]],
        entries: list[Entry[Any] | None],
        one: Callable[[Any], Any],
        cache_if: Callable[[Any], bool] | None,
        found: dict[Any, Any],
    ) -> list[tuple[Any, Hashable, Entry[Any] | None]]:
        """Serve the entries read that can be served (starting background refreshes,
        each through ``one(key)``, a loader of that key alone); the missing keys.

        Every key is judged before any load is joined: a negative entry raises
        here, leaving no flight led and unfinished.
        """
        host = self._host
        decisions = [host.served(entry) for entry in entries]
        missing = []
        for (key, k), entry, decision in zip(todo, entries, decisions, strict=True):
            if decision is Decision.MISS:
                missing.append((key, k, entry))
                continue
            assert entry is not None
            if decision is Decision.REFRESH or decision is Decision.STALE:
                early = decision is Decision.REFRESH
                self._refresh(k, functools.partial(one, key), entry, early, cache_if)  # type: ignore[attr-defined]
            found[key] = entry.value
        return missing

    def _drop_local(self, where: Callable[[Hashable], bool]) -> None:
        """Drop the in-process entries whose store key satisfies ``where``, fencing
        their loads in flight (``cache_clear`` of one function in a shared cache)."""
        backend = self._backend
        assert isinstance(backend, MemoryBackend) and self._thread_fences is not None
        self._flight._forget_all(where)
        for k in [k for k in list(backend.mapping.keys()) if where(k)]:
            with self._thread_fences.fence(k):
                self._flight.forget(k)
                backend.delete(k)

"""diskcache: wrap a ``diskcache.Cache`` / ``FanoutCache`` as it is, or open one.

Processes of one host share the folder. An entry is one row: the envelope
as bytes, with diskcache's own ``expire`` set to how long it may be served;
a read asks diskcache for the expiry too (``expire_time=True``) and learns
how long the entry has left from this host's clock, which every process of
the host shares. Folders stampede creates are owner-only (0700); a folder
that other users may write to, or reach through a path others could change,
is refused (``_folder``): whoever can write the cache can make this process
believe anything it reads there.

Fork: SQLite keeps a process's locks in process memory, shared by every
connection to a file, not in the connection. A child forked while another
thread of its parent is inside a diskcache transaction inherits that write
lock, held for good by a connection no thread of the child can close
(Python refuses another thread's connection, and SQLite says not to close
a parent's connection in a child). Its every write would wait the busy
timeout (diskcache's 60 s) and fail. So the child marks such a folder
unusable (``_after_fork``) and every operation on it raises
``ForkedDuringWrite`` at once, a ``BackendUnavailable``: the cache fails
open (or raises, as configured) instead of hanging. A child forked while no
thread writes opens fresh connections (diskcache notices the new pid).
"""

from __future__ import annotations

import os
import re
import sqlite3
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from .._errors import BackendUnavailable
from .._keys import key_rest
from ._folder import resolve_folder
from ._shared import SharedStore, lease_key


def _diskcache() -> Any:
    try:
        import diskcache
    except ImportError:  # pragma: no cover - exercised without the extra
        raise ImportError(
            "the disk backend needs diskcache: pip install 'stampede[disk]'"
        ) from None
    return diskcache


def is_disk_cache(obj: object) -> bool:
    if not type(obj).__module__.startswith("diskcache"):
        return False
    diskcache = _diskcache()
    return isinstance(obj, (diskcache.Cache, diskcache.FanoutCache))


class ForkedDuringWrite(BackendUnavailable):
    """This process was forked while its parent wrote to the folder: see the module docstring."""


# Every diskcache.Cache (a FanoutCache's shards each) a DiskBackend uses, and
# the resolved folder it lies in: what a child looks at after a fork.
_live: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
# Folders this process cannot use: its parent was writing there when it forked.
_unusable: set[str] = set()


def _after_fork() -> None:
    for shard, folder in list(_live.items()):
        # diskcache (5.x) sets _txn_id right after its BEGIN IMMEDIATE and clears
        # it right before COMMIT: a fork during those two statements goes unseen
        # (the child then waits the busy timeout, as it did before this check).
        if getattr(shard, "_txn_id", None) is not None:
            _unusable.add(folder)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


def _refuse_if_unusable(folder: str) -> None:
    if folder in _unusable:
        raise ForkedDuringWrite(
            f"diskcache folder {folder!r} cannot be used in this process: it was forked "
            f"while another thread of its parent was writing there, and SQLite keeps that "
            f"write lock in the child for good. Fork when no thread writes to the store, "
            f"or start processes with 'spawn' or 'forkserver'."
        )


class DiskBackend(SharedStore):
    """Entries in a diskcache folder shared by the processes of one host."""

    name = "diskcache"

    def __init__(self, cache: Any, **options: Any) -> None:
        super().__init__(**options)
        diskcache = _diskcache()
        if isinstance(cache, (str, os.PathLike)):
            self.folder: str = self._checked_folder(Path(cache))
            _refuse_if_unusable(self.folder)  # before opening: that would wait for the lock
            # Opened through the path checked, symlinks resolved once: repointing a
            # link later does not move where this process (each new thread) reads.
            cache = diskcache.Cache(self.folder)
        elif isinstance(cache, (diskcache.Cache, diskcache.FanoutCache)):
            # Already open, under the path its maker chose: the path is checked
            # as it is now, but diskcache opens each thread's connection through
            # it, so a symlink in it must stay put (only this user or root can
            # repoint one the check accepts). Pass a path to have it resolved.
            self.folder = resolve_folder(cache.directory)
            _refuse_if_unusable(self.folder)
        else:
            raise TypeError(f"DiskBackend needs a diskcache Cache or a path, got {cache!r}")
        self.cache = cache
        for shard in self._shards():
            _live[shard] = self.folder
        # A FanoutCache spreads a value and its lease over shards, with no
        # transaction across them: leases need a plain Cache.
        self.supports_leases: bool = not hasattr(cache, "_shards")
        self.errors: tuple[type[BaseException], ...] = (
            diskcache.Timeout,
            sqlite3.Error,
            OSError,
        )

    @staticmethod
    def _checked_folder(path: Path) -> str:
        """``path`` resolved and checked, made owner-only first if missing."""
        if not path.exists():
            old = os.umask(0o077)
            try:
                path.mkdir(mode=0o700, parents=True)
            finally:
                os.umask(old)
        return resolve_folder(path)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> DiskBackend:
        parts = urlsplit(url)
        path = unquote(parts.path)
        if parts.netloc:
            raise ValueError(f"{url!r}: a disk URL is disk:///absolute/path (three slashes)")
        if not path:
            raise ValueError(f"{url!r} names no folder")
        return cls(path, **options)

    def _get_raw(self, key: str) -> tuple[bytes | int | None, float | None]:
        found = _read_row(self._shard(key), key, self.max_value_size)
        if found is None:
            return None, None
        data, expire_time = found
        remaining = None if expire_time is None else expire_time - time.time()
        if not isinstance(data, (bytes, int)):
            return b"", remaining  # something else lives here: a foreign entry
        return data, remaining

    def _get_many_raw(self, keys: Sequence[str]) -> list[tuple[bytes | int | None, float | None]]:
        # One query per shard (and per _MANY keys), reading what _get_raw reads.
        by_shard: dict[int, tuple[Any, list[str]]] = {}
        for key in keys:
            shard = self._shard(key)
            by_shard.setdefault(id(shard), (shard, []))[1].append(key)
        rows: dict[str, tuple[bytes | int | str | None, float | None]] = {}
        for shard, shard_keys in by_shard.values():
            rows.update(_read_rows(shard, shard_keys, self.max_value_size))
        now = time.time()
        found: list[tuple[bytes | int | None, float | None]] = []
        for key in keys:
            row = rows.get(key)
            if row is None:
                found.append((None, None))
                continue
            data, expire_time = row
            remaining = None if expire_time is None else expire_time - now
            found.append((data if isinstance(data, (bytes, int)) else b"", remaining))
        return found

    def _shard(self, key: str) -> Any:
        """The ``Cache`` holding ``key`` (a ``FanoutCache`` spreads keys over shards)."""
        shards = getattr(self.cache, "_shards", None)
        if shards is None:
            return self.cache
        return shards[self.cache._hash(key) % self.cache._count]

    def _refuse(self) -> None:
        if _unusable:  # forked while the parent wrote here: see the module docstring
            _refuse_if_unusable(self.folder)

    def _shards(self) -> list[Any]:
        return list(getattr(self.cache, "_shards", None) or [self.cache])

    def _set_raw(self, key: str, data: bytes, ttl: float) -> None:
        self.cache.set(key, data, expire=ttl)

    def _delete_raw(self, key: str) -> None:
        self.cache.delete(key)

    def _clear_raw(self, prefix: str) -> None:
        for shard in self._shards():
            # Only keys stored as text (raw): reading others would unpickle them.
            rows = shard._sql("SELECT key FROM Cache WHERE raw = 1").fetchall()
            for (key,) in rows:
                if isinstance(key, str) and key_rest(key).startswith(prefix):
                    shard.delete(key)

    # -- leases: an atomic add with expiry; changes in a transaction ------------------

    poll_interval: float = 0.02  # no notifications between processes here: waiters poll

    def _lease_acquire_raw(
        self, key: str, token: str, lease_ttl: float
    ) -> tuple[bool, bytes | int | None, float | None]:
        lease = lease_key(key)
        got = self.cache.add(lease, token, expire=lease_ttl)
        if not got and _forever(self._shard(lease), lease):
            # A lease without an expiry was not taken by stampede (its leases always
            # have one) and would hold the key forever: replace it.
            with self.cache.transact():
                if _forever(self._shard(lease), lease):
                    got = self.cache.set(lease, token, expire=lease_ttl)
        data, remaining = self._get_raw(key)
        return bool(got), data, remaining

    def _lease_renew_raw(self, key: str, token: str, lease_ttl: float) -> bool:
        with self.cache.transact():
            if _holder(self._shard(lease_key(key)), lease_key(key)) != token:
                return False
            return bool(self.cache.touch(lease_key(key), expire=lease_ttl))

    def _lease_commit_raw(
        self, key: str, token: str, data: bytes | None, ttl: float, drop: bool = False
    ) -> bool:
        with self.cache.transact():
            if _holder(self._shard(lease_key(key)), lease_key(key)) != token:
                return False
            if data:
                self.cache.set(key, data, expire=ttl)
            elif drop:
                self.cache.delete(key)
            self.cache.delete(lease_key(key))
            return True

    def _lease_break_raw(
        self, key: str, drop_value: bool, data: bytes | None = None, ttl: float = 0.0
    ) -> None:
        with self.cache.transact():
            self.cache.delete(lease_key(key))
            if data:
                self.cache.set(key, data, expire=ttl)
            elif drop_value:
                self.cache.delete(key)

    def lease_listen(self, key: str) -> _Polling:
        return _Polling()

    def __repr__(self) -> str:
        return f"DiskBackend({self.cache.directory!r})"


# diskcache's own get() unpickles rows stored in its pickle mode: anyone who can
# write the folder's database could run code in this process through it. So
# rows are read here with diskcache's query, and only raw rows are accepted:
# in the database (MODE_RAW) or in a value file of diskcache's naming (MODE_BINARY).
_MODE_RAW, _MODE_BINARY = 1, 2
_VALUE_FILE = re.compile(r"[0-9a-f]{2}/[0-9a-f]{2}/[0-9a-f]{28}\.val")
# A value longer than the limit is not read: its length comes back instead
# (SQLite takes a blob's length from the row header, a value file's from fstat).
_SELECT = (
    "SELECT expire_time, mode, filename, length(value),"
    " CASE WHEN length(value) > ? THEN NULL ELSE value END FROM Cache"
    " WHERE key = ? AND raw = 1 AND (expire_time IS NULL OR expire_time > ?)"
)
_TOKEN_SIZE = 256  # a lease row holds a token (a few dozen bytes); more is foreign


_SELECT_MANY = (
    "SELECT key, expire_time, mode, filename, length(value),"
    " CASE WHEN length(value) > ? THEN NULL ELSE value END FROM Cache"
    " WHERE key IN ({marks}) AND raw = 1 AND (expire_time IS NULL OR expire_time > ?)"
)
_MANY = 500  # keys per query: under SQLite's smallest limit of bound parameters (999)


def _read_rows(
    shard: Any, keys: Sequence[str], limit: int
) -> dict[str, tuple[bytes | int | str | None, float | None]]:
    """``_read_row`` of many keys, in one query per ``_MANY`` keys."""
    found: dict[str, tuple[bytes | int | str | None, float | None]] = {}
    for start in range(0, len(keys), _MANY):
        chunk = list(keys[start : start + _MANY])
        query = _SELECT_MANY.format(marks=", ".join("?" * len(chunk)))
        for key, *row in shard._sql(query, (limit, *chunk, time.time())).fetchall():
            value = _row_value(shard, row, limit)
            if value is not None and isinstance(key, str):
                found[key] = value
    return found


def _read_row(
    shard: Any, key: str, limit: int
) -> tuple[bytes | int | str | None, float | None] | None:
    """The raw value under ``key`` and its expiry, without ever unpickling anything
    nor reading more than ``limit`` bytes (a longer value: its size, as an int)."""
    rows = shard._sql(_SELECT, (limit, key, time.time())).fetchall()
    if not rows:
        return None
    return _row_value(shard, rows[0], limit)


def _row_value(
    shard: Any, row: Sequence[Any], limit: int
) -> tuple[bytes | int | str | None, float | None] | None:
    """What a row of ``_SELECT`` holds: see ``_read_row``."""
    expire_time, mode, filename, size, value = row
    if mode == _MODE_RAW:
        if value is None and size is not None:
            return int(size), expire_time
        if isinstance(value, (bytes, memoryview)):
            return bytes(value), expire_time
        return (value if isinstance(value, str) else b""), expire_time  # text: a lease token
    if mode == _MODE_BINARY and isinstance(filename, str) and _VALUE_FILE.fullmatch(filename):
        try:
            with open(os.path.join(shard.directory, filename), "rb") as f:
                size = os.fstat(f.fileno()).st_size
                return (size if size > limit else f.read(limit + 1)), expire_time
        except OSError:  # removed meanwhile
            return None
    return b"", expire_time  # pickled, text, or a file not of diskcache's: foreign


def _holder(shard: Any, key: str) -> object:
    found = _read_row(shard, key, _TOKEN_SIZE)
    return None if found is None else found[0]


def _forever(shard: Any, key: str) -> bool:
    """Whether a row under ``key`` never expires."""
    found = _read_row(shard, key, _TOKEN_SIZE)
    return found is not None and found[1] is None


class _Polling:
    """Waiting for a lease on disk: a bounded sleep, the caller looks again after it."""

    def __enter__(self) -> _Polling:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def wait(self, timeout: float) -> None:
        time.sleep(min(timeout, DiskBackend.poll_interval))

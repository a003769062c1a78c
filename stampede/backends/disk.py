"""diskcache: wrap a ``diskcache.Cache`` / ``FanoutCache`` as it is, or open one.

Processes of one host share the folder. An entry is one row: the envelope
as bytes, with diskcache's own ``expire`` set to how long it may be served;
a read asks diskcache for the expiry too (``expire_time=True``) and learns
how long the entry has left from this host's clock, which every process of
the host shares. Folders stampede creates are owner-only (0700); a folder
that other users may write to is refused: whoever can write the cache can
make this process believe anything it reads there.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from .._keys import key_rest
from ._shared import SharedStore


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


def check_folder(path: str | os.PathLike[str]) -> None:
    """Refuse a cache folder that users other than its owner may write to."""
    mode = os.stat(path).st_mode
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise PermissionError(
            f"refusing the cache folder {os.fspath(path)!r}: it is writable by group or others "
            f"(mode {stat.S_IMODE(mode):o}); whoever writes there controls what this process "
            f"reads. Use a folder with mode 0700 (chmod go-w)."
        )


class DiskBackend(SharedStore):
    """Entries in a diskcache folder shared by the processes of one host."""

    name = "diskcache"

    def __init__(self, cache: Any, **options: Any) -> None:
        super().__init__(**options)
        diskcache = _diskcache()
        if isinstance(cache, (str, os.PathLike)):
            cache = self._open(diskcache, Path(cache))
        elif not isinstance(cache, (diskcache.Cache, diskcache.FanoutCache)):
            raise TypeError(f"DiskBackend needs a diskcache Cache or a path, got {cache!r}")
        check_folder(cache.directory)
        self.cache = cache
        self.errors = (diskcache.Timeout, sqlite3.Error, OSError)

    @staticmethod
    def _open(diskcache: Any, path: Path) -> Any:
        if not path.exists():
            old = os.umask(0o077)
            try:
                path.mkdir(mode=0o700, parents=True)
            finally:
                os.umask(old)
        check_folder(path)
        return diskcache.Cache(str(path))

    @classmethod
    def from_url(cls, url: str, **options: Any) -> DiskBackend:
        parts = urlsplit(url)
        path = unquote(parts.path)
        if parts.netloc:
            raise ValueError(f"{url!r}: a disk URL is disk:///absolute/path (three slashes)")
        if not path:
            raise ValueError(f"{url!r} names no folder")
        return cls(path, **options)

    def _get_raw(self, key: str) -> tuple[bytes | None, float | None]:
        data, expire_time = self.cache.get(key, default=None, expire_time=True)
        if data is None:
            return None, None
        if not isinstance(data, bytes):
            return b"", 1.0  # something else lives here: a foreign entry
        return data, (None if expire_time is None else expire_time - time.time())

    def _set_raw(self, key: str, data: bytes, ttl: float) -> None:
        self.cache.set(key, data, expire=ttl)

    def _delete_raw(self, key: str) -> None:
        self.cache.delete(key)

    def _clear_raw(self, prefix: str) -> None:
        for key in list(self.cache.iterkeys()):
            if isinstance(key, str) and key_rest(key).startswith(prefix):
                self.cache.delete(key)

    # -- leases: an atomic add with expiry; changes in a transaction ------------------

    supports_leases = True
    poll_interval = 0.02  # no notifications between processes here: waiters poll

    def _lease_acquire_raw(
        self, key: str, token: str, lease_ttl: float
    ) -> tuple[bool, bytes | None, float | None]:
        got = self.cache.add(lease_key(key), token, expire=lease_ttl)
        data, remaining = self._get_raw(key)
        return bool(got), data, remaining

    def _lease_renew_raw(self, key: str, token: str, lease_ttl: float) -> bool:
        with self.cache.transact():
            if self.cache.get(lease_key(key)) != token:
                return False
            return bool(self.cache.touch(lease_key(key), expire=lease_ttl))

    def _lease_commit_raw(self, key: str, token: str, data: bytes | None, ttl: float) -> bool:
        with self.cache.transact():
            if self.cache.get(lease_key(key)) != token:
                return False
            if data:
                self.cache.set(key, data, expire=ttl)
            self.cache.delete(lease_key(key))
            return True

    def _lease_break_raw(self, key: str, drop_value: bool) -> None:
        with self.cache.transact():
            self.cache.delete(lease_key(key))
            if drop_value:
                self.cache.delete(key)

    def lease_listen(self, key: str) -> _Polling:
        return _Polling()

    def __repr__(self) -> str:
        return f"DiskBackend({self.cache.directory!r})"


def lease_key(key: str) -> str:
    return key + ":lease"


class _Polling:
    """Waiting for a lease on disk: a bounded sleep, the caller looks again after it."""

    def __enter__(self) -> _Polling:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def wait(self, timeout: float) -> None:
        time.sleep(min(timeout, DiskBackend.poll_interval))

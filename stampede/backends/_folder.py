"""Which cache folders are safe to read: the whole path, not only its last folder.

Whoever can change what a path leads to decides what this process reads
there, and diskcache's removal of rows it reads deletes the files they
name with this process's rights. So a folder is accepted only when no one
but this user (and root) can change any step of the path to it:

- the folder belongs to this user and only its owner may write to it;
- every parent up to ``/`` belongs to this user or root, and is not
  writable by group or others, unless it has the sticky bit (like
  ``/tmp``) and the next step down belongs to this user or root (the sticky
  bit stops others from renaming or removing entries they do not own);
- every symlink met on the way belongs to this user or root, and so does
  every folder a symlink is read from (the same rules as parents).

The path is resolved once, here, step by step (not by ``os.path.realpath``,
which would hide the symlinks it follows), and callers open the resolved
path: a link repointed later does not move where this process reads.
Where there is no ``geteuid`` (Windows) owners are not compared.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import deque

_MAX_LINKS = 40  # as the kernel's ELOOP limit: a cycle of links ends with an error


def _euid() -> int | None:
    geteuid = getattr(os, "geteuid", None)
    return None if geteuid is None else int(geteuid())


def _trusted(uid: int) -> bool:
    """Owned by this user or root (root can change anything anyway)."""
    me = _euid()
    return me is None or uid in (me, 0)


def _check_parent(folder: str, info: os.stat_result, child: str, child_uid: int) -> None:
    """Refuse ``folder`` if someone else could replace its entry ``child``."""
    if not _trusted(info.st_uid):
        raise PermissionError(
            f"refusing the cache folder path through {folder!r}: it belongs to another user "
            f"(uid {info.st_uid}), who could replace {child!r} and decide what this "
            f"process reads"
        )
    mode = info.st_mode
    if not mode & (stat.S_IWGRP | stat.S_IWOTH):
        return
    if mode & stat.S_ISVTX and _trusted(child_uid):
        return  # like /tmp: others may add entries but not replace this one
    raise PermissionError(
        f"refusing the cache folder path through {folder!r}: it is writable by group or "
        f"others (mode {stat.S_IMODE(mode):o}) without the sticky bit on an entry of this "
        f"user, so others could replace {child!r} and decide what this process reads. "
        f"Use a folder whose parents only you (or root) may write to."
    )


def resolve_folder(path: str | os.PathLike[str]) -> str:
    """The real path of cache folder ``path``, once every step to it is checked.

    Raises:
        PermissionError: a step of the path others could change (see the module
            docstring); the message names it.
        OSError: the path does not exist, or has a cycle of symlinks.
    """
    given = os.fspath(path)
    # Not os.path.abspath: it would drop "x/.." before knowing whether x is a link.
    pending = deque(os.path.join(os.getcwd(), given).split("/"))
    resolved = "/"
    folder_info = os.lstat(resolved)
    links = 0
    while pending:
        name = pending.popleft()
        if name in ("", "."):
            continue
        if name == "..":
            resolved = os.path.dirname(resolved)
            folder_info = os.lstat(resolved)
            continue
        step = os.path.join(resolved, name)
        info = os.lstat(step)
        _check_parent(resolved, folder_info, step, info.st_uid)
        if stat.S_ISLNK(info.st_mode):
            if not _trusted(info.st_uid):
                raise PermissionError(
                    f"refusing the cache folder {given!r}: the symlink {step!r} belongs to "
                    f"another user (uid {info.st_uid}), who could repoint it"
                )
            links += 1
            if links > _MAX_LINKS:
                raise OSError(errno.ELOOP, "too many levels of symbolic links", given)
            target = os.readlink(step)
            pending.extendleft(reversed(target.split("/")))
            if target.startswith("/"):
                resolved = "/"
                folder_info = os.lstat(resolved)
            continue
        resolved, folder_info = step, info
    _check_own_folder(resolved, folder_info)
    return resolved


def _check_own_folder(folder: str, info: os.stat_result) -> None:
    if not stat.S_ISDIR(info.st_mode):
        raise NotADirectoryError(errno.ENOTDIR, "the cache folder is not a folder", folder)
    me = _euid()
    if me is not None and info.st_uid != me:
        raise PermissionError(
            f"refusing the cache folder {folder!r}: it belongs to another user "
            f"(uid {info.st_uid}), who could then decide what this process reads"
        )
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise PermissionError(
            f"refusing the cache folder {folder!r}: it is writable by group or others "
            f"(mode {stat.S_IMODE(info.st_mode):o}); whoever writes there controls what "
            f"this process reads. Use a folder with mode 0700 (chmod go-w)."
        )

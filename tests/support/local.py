"""What the private test servers (``redis_server``, ``pg_server``) share: a free
loopback port, and the tail of a log file. Standard library only."""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence


def free_port(host: str, avoid: Sequence[int], error: type[Exception]) -> int:
    """A port the OS just called free (bind to port 0, read it back, close), never
    one of ``avoid`` (the machine's shared servers); ``error`` when none is found."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port not in avoid:
            return port
    raise error("could not find a free loopback port")


def tail(path: str | None, lines: int) -> str:
    """The last ``lines`` lines of the file at ``path`` (its last 64 KiB read; ``""``
    when there is none)."""
    if path is None:
        return ""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 64 * 1024))
            text = fh.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])

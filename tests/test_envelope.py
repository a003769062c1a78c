"""The envelope's reader keeps what it learnt from an entry's head: never more than it may."""

from __future__ import annotations

import math
import os
import struct
import time
import zlib

import pytest

from stampede import _envelope
from stampede._entry import Entry
from stampede._envelope import CorruptEntry
from stampede.serializers import DataSerializer

from .helpers import fork

pytestmark = pytest.mark.timeout(30)

SERIALIZER = DataSerializer()
DOMAIN = _envelope.clock_domain(time.monotonic)


def _bytes(key: str, now: float, *, fresh: float = 60.0) -> bytes:
    entry = Entry({"v": 1}, None, now + fresh, now + 120.0, 0.01, now + fresh - 1, -math.inf)
    return _envelope.encode(key, entry, now, SERIALIZER, DOMAIN)


def _read(data: bytes, key: str, now: float, domain: bytes = DOMAIN) -> Entry[object]:
    return _envelope.decode(data, key, SERIALIZER, now, 100.0, 1.0, (), domain)


def _resealed(data: bytes, at: int, fmt: str, value: object) -> bytes:
    """``data`` with one head field replaced and its checksum made right again."""
    body = bytearray(data[:-4])
    struct.pack_into(fmt, body, at, value)
    return bytes(body) + struct.pack("<I", zlib.crc32(bytes(body)))


def test_a_head_read_before_still_belongs_to_its_key_only() -> None:
    now = time.monotonic()
    data = _bytes("a", now)
    first = _read(data, "a", now)
    again = _read(data, "a", now)  # from what was kept
    assert (again.value, again.fresh_until, again.check_at) == (
        first.value,
        first.fresh_until,
        first.check_at,
    )
    with pytest.raises(CorruptEntry, match="another key"):
        _read(data, "b", now)


def test_a_refused_head_is_refused_every_time() -> None:
    now = time.monotonic()
    stale_offset = _envelope._HEAD.size - 3 * 8  # fresh, stale, retry, delta: 4d at the end
    bad = _resealed(_bytes("a", now), stale_offset, "<d", -1.0)
    for _ in range(3):
        with pytest.raises(CorruptEntry, match="impossible timing"):
            _read(bad, "a", now)
    assert bad[: _envelope._HEAD.size] not in _envelope._heads


def test_a_writer_time_that_is_not_finite_is_never_taken() -> None:
    now = time.monotonic()
    written_at = 4 + 1 + 1 + 8 + 8
    for at in (math.inf, -math.inf, math.nan):
        data = _resealed(_bytes("a", now), written_at, "<d", at)
        entry = _read(data, "a", now)  # placed by the store's remaining time instead
        assert entry.stale_until == pytest.approx(now + 100.0)


def test_the_kept_heads_are_bounded() -> None:
    now = time.monotonic()
    for i in range(_envelope._MEMO + 50):
        _read(_bytes("a", now + i * 1e-3), "a", now + 100)
    assert len(_envelope._heads) <= _envelope._MEMO


def test_a_forked_child_draws_apart_from_its_parent_for_a_head_both_read() -> None:
    now = time.monotonic()
    data = _bytes("a", now)
    parent = _read(data, "a", now).check_at
    read, write = os.pipe()
    pid = fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            child = _read(data, "a", now).check_at
            os.write(write, b"same" if child == parent else b"apart")
        finally:
            os._exit(0)
    os.close(write)
    try:
        answer = os.read(read, 16)
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    assert answer == b"apart"

"""Keys: call normalisation, injective text encoding, stability across processes."""

from __future__ import annotations

import datetime
import decimal
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from stampede import CoalescingCache, cached
from stampede._keys import MAX_KEY_LENGTH, CallKey, encode_key, key_namespace, key_rest

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(),
    st.binary(),
    st.dates(),
    st.datetimes(timezones=st.one_of(st.none(), st.timezones())),
    st.times(),
    st.timedeltas(),
    st.decimals(allow_nan=False),
    st.uuids(),
)
keys = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4).map(tuple), st.frozensets(inner, max_size=4)
    ),
    max_leaves=12,
)


def typed_equal(a: Any, b: Any) -> bool:
    """Equal values of equal types, all the way down (what a typed key means)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, tuple):
        return len(a) == len(b) and all(typed_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, frozenset):
        return len(a) == len(b) and all(any(typed_equal(x, y) for y in b) for x in a)
    if isinstance(a, float):
        return a.hex() == b.hex()  # 0.0 and -0.0 are different keys
    if isinstance(a, datetime.datetime | datetime.time):
        return a == b and a.isoformat() == b.isoformat()
    if isinstance(a, decimal.Decimal):
        return str(a) == str(b)
    return bool(a == b)


@settings(max_examples=400, deadline=None)
@given(keys, keys)
def test_encoding_is_injective(a: Any, b: Any) -> None:
    if typed_equal(a, b):
        assert encode_key("ns", a) == encode_key("ns", b)
    else:
        assert encode_key("ns", a) != encode_key("ns", b)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=8), st.text(max_size=8), keys)
def test_namespaces_never_collide(ns1: str, ns2: str, key: Any) -> None:
    if ns1 != ns2:
        assert encode_key(ns1, key) != encode_key(ns2, key)


def test_separator_and_type_lookalikes() -> None:
    assert encode_key("", ("a:b", "c")) != encode_key("", ("a", "b:c"))
    assert len({encode_key("", v) for v in (1, 1.0, True, "1", b"1", (1,))}) == 6
    assert encode_key("a:b", "c") != encode_key("a", "b:c")


def test_long_keys_are_hashed_and_short_ones_readable() -> None:
    short = encode_key("users", ("alice", 42))
    assert "alice" in short and key_rest(short).startswith("5:users:v1:")
    assert short.startswith("stampede:{") and short.index("}") == len("stampede:{") + 16
    long = encode_key("users", "x" * 1000)
    assert len(long) < MAX_KEY_LENGTH + 40 and "#" in long
    assert long.startswith(encode_key("users", "x" * 1000)[:100])  # the head stays readable
    assert encode_key("users", "x" * 1000) == long
    assert encode_key("users", "x" * 1000 + "y") != long
    assert len(encode_key("", "x" * (MAX_KEY_LENGTH - 10))) < MAX_KEY_LENGTH + 40


@pytest.mark.parametrize("length", [5, 50, 150, 300])
def test_a_functions_keys_share_a_prefix_even_when_hashed(length: int) -> None:
    """A function's keys all start with its prefix, a short one, however long its name.

    Before the fix the prefix held the whole name: a hashed key (its head cut at
    120 characters) lost it past ~114 characters, and function_prefix raised
    AssertionError past ~190.
    """
    from stampede._keys import FN_MARK, function_prefix

    name = "mod." + "f" * (length - 4)
    prefix = function_prefix("ns", name)
    assert len(prefix) < 40
    for args in [(1,), ("x" * 500,), (None, b"y" * 300)]:
        text = encode_key("ns", (FN_MARK, name, args))
        assert key_rest(text).startswith(prefix) and name[:60] in text  # readable head
    for other in (name + "g", name[:-1], "ns." + name[3:]):
        assert not key_rest(encode_key("ns", (FN_MARK, other, (1,)))).startswith(prefix)
    assert not key_rest(encode_key("ns", ("@", name, (1,)))).startswith(prefix)


def test_entries_under_the_earlier_function_key_layout_are_misses(tmp_path: Path) -> None:
    """An entry under a function key of the layout before the short function prefix
    (``t3(@s<len>:<name>...)``) is a miss, not a hit nor an error."""
    import hashlib

    from stampede._keys import _encode, namespace_prefix

    from .helpers import disk_store

    shared: CoalescingCache[Any] = CoalescingCache(disk_store(tmp_path), ttl=60)
    calls: list[int] = []

    @cached(cache=shared)
    def h(x: int) -> int:
        calls.append(x)
        return x

    fn_id = f"{h.__module__}.{h.__qualname__}"
    rest = f"{namespace_prefix('')}t3(@{_encode(fn_id)}{_encode((1,))})"
    tag = hashlib.blake2b(rest.encode(), digest_size=8).hexdigest()
    earlier = f"stampede:{{{tag}}}:{rest}"
    assert h(1) == 1
    entry = shared.backend.get(shared._key(h.cache_key(1)))
    assert entry is not None
    shared.backend.delete(shared._key(h.cache_key(1)))
    shared.backend.set(earlier, entry)  # what the earlier layout stored for h(1)
    assert h(1) == 1 and calls == [1, 1]


def test_user_text_cannot_choose_the_cluster_slot() -> None:
    a = encode_key("", "{user1000}.following")
    b = encode_key("", "{user1000}.followers")
    tag = lambda k: k[k.index("{") + 1 : k.index("}")]  # noqa: E731 - what Redis hashes
    assert tag(a) != tag(b) and "user1000" not in tag(a)


def test_unsupported_values_are_a_clear_type_error() -> None:
    class Thing:
        pass

    with pytest.raises(TypeError, match=r"Thing.*key="):
        encode_key("", (1, Thing()))


_SAMPLES: list[Any] = [
    None,
    True,
    -(2**70),
    1.5,
    -0.0,
    "héllo:wörld",
    b"\x00\xff",
    ("nested", (1, 2.0), frozenset({"b", "a", "c"})),
    datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc),
    datetime.date(2026, 11, 23),
    datetime.timedelta(days=-1, seconds=5),
    decimal.Decimal("1.10"),
    uuid.UUID(int=12345),
    frozenset(range(50)),
]


def test_same_call_same_key_in_another_process() -> None:
    here = [encode_key("ns", k) for k in _SAMPLES]
    script = (
        "import json, sys; sys.path.insert(0, 'tests'); "
        "from test_keys import _SAMPLES; from stampede._keys import encode_key; "
        "print(json.dumps([encode_key('ns', k) for k in _SAMPLES]))"
    )
    for seed in ("1", "2"):  # different string hashing: the encoding must not care
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", script],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            cwd=os.path.dirname(os.path.dirname(__file__)),
        )
        assert json.loads(out.stdout) == here


def test_keys_with_lone_surrogates_work_on_shared_stores(tmp_path: Path, redis_url: str) -> None:
    """Text keys with lone surrogates are stored on diskcache and Redis, apart from their escapes.

    Regression test for 3a21f4a (Review fixes: keys with lone surrogates escaped).
    """
    # Imported here: test_same_call_same_key_in_another_process imports this module
    # as a top-level one, where a relative import fails.
    from .helpers import disk_store

    for store in (disk_store(tmp_path), redis.Redis.from_url(redis_url)):
        cache: CoalescingCache[int] = CoalescingCache(store, ttl=60)
        assert cache.get_or_load("\ud800", lambda: 1) == 1
        assert cache.get_or_load("\\ud800", lambda: 2) == 2  # not the same key
        assert cache.get("\ud800") == 1


# -- call keys ------------------------------------------------------------------------


def f(a: int, b: int = 2, c: int = 3) -> None:
    pass


def g(a: int, /, b: int, *rest: int, c: int, d: int = 4, **kw: int) -> None:
    pass


@settings(max_examples=200, deadline=None)
@given(st.integers(), st.integers(), st.integers(), st.integers(0, 3))
def test_every_spelling_of_a_call_gives_one_key(a: int, b: int, c: int, split: int) -> None:
    key = CallKey(f)
    canonical = key((a, b, c), {})
    names = ("a", "b", "c")
    values = (a, b, c)
    args = values[:split]
    kwargs = dict(zip(names[split:], values[split:], strict=True))
    assert key(args, kwargs) == canonical
    assert key(args, dict(reversed(list(kwargs.items())))) == canonical


def test_defaults_are_filled_in() -> None:
    key = CallKey(f)
    assert key((1,), {}) == key((1, 2, 3), {}) == key((), {"a": 1, "c": 3})


def test_complex_signatures_bind() -> None:
    key = CallKey(g)
    assert key((1, 2), {"c": 3}) == key((1,), {"b": 2, "c": 3, "d": 4})
    assert key((1, 2, 9), {"c": 3}) != key((1, 2), {"c": 3, "x": 9})
    assert key((1, 2), {"c": 3, "x": 1, "y": 2}) == key((1, 2), {"y": 2, "c": 3, "x": 1})
    with pytest.raises(TypeError):
        key((), {"a": 1, "b": 2, "c": 3})  # a is positional-only


def test_typed_call_keys() -> None:
    key = CallKey(f, typed=True)
    assert len({key((v, 0, 0), {}) for v in (1, 1.0, True)}) == 3
    assert key((1,), {}) == key((1, 2, 3), {})


def test_typed_keys_type_keyword_arguments_too() -> None:
    """With typed=True, arguments caught by ``**kwargs`` are typed as well: 1 and 1.0 differ.

    Regression test for 3a21f4a (Review fixes: typed **kwargs, positional-only keywords).
    """

    @cached(typed=True)
    def f(**kw: Any) -> str:
        return repr(kw)

    assert f(a=1) == "{'a': 1}" and f(a=1.0) == "{'a': 1.0}"


def test_positional_only_parameters_named_by_keyword_are_refused() -> None:
    """A positional-only parameter passed by keyword is a TypeError, as in a plain call.

    Regression test for 3a21f4a (Review fixes: typed **kwargs, positional-only keywords);
    on Python 3.13.0 it also needs 6393671 (Python 3.10 and 3.13: ... a positional-only
    argument passed by keyword raises TypeError on 3.13.0's Signature.bind too).
    """

    @cached
    def f(a: int, /, b: int) -> int:
        return a + b

    assert f(1, 2) == 3
    with pytest.raises(TypeError):
        f(a=1, b=2)  # type: ignore[call-arg]


@given(namespace=st.text(st.characters(exclude_categories=["Cs"])), key=st.text())
def test_the_namespace_is_read_back_from_a_text_key(namespace: str, key: str) -> None:
    """``key_namespace`` gives back the namespace of any key (Redis wake-ups are
    published on the channel of the namespace read so), hashed long keys included."""
    assert key_namespace(encode_key(namespace, key)) == namespace
    assert key_namespace(encode_key(namespace, key * 50)) == namespace


def test_a_key_not_laid_out_by_encode_key_has_no_namespace() -> None:
    tag = "stampede:{0123456789abcdef}:"
    for text in ("k", "", f"{tag}x", f"{tag}5:ab", f"{tag}\u00b2:ab:v1:", f"{tag}2:ab:v2:"):
        assert key_namespace(text) is None, text


# One encoder (and its kept texts) for the whole run: hypothesis's examples meet in it.
_kept_encoder = None


@settings(max_examples=400, deadline=None)
@given(st.lists(keys, min_size=1, max_size=6))
def test_a_functions_encoder_gives_encode_keys_text_whatever_it_kept(calls: list[Any]) -> None:
    """``function_key_encoder`` keeps the texts of calls with str/int arguments; a
    later call with equal arguments of other types (1.0, True for 1) still gets
    its own text, the one ``encode_key`` gives."""
    from stampede._keys import FN_MARK, FunctionKeys

    global _kept_encoder
    if _kept_encoder is None:
        _kept_encoder = FunctionKeys("ns", "mod.fn")
    for k in calls:
        args = k if type(k) is tuple else (k,)
        assert _kept_encoder(args) == encode_key("ns", (FN_MARK, "mod.fn", args))


def test_kept_texts_never_answer_for_an_equal_key_of_another_type() -> None:
    from stampede._keys import FN_MARK, FunctionKeys

    encode = FunctionKeys("ns", "mod.fn")
    for args in [(1,), (1, "a"), ("a", 1)]:
        encode(args)  # kept
    for args in [(1.0,), (True,), (1, "a"), (True, "a"), (1.0, "a"), ("a", True)]:
        assert encode(args) == encode_key("ns", (FN_MARK, "mod.fn", args))
    assert len({encode((1,)), encode((1.0,)), encode((True,))}) == 3


def test_a_shared_stores_key_maker_keeps_only_str_keys_texts(tmp_path: Path) -> None:
    from .helpers import disk_store

    cache: CoalescingCache[Any] = CoalescingCache(disk_store(tmp_path), namespace="ns")
    make = cache._make_key
    assert make is not None
    for k in ["a", "a", 1, 1.0, True, ("a",)]:
        assert make(k) == encode_key("ns", k)
    assert len({make(1), make(1.0), make(True), make("1")}) == 4

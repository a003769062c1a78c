"""Keys: from a call to a cache key, and from a cache key to text for shared stores.

Call keys (``CallKey``) come from the function's signature, so ``f(1)``,
``f(x=1)`` and ``f()`` with ``x=1`` as the default are one key. The common
case, a call with every parameter given by position and no keyword, costs
nothing: the ``args`` tuple *is* the key. Other calls are normalised into
the same tuple (parameter order, defaults filled in); signatures with
``*args``/``**kwargs``/keyword-only parameters go through ``Signature.bind``.

A key is the tuple of the argument values, ``self``/``cls`` included for
methods: an instance is part of the key through its own ``__hash__``/``__eq__``
(identity by default), and an entry keeps its instance alive until evicted.

``encode_key`` turns a key into text for byte-oriented stores (disk, Redis):
each value is written with a type tag and a length where needed, so the
encoding is injective (``("a:b", "c")`` and ``("a", "b:c")`` differ, and so
do ``1``, ``1.0``, ``True`` and ``"1"``: encoded keys are always typed). It is
prefixed by the namespace and ``KEY_VERSION``, and hashed when long. The same
call gives the same text in every process: nothing depends on ``hash()``.

Every text key starts with a Redis Cluster hash tag of its own, a digest of
the rest (``stampede:{3f2a...}:5:users:v1:...``): keys that belong together
(a value and its lease) share a slot, and no user text can choose the slot,
since Redis only looks at the first ``{...}``. ``key_rest`` strips the tag
for matching by namespace or function.

A function's key in a shared cache, ``(FN_MARK, fn_id, key)``, is written
``@``, a 16-digit digest of ``fn_id``, then ``fn_id`` and ``key`` as usual:
``5:users:v1:@6f0f3c02a3f6fae9s12:app.get_usert1(i12;)``. ``function_prefix``
is the namespace and that ``@<digest>``: short whatever the name's length, and
always inside the head a hashed key keeps, so ``cache_clear()`` finds every
key of the function (hashed ones included) and fences its loads. The digest
has a fixed length and no other value's encoding starts with ``@``, so the
encoding stays injective; the whole name follows it, so keys stay readable,
and two functions whose digests met would still have distinct keys (a clear
of one would take both). The earlier layout (``t3(@s5:app.f...``, unreleased)
is never produced now: entries under it are misses until they expire.
"""

from __future__ import annotations

import datetime
import decimal
import enum
import functools
import hashlib
import inspect
import uuid
from collections.abc import Callable, Hashable
from typing import Any

KEY_VERSION = 1

FN_MARK = object()  # marks a function's keys in a shared cache: no user key can contain it
_FN_DIGEST_LENGTH = 16  # hex digits: 64 bits, like the hash tag
MAX_KEY_LENGTH = 200  # longer encodings keep a head and add the SHA-256 of the whole
_KEPT_HEAD = 120

_SIMPLE_KINDS = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


class CallKey:
    """Builds the key of a call of ``fn`` from its bound arguments."""

    __slots__ = (
        "_defaults",
        "_names",
        "_positional_only",
        "_signature",
        "arity",
        "fn_name",
        "typed",
    )

    def __init__(self, fn: Callable[..., Any], *, typed: bool = False) -> None:
        self._signature = inspect.signature(fn)
        params = list(self._signature.parameters.values())
        self.typed = typed
        self.fn_name = getattr(fn, "__qualname__", repr(fn))
        if all(p.kind in _SIMPLE_KINDS for p in params):
            # Positional-only calls with every parameter given need no work.
            self.arity = len(params)
            # Positional-only parameters cannot be named: such calls go to bind().
            positional = [p for p in params if p.kind is inspect.Parameter.POSITIONAL_ONLY]
            self._positional_only = frozenset(p.name for p in positional)
            self._names: tuple[str, ...] | None = tuple(p.name for p in params)
            self._defaults = tuple(p.default for p in params)
        else:
            self.arity = -1  # never equal to len(args): always normalise
            self._positional_only = frozenset()
            self._names = None
            self._defaults = ()

    def __call__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
        """The key of ``fn(*args, **kwargs)``."""
        if not kwargs and len(args) == self.arity:
            key = args
        else:
            key = self._normalise(args, kwargs)
        if self.typed:
            return (*key, *_types(key))
        return key

    def _normalise(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
        names = self._names
        if (
            names is not None
            and len(args) <= len(names)
            and not self._positional_only.intersection(kwargs)
        ):
            values = list(args)
            used = 0
            for name, default in zip(names[len(args) :], self._defaults[len(args) :], strict=True):
                if name in kwargs:
                    values.append(kwargs[name])
                    used += 1
                elif default is not inspect.Parameter.empty:
                    values.append(default)
                else:
                    break
            else:
                if used == len(kwargs):
                    return tuple(values)
        # Anything unusual (a missing or unknown argument, a positional-only
        # parameter passed by keyword, *args/**kwargs): let the signature
        # decide, and raise the same TypeError the call itself would.
        bound = self._signature.bind(*args, **kwargs)
        bound.apply_defaults()
        out: list[Any] = []
        for param in self._signature.parameters.values():
            if param.name not in bound.arguments:
                # CPython 3.13.0-3.13.2 (gh-130164): bind() takes a positional-only
                # parameter passed by keyword into **kwargs instead of refusing it.
                raise TypeError(
                    f"missing a required positional-only argument: {param.name!r}"
                )
            value = bound.arguments[param.name]
            if param.kind is inspect.Parameter.VAR_KEYWORD:
                value = _VarKeyword(sorted(value.items()))
            elif param.kind is inspect.Parameter.VAR_POSITIONAL:
                value = _VarPositional(value)
            out.append(value)
        return tuple(out)

    def unhashable(self, key: tuple[Any, ...]) -> TypeError | None:
        """A ``TypeError`` naming the first argument of ``key`` that cannot be hashed."""
        names = list(self._signature.parameters)
        for i, value in enumerate(key):
            try:
                hash(value)
            except TypeError:
                name = names[i] if i < len(names) else f"#{i}"
                return TypeError(
                    f"argument {name!r} of {self.fn_name}() is a {type(value).__name__}, which "
                    f"cannot be part of a cache key (it is unhashable); pass key= to "
                    f"@cached to build keys yourself"
                )
        return None


class _VarPositional(tuple):  # type: ignore[type-arg]
    """The ``*args`` part of a key: a tuple that never equals a plain argument tuple."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        return type(other) is _VarPositional and tuple.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __hash__(self) -> int:
        return hash(("*args", tuple(self)))


class _VarKeyword(tuple):  # type: ignore[type-arg]
    """The ``**kwargs`` part of a key: sorted ``(name, value)`` pairs."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        return type(other) is _VarKeyword and tuple.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __hash__(self) -> int:
        return hash(("**kwargs", tuple(self)))


def _types(values: tuple[Any, ...]) -> tuple[Any, ...]:
    out: list[Any] = []
    for v in values:
        if type(v) is _VarPositional:
            out.append(_types(tuple(v)))
        elif type(v) is _VarKeyword:
            out.append(tuple((name, type(item)) for name, item in v))
        else:
            out.append(type(v))
    return tuple(out)


# -- text keys for shared stores ---------------------------------------------------


def encode_key(namespace: str, key: Hashable) -> str:
    """The text key of ``key`` in ``namespace`` for a byte-oriented store.

    Raises ``TypeError`` for a value it cannot encode faithfully.
    """
    return _text_key(namespace_prefix(namespace), _encode(key))


class FunctionKeys:
    """``encode_key(namespace, (FN_MARK, fn_id, k))`` as a function of ``k``, its
    constant part made once (a decorated function's every call builds one).

    The texts of calls with one or two str or int arguments are kept in ``made``
    (a hot key is asked for again and again). Only of those: equal keys of other
    types may encode apart (1, 1.0, True), and a lookup with one would find the
    other; whoever looks in ``made`` checks the types first.
    """

    __slots__ = ("_head", "_prefix", "kept", "made")

    def __init__(self, namespace: str, fn_id: str, kept: int = 256) -> None:
        self._prefix = namespace_prefix(namespace)
        self._head = f"@{_fn_digest(fn_id)}{_encode(fn_id)}"
        self.made: dict[Hashable, str] = {}
        self.kept = kept  # texts kept at most (a batch function asks for more keys at once)

    def __call__(self, k: Hashable) -> str:
        if type(k) is tuple and (
            (len(k) == 1 and type(k[0]) in PLAIN)
            or (len(k) == 2 and type(k[0]) in PLAIN and type(k[1]) in PLAIN)
        ):
            made = self.made
            text = made.get(k)
            if text is None:
                if len(made) >= self.kept:
                    made.clear()
                text = made[k] = _text_key(self._prefix, self._head + _encode(k))
            return text
        return _text_key(self._prefix, self._head + _encode(k))


PLAIN = frozenset((str, int))  # exactly these types (not bool, not subclasses)


def _text_key(prefix: str, body: str) -> str:
    if len(body) > MAX_KEY_LENGTH:
        # Keep the head readable (and a function's keys sharing their prefix, so
        # they can be found by it); the digest of the whole keeps keys distinct.
        digest = hashlib.sha256(body.encode("utf-8", "surrogatepass")).hexdigest()
        body = f"{body[:_KEPT_HEAD]}#{digest}"
    rest = prefix + body
    tag = hashlib.blake2b(rest.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()
    return f"stampede:{{{tag}}}:{rest}"


_TAGGED = len("stampede:{0123456789abcdef}:")


def key_rest(text_key: str) -> str:
    """A text key without its hash tag: what namespace and function prefixes match."""
    return text_key[_TAGGED:] if text_key.startswith("stampede:{") else ""


def key_namespace(text_key: str) -> str | None:
    """The namespace of a text key (``encode_key``), None for a key not laid out so.

    Read back from the length-prefixed namespace at the start of the rest, so
    any namespace text (colons, braces, unicode) comes back whole; a hashed
    key keeps it too (only the encoded call is hashed).
    """
    rest = key_rest(text_key)
    length, colon, after = rest.partition(":")
    if not colon or not (length.isascii() and length.isdigit()):
        return None
    namespace = after[: int(length)]
    return namespace if rest.startswith(namespace_prefix(namespace)) else None


def namespace_prefix(namespace: str) -> str:
    """What the rest (``key_rest``) of every text key of ``namespace`` starts with."""
    return f"{len(namespace)}:{namespace}:v{KEY_VERSION}:"


def function_prefix(namespace: str, fn_id: str) -> str:
    """What the rest of every text key of the function ``fn_id`` starts with.

    Short whatever ``fn_id``'s length, so hashed keys keep it in their head.
    """
    return f"{namespace_prefix(namespace)}@{_fn_digest(fn_id)}"


@functools.lru_cache(maxsize=1024)  # one per decorated function; every call asks again
def _fn_digest(fn_id: str) -> str:
    data = fn_id.encode("utf-8", "surrogatepass")
    return hashlib.blake2b(data, digest_size=_FN_DIGEST_LENGTH // 2).hexdigest()


def _encode(value: Any) -> str:
    t = type(value)
    if value is None:
        return "N"
    if t is bool:
        return "T" if value else "F"
    if t is int:
        return f"i{value};"
    if t is float:
        return f"f{value.hex()};"
    if t is str:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: no store takes them as they are
            escaped = value.replace("\\", "\\\\").encode("utf-8", "backslashreplace")
            return f"S{len(value)}:{escaped.decode('utf-8')}"  # S: escaped (injective)
        return f"s{len(value)}:{value}"
    if t is bytes:
        return f"b{len(value)}:{value.hex()}"
    if t is tuple and len(value) == 3 and value[0] is FN_MARK and type(value[1]) is str:
        # A function's key: its digest first, so its prefix is short (module docstring).
        return f"@{_fn_digest(value[1])}{_encode(value[1])}{_encode(value[2])}"
    if t is tuple or t is _VarPositional or t is _VarKeyword:
        tag = {tuple: "t", _VarPositional: "a", _VarKeyword: "k"}[t]
        return f"{tag}{len(value)}(" + "".join(_encode(v) for v in value) + ")"
    if t is frozenset:
        items = sorted(_encode(v) for v in value)
        return f"z{len(items)}(" + "".join(items) + ")"
    if t is type:
        return _text("c", f"{value.__module__}.{value.__qualname__}")
    if isinstance(value, enum.Enum):
        cls = type(value)
        return _text("e", f"{cls.__module__}.{cls.__qualname__}") + _encode(value.value)
    if t is datetime.datetime:
        return _text("d", value.isoformat())
    if t is datetime.date:
        return _text("D", value.isoformat())
    if t is datetime.time:
        return _text("h", value.isoformat())
    if t is datetime.timedelta:
        return f"l{value.days},{value.seconds},{value.microseconds};"
    if t is decimal.Decimal:
        return _text("m", str(value))
    if t is uuid.UUID:
        return f"u{value.hex};"
    raise TypeError(
        f"cannot build a shared-store key from a {t.__name__}: supported are None, bool, "
        f"int, float, str, bytes, tuple, frozenset, enums, dates, Decimal and UUID; pass "
        f"key= to build keys yourself"
    )


def _text(tag: str, text: str) -> str:
    return f"{tag}{len(text)}:{text}"

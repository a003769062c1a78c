"""Properties of the pure policy: XFetch, read decisions, load-error outcomes, error data.

Everything here calls ``stampede._policy`` and ``stampede._entry`` directly:
no cache, no clock, no threads. The expected answers are written from the
contract (DESIGN.md section 3, items 8-14), not copied from the code.
"""

from __future__ import annotations

import asyncio
import math
import random

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

import stampede
from stampede._entry import (
    MIN_FRESH_SHARE,
    MISSING,
    XFETCH_CAP,
    Entry,
    ErrorData,
    error_entry,
    refresh_point,
    value_entry,
)
from stampede._policy import Decision, Outcome, decide, error_filter, on_load_error, usable

MIN_U = math.exp(-XFETCH_CAP)  # the smallest draw that still counts (-ln u is capped)

# -- strategies ------------------------------------------------------------------

# Instants of a monotonic clock: any sign, with room for boundaries and rounding.
instants = st.floats(min_value=-1e9, max_value=1e9, allow_nan=False, allow_infinity=False)
durations = st.floats(min_value=0.0, max_value=1e6, allow_nan=False, allow_infinity=False)
ttls = st.floats(min_value=1e-6, max_value=1e6, allow_nan=False, allow_infinity=False)
betas = st.one_of(
    st.sampled_from([0.0, 0.5, 1.0, 2.0]),
    st.floats(min_value=0.0, max_value=100.0, allow_nan=False, allow_infinity=False),
)
# A draw the caller may pass: in (0, 1] normally, but anything must be clamped.
draws = st.one_of(
    st.sampled_from([0.0, 1.0, -0.0, 5e-324, 2.2250738585072014e-308, MIN_U, 1.0 - 2**-53]),
    st.floats(min_value=0.0, max_value=1.0),
    st.floats(allow_nan=False),  # negatives, > 1, infinities, subnormals
)
unit_draws = st.floats(min_value=0.0, max_value=1.0, exclude_min=True)


@st.composite
def value_entries(draw: st.DrawFn) -> Entry[object]:
    """Value entries as the caches build them (``value_entry``), some with a retry backoff."""
    written = draw(instants)
    entry = value_entry(
        "v",
        written,
        draw(ttls),
        draw(st.sampled_from([0.0, 1.5]) | durations),
        draw(st.sampled_from([0.0, 0.25]) | durations),
        draw(betas),
        draw(draws),
    )
    if draw(st.booleans()):
        entry = entry.with_retry_at(draw(instants | st.just(entry.fresh_until)))
    return entry


@st.composite
def raw_value_entries(draw: st.DrawFn) -> Entry[object]:
    """Any well-ordered value entry: check_at <= fresh_until <= stale_until."""
    fresh_until = draw(instants)
    stale_until = fresh_until + draw(durations)
    check_at = fresh_until - draw(durations | st.just(math.inf))
    return Entry(
        "v",
        None,
        fresh_until,
        stale_until,
        draw(durations),
        check_at,
        draw(instants | st.just(-math.inf)),
    )


def reads_of(entry: Entry[object]) -> st.SearchStrategy[float]:
    """Read instants, biased to the entry's boundaries and their float neighbours."""
    marks = [
        t
        for t in (entry.check_at, entry.fresh_until, entry.stale_until, entry.retry_at)
        if math.isfinite(t)
    ]
    near = [
        m for t in marks for m in (math.nextafter(t, -math.inf), t, math.nextafter(t, math.inf))
    ]
    return st.sampled_from(near) | instants if near else instants


# -- refresh_point (XFetch, one draw per stored value) ---------------------------------


@given(
    now=instants,
    ttl=ttls,
    delta=st.floats(min_value=0.0, allow_nan=False, allow_infinity=False),
    beta=st.floats(min_value=-1.0, allow_nan=False, allow_infinity=False),
    u=draws | st.just(math.nan),
)
@example(now=0.0, ttl=1.0, delta=1e308, beta=1e308, u=1.0)
@example(now=0.0, ttl=1.0, delta=1e308, beta=1e308, u=0.0)
@example(now=0.0, ttl=1.0, delta=0.0, beta=8.98846567431158e306, u=math.nan)  # 0 * inf
def test_refresh_point_is_always_within_the_fresh_window(
    now: float, ttl: float, delta: float, beta: float, u: float
) -> None:
    """Whatever the draw: never before MIN_FRESH_SHARE of the ttl, never after expiry."""
    point = refresh_point(now, ttl, delta, beta, u)
    assert now + ttl * MIN_FRESH_SHARE <= point <= now + ttl


@given(instants, ttls, durations, st.floats(max_value=0.0, allow_nan=False), draws)
def test_beta_zero_or_less_means_no_early_refresh(
    now: float, ttl: float, delta: float, beta: float, u: float
) -> None:
    assert refresh_point(now, ttl, delta, beta, u) == now + ttl


@given(instants, ttls, durations, betas, unit_draws, unit_draws)
def test_smaller_draws_refresh_earlier(
    now: float, ttl: float, delta: float, beta: float, u1: float, u2: float
) -> None:
    lo, hi = min(u1, u2), max(u1, u2)
    assert refresh_point(now, ttl, delta, beta, lo) <= refresh_point(now, ttl, delta, beta, hi)


@given(instants, ttls, durations, st.floats(min_value=1e-3, max_value=100), draws)
def test_head_start_is_delta_plus_the_xfetch_lead(
    now: float, ttl: float, delta: float, beta: float, u: float
) -> None:
    """lead = delta * (1 + beta * -ln u), -ln u in [0, XFETCH_CAP], unless the ttl caps it."""
    point = refresh_point(now, ttl, delta, beta, u)
    expiry = now + ttl
    floor = now + ttl * MIN_FRESH_SHARE
    slack = 4 * math.ulp(max(abs(expiry), 1.0)) * (1 + beta)
    if point > floor:
        lead = expiry - point
        assert delta - slack <= lead <= delta * (1 + beta * XFETCH_CAP) + slack
    # u = 1: the head start is delta alone; u <= e**-cap: the largest there is.
    exact_one = refresh_point(now, ttl, delta, beta, 1.0)
    assert exact_one == max(expiry - delta, floor)
    assert refresh_point(now, ttl, delta, beta, 0.0) == refresh_point(
        now, ttl, delta, beta, math.exp(-XFETCH_CAP)
    )


@given(instants, ttls, durations, betas, unit_draws)
def test_refresh_point_follows_the_xfetch_rule(
    now: float, ttl: float, delta: float, beta: float, u: float
) -> None:
    """At the point, XFetch with the head start says yes: t - delta*beta*ln(u) >= expiry - delta."""
    assume(u >= math.exp(-XFETCH_CAP))
    point = refresh_point(now, ttl, delta, beta, u)
    expiry = now + ttl
    slack = 8 * math.ulp(max(abs(expiry), abs(point), 1.0)) * (1 + beta)
    assert point - delta * beta * math.log(u) >= expiry - delta - slack


# -- decide ------------------------------------------------------------------------


@given(instants)
def test_nothing_is_a_miss(now: float) -> None:
    assert decide(None, now) is Decision.MISS


@given(st.data(), value_entries())
def test_read_before_check_at_is_a_hit(data: st.DataObject, entry: Entry[object]) -> None:
    assume(entry.check_at > -math.inf)
    below = math.nextafter(entry.check_at, -math.inf)
    now = data.draw(st.just(below) | st.floats(min_value=below - 1e9, max_value=below))
    assert decide(entry, now) is Decision.HIT


@given(st.data(), value_entries() | raw_value_entries())
def test_value_entry_zones(data: st.DataObject, entry: Entry[object]) -> None:
    now = data.draw(reads_of(entry))
    decision = decide(entry, now)
    if now < entry.fresh_until:
        assert decision in (Decision.HIT, Decision.REFRESH)
    elif now < entry.stale_until:
        assert decision in (Decision.STALE, Decision.STALE_QUIET)
    else:
        assert decision is Decision.MISS
    # An early refresh is exactly: past the refresh point, still fresh, not backing off.
    refresh = entry.check_at <= now < entry.fresh_until and now >= entry.retry_at
    assert (decision is Decision.REFRESH) == refresh
    if decision is Decision.STALE_QUIET:
        assert now < entry.retry_at


@given(st.data(), instants, ttls, durations, durations, draws)
def test_beta_zero_entries_never_refresh_early(
    data: st.DataObject, written: float, ttl: float, stale: float, delta: float, u: float
) -> None:
    entry = value_entry("v", written, ttl, stale, delta, 0.0, u)
    now = data.draw(reads_of(entry))
    assert decide(entry, now) is not Decision.REFRESH


@given(st.data(), value_entries() | raw_value_entries())
def test_retry_at_suppresses_refresh(data: st.DataObject, entry: Entry[object]) -> None:
    eager = entry.with_retry_at(-math.inf)
    backing_off = entry.with_retry_at(data.draw(instants | st.just(math.inf)))
    now = data.draw(reads_of(backing_off))
    before, after = decide(eager, now), decide(backing_off, now)
    if now < backing_off.retry_at:
        assert after is {
            Decision.REFRESH: Decision.HIT,
            Decision.STALE: Decision.STALE_QUIET,
        }.get(before, before)
    else:
        assert after is before


@given(st.data(), instants, st.floats(min_value=0.0, max_value=1e6))
def test_negative_entries_raise_until_error_ttl_then_miss(
    data: st.DataObject, written: float, error_ttl: float
) -> None:
    entry = error_entry(LookupError("gone"), written, error_ttl)
    now = data.draw(reads_of(entry))
    expected = Decision.NEGATIVE if now < written + error_ttl else Decision.MISS
    assert decide(entry, now) is expected
    assert not usable(entry, now)


# -- on_load_error / error_filter --------------------------------------------------


class NotFound(LookupError):
    pass


class Throttled(Exception):
    pass


class Fatal(BaseException):
    pass


EXCEPTIONS: list[BaseException] = [
    ValueError("bad"),
    NotFound("k"),
    Throttled(),
    KeyError("k"),
    RuntimeError("boom"),
    TimeoutError("slow"),
    asyncio.TimeoutError("slow"),
    OSError(2, "missing"),
    stampede.StampedeError("internal"),
    stampede.LoadTimeout("waited"),
    stampede.BackendUnavailable("down"),
    stampede.RecursiveLoad("loop"),
    stampede.LoadAbandoned("gone"),
    stampede.BlockingWaitInLoop("frozen"),
    KeyboardInterrupt(),
    SystemExit(1),
    GeneratorExit(),
    asyncio.CancelledError(),
    Fatal(),
]
LISTABLE: list[type[BaseException]] = sorted(
    {type(e) for e in EXCEPTIONS} | {Exception, BaseException, LookupError, OSError},
    key=lambda t: t.__qualname__,
)


@st.composite
def previous_entries(draw: st.DrawFn) -> Entry[object] | None:
    return draw(
        st.none()
        | value_entries()
        | st.builds(error_entry, st.just(NotFound("old")), instants, durations)
    )


def _never_negative(exc: BaseException) -> bool:
    return not isinstance(exc, Exception) or isinstance(exc, (TimeoutError, stampede.StampedeError))


@given(
    exc=st.sampled_from(EXCEPTIONS),
    listed=st.lists(st.sampled_from(LISTABLE), max_size=4).map(tuple),
    previous=previous_entries(),
    data=st.data(),
)
def test_on_load_error(
    exc: BaseException,
    listed: tuple[type[BaseException], ...],
    previous: Entry[object] | None,
    data: st.DataObject,
) -> None:
    now = data.draw(reads_of(previous) if previous is not None else instants)
    outcome = on_load_error(exc, previous, now, error_filter(listed))
    if not isinstance(exc, Exception):
        assert outcome is Outcome.RAISE
    elif previous is not None and previous.error is None and now < previous.stale_until:
        assert outcome is Outcome.SERVE_STALE  # a usable old value beats any error
    elif isinstance(exc, listed) and not _never_negative(exc):
        assert outcome is Outcome.NEGATIVE
    else:
        assert outcome is Outcome.RAISE
    if _never_negative(exc):
        assert outcome is not Outcome.NEGATIVE


@pytest.mark.parametrize("exc", [e for e in EXCEPTIONS if _never_negative(e)], ids=repr)
def test_never_negative_even_when_listed_or_matched(exc: BaseException) -> None:
    for cacheable in (
        error_filter((type(exc), Exception, BaseException)),
        error_filter(lambda _exc: True),
    ):
        assert not cacheable(exc)
        assert on_load_error(exc, None, 0.0, cacheable) is not Outcome.NEGATIVE


def test_predicate_form_of_cache_errors() -> None:
    seen: list[BaseException] = []

    def only_404(exc: BaseException) -> bool:
        seen.append(exc)
        return getattr(exc, "status", None) == 404

    class HTTPError(Exception):
        def __init__(self, status: int) -> None:
            super().__init__(status)
            self.status = status

    cacheable = error_filter(only_404)
    assert on_load_error(HTTPError(404), None, 0.0, cacheable) is Outcome.NEGATIVE
    assert on_load_error(HTTPError(503), None, 0.0, cacheable) is Outcome.RAISE
    # A truthy non-bool answer counts; a usable old value still wins over the predicate.
    assert error_filter(lambda _exc: "yes")(ValueError())
    fresh = value_entry("v", 0.0, 10.0, 0.0, 0.0, 1.0, 0.5)
    assert on_load_error(HTTPError(404), fresh, 5.0, cacheable) is Outcome.SERVE_STALE
    assert [e.status for e in seen] == [404, 503]  # type: ignore[attr-defined]


def test_cache_errors_must_hold_exception_types() -> None:
    with pytest.raises(TypeError):
        error_filter((ValueError, "KeyError"))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        error_filter((ValueError, ValueError("not a type")))  # type: ignore[arg-type]
    assert error_filter([KeyError])(KeyError("k"))  # type: ignore[arg-type]
    assert not error_filter(())(KeyError("k"))


def test_a_bare_exception_type_is_not_taken_for_a_predicate() -> None:
    try:
        cacheable = error_filter(KeyError)  # type: ignore[arg-type]
    except TypeError:
        return  # rejecting it is fine too
    assert cacheable(KeyError("k"))
    assert not cacheable(ValueError("transient"))


# -- ErrorData ---------------------------------------------------------------------


class KeywordOnly(Exception):
    def __init__(self, *, code: int) -> None:
        super().__init__(f"code {code}")
        self.code = code


class TwoArgs(Exception):
    def __init__(self, resource: str, ident: int) -> None:
        super().__init__(resource, ident)


class KeepsOneArg(Exception):
    def __init__(self, resource: str, ident: int) -> None:
        super().__init__(f"{resource} {ident}")


class NoArgs(Exception):
    def __init__(self) -> None:
        super().__init__("always the same")


class Validating(Exception):
    def __init__(self, code: int) -> None:
        if not isinstance(code, int):
            raise ValueError("code must be an int")
        super().__init__(f"status {code}")


class Reshaping(Exception):
    """Its __init__ accepts its own message, but builds a different one from it."""

    def __init__(self, code: object, reason: str = "not found") -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code


texts = st.text(max_size=20)
raised = st.one_of(
    st.builds(ValueError, texts),
    st.builds(KeyError, texts | st.integers()),
    st.builds(NotFound, texts, st.integers()),
    st.builds(Throttled),
    st.builds(OSError, st.sampled_from([2, 13, 111]), texts),
    st.builds(
        UnicodeDecodeError,
        st.just("utf-8"),
        st.binary(min_size=2, max_size=4),
        st.just(0),
        st.just(1),
        texts,
    ),
    st.builds(lambda code: KeywordOnly(code=code), st.integers()),
    st.builds(TwoArgs, texts, st.integers()),
    st.builds(KeepsOneArg, texts, st.integers()),
    st.builds(NoArgs),
    st.builds(Validating, st.integers()),
)


@given(raised)
def test_error_data_rebuilds_a_new_instance_of_the_same_type_and_args(exc: Exception) -> None:
    data = ErrorData.of(exc)
    first, second = data.rebuild(), data.rebuild()
    for again in (first, second):
        assert type(again) is type(exc)
        assert again.args == exc.args
        assert again is not exc
        assert again.__traceback__ is None and again.__cause__ is None
    assert first is not second
    first.__notes__ = ["only on the first"]  # what add_note() does (3.11+)
    assert getattr(data.rebuild(), "__notes__", []) == []
    with pytest.raises(type(exc)):  # `except ThatType:` keeps working
        raise data.rebuild()


@given(st.builds(Reshaping, st.integers()))
def test_error_data_keeps_args_when_init_reshapes_them(exc: Exception) -> None:
    assert ErrorData.of(exc).rebuild().args == exc.args


def test_error_entry_stores_data_not_the_exception() -> None:
    exc = NotFound("user", 7)
    entry = error_entry(exc, 10.0, 5.0)
    assert entry.value is MISSING and entry.error is not None
    assert entry.error.type is NotFound and entry.error.args == ("user", 7)
    assert all(getattr(entry.error, name) is not exc for name in ErrorData.__slots__)
    assert entry.check_at == -math.inf  # every read takes the slow path and raises


# -- XFetch statistics --------------------------------------------------------------


def test_refresh_lead_is_exponential_with_mean_delta_beta() -> None:
    """Seeded: lead - delta over many stored values is delta * beta * Exp(1)."""
    rng = random.Random(20150831)  # the XFetch paper's conference date
    delta, beta, n = 0.1, 2.0, 20000
    extra = []
    for _ in range(n):
        point = refresh_point(0.0, 60.0, delta, beta, 1.0 - rng.random())
        extra.append((60.0 - point - delta) / (delta * beta))
    assert sum(extra) / n == pytest.approx(1.0, rel=0.03)  # E[Exp(1)] = 1, sd/sqrt(n) ~ 0.007
    assert sum(x > 1.0 for x in extra) / n == pytest.approx(math.exp(-1), abs=0.015)
    assert min(extra) >= 0.0 and max(extra) <= XFETCH_CAP


@pytest.mark.parametrize("step", [0.0001, 0.01, 0.1])
def test_refresh_moment_does_not_depend_on_the_read_rate(step: float) -> None:
    """The first read at or after check_at refreshes, however often reads come."""
    entry = value_entry("v", 0.0, 10.0, 0.0, 0.5, 1.0, 0.3)
    n = int(10.0 / step)
    first = next(i * step for i in range(n) if decide(entry, i * step) is Decision.REFRESH)
    assert entry.check_at <= first < entry.check_at + step + 1e-9
    assert first == pytest.approx(10.0 - 0.5 * (1 - math.log(0.3)), abs=step + 1e-9)

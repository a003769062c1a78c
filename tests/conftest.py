from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest
from hypothesis import settings


@pytest.fixture
def fast_switching() -> Iterator[None]:
    """Make the interpreter switch threads very often, to shake out races."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


# CI replays the same examples every run (a red CI must mean a change broke
# something, not that the search got lucky); local runs keep exploring.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

pytest_plugins = ["tests.redis_fixtures", "tests.pg_fixtures"]


@pytest.fixture(autouse=True)
def _serialization_warnings_anew() -> None:
    """Each test sees a serialization failure's first (and only) warning afresh."""
    from stampede import _failures

    _failures._warned.clear()

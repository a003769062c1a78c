"""The exceptions stampede raises.

    StampedeError
     ├── LoadTimeout            (also TimeoutError)  a wait for someone else's load ran out
     ├── RecursiveLoad          (also RuntimeError)  a loader asked for its own key
     ├── LoadAbandoned                              the leader died (BaseException, cancellation)
     ├── BlockingWaitInLoop     (also RuntimeError)  a sync wait would freeze a running event loop
     ├── BackendUnavailable                         the backend failed (its error is __cause__)
     ├── SerializationError     (also ValueError)    a value that cannot be stored, or bytes
     │                                              that cannot be trusted or decoded
     └── IdempotencyError                           an idempotent call that cannot run or replay
          ├── KeyReused                             the key came with another fingerprint
          ├── InFlight                              its first execution is still running
          └── ReplayUnavailable                     it ran, its outcome could not be recorded

Errors raised by a loader are never wrapped: callers see the loader's own
exception (or, for negative-cached errors, a new instance of the same type).
"""

from __future__ import annotations


class StampedeError(Exception):
    """Base class of every error stampede itself raises."""


class LoadTimeout(StampedeError, TimeoutError):
    """A caller waited longer than ``wait_timeout`` for another caller's load."""


class RecursiveLoad(StampedeError, RuntimeError):
    """A loader (or a task it started) asked for the key it is loading."""


class LoadAbandoned(StampedeError):
    """The load this caller waited for ended without a result.

    Raised to waiters when the leader was stopped by a ``BaseException``
    that is not an ``Exception`` (``KeyboardInterrupt``, ``SystemExit``,
    cancellation of the load task). The leader's exception is ``__cause__``.
    """


class BlockingWaitInLoop(StampedeError, RuntimeError):
    """The sync API would block a running event loop while waiting for a load.

    Use ``AsyncCoalescingCache`` from coroutines.
    """


class BackendUnavailable(StampedeError):
    """The backend failed and the cache is configured to raise; see ``__cause__``."""


class SerializationError(StampedeError, ValueError):
    """A value that cannot be serialized, or bytes that cannot be trusted or decoded."""


class IdempotencyError(StampedeError):
    """An idempotent call (``Idempotency.do``) that can neither run nor replay."""


class KeyReused(IdempotencyError):
    """The key was used before (running or finished) with a different fingerprint."""


class InFlight(IdempotencyError):
    """The key's first execution is still running: past ``wait_timeout``, or at once
    with ``on_conflict="reject"``. ``retry_after``: seconds its lease still holds."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after: float = retry_after


class ReplayUnavailable(IdempotencyError):
    """The key's work ran, but its outcome could not be recorded (too large, not
    serializable, streamed): it is never run again for this key."""

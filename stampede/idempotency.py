"""Inside idempotent work: the claim it runs under.

    import stampede.idempotency

    @idem.idempotent(key=lambda order: order.id)
    def charge(order):
        claim = stampede.idempotency.current()
        provider.charge(order, idempotency_key=claim.derive_key("provider"))
        claim.effect_started()   # from here an exception is recorded, not retried
        ...

``current()`` is None outside idempotent work. ``Claim.fence`` grows by one on
every claim of the key (a takeover after a crash included): pass it to
downstream writes that must refuse an older execution (``WHERE fence < :f``).
"""

from __future__ import annotations

from ._idem import Claim, IdemStats, current

__all__ = ["Claim", "IdemStats", "current"]

"""Draw docs/img/xfetch.svg: when does the early refresh of a hot key start?

For a value stored with load time ``delta``, stampede draws ``u`` once and
sets the refresh point ``check_at = expiry - delta * (1 + beta * -ln u)``,
never earlier than half the ttl (``stampede._entry.refresh_point``). The
first read after ``check_at`` starts the refresh. For a key read often, the
probability that the refresh has started when ``t`` seconds are left before
expiry is the share of draws whose lead is at least ``t``:

    P(t) = 1                                 for t <= delta
         = exp(-(t / delta - 1) / beta)      for delta < t <= ttl / 2
         = 0                                 for t > ttl / 2

This script measures that share through ``refresh_point`` itself, on a fine
grid of ``u``, and checks it against the closed form.

Classic XFetch draws at every read instead: a read ``s`` seconds before
expiry refreshes with probability ``exp(-s / (delta * beta))``. With reads
arriving at random at ``r`` per second (a Poisson process) and a ttl much
longer than ``delta * beta``, the refresh has started ``t`` seconds before
expiry with probability

    1 - exp(-r * delta * beta * exp(-t / (delta * beta)))

which depends on the read rate: the hotter the key, the earlier.

Run from the repository root (needs matplotlib):

    python docs/scripts/plot_xfetch.py
"""

from __future__ import annotations

import bisect
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from stampede._entry import refresh_point  # noqa: E402

OUT = ROOT / "docs" / "img" / "xfetch.svg"

DELTA = 1.0  # the load time: the x axis is in units of it
TTL = 100.0  # long next to delta: the half-ttl floor (50) is off the chart
T_MAX = 9.0
STEPS = 181
GRID = 20_000  # draws of u, evenly spread over (0, 1]


def stampede_share(t: float, leads: list[float]) -> float:
    """Share of draws whose refresh point is at least ``t`` before expiry (``leads`` sorted)."""
    return (len(leads) - bisect.bisect_left(leads, t)) / len(leads)


def stampede_closed_form(t: float, beta: float) -> float:
    if t > TTL / 2:
        return 0.0
    if t <= DELTA:
        return 1.0
    return math.exp(-(t / DELTA - 1.0) / beta)


def classic(t: float, beta: float, rate: float) -> float:
    scale = DELTA * beta
    return 1.0 - math.exp(-rate * scale * math.exp(-t / scale))


def main() -> None:
    plt.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "stampede", "font.size": 10})
    ts = [T_MAX * i / (STEPS - 1) for i in range(STEPS)]
    fig, ax = plt.subplots(figsize=(7.0, 4.6))
    for beta, color in ((0.5, "#1b9e77"), (1.0, "#d95f02"), (2.0, "#7570b3")):
        us = [(i + 0.5) / GRID for i in range(GRID)]
        written = 0.0
        leads = sorted(written + TTL - refresh_point(written, TTL, DELTA, beta, u) for u in us)
        ys = [stampede_share(t, leads) for t in ts]
        worst = max(abs(y - stampede_closed_form(t, beta)) for t, y in zip(ts, ys, strict=True))
        assert worst < 2e-3, f"refresh_point no longer matches the closed form ({worst})"
        ax.plot(ts, ys, color=color, lw=2, label=f"stampede, β = {beta:g}")
    for rate, style in ((10.0, (0, (4, 2))), (1000.0, (0, (1, 1.5)))):
        ys = [classic(t, 1.0, rate) for t in ts]
        label = f"classic XFetch, β = 1, {rate:g} reads per δ"
        ax.plot(ts, ys, color="#444444", lw=1.3, linestyle=style, label=label)
    ax.set_xlim(T_MAX, 0)  # time runs left to right, towards expiry
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("time left before expiry, in load times δ")
    ax.set_ylabel("P(refresh started)")
    ax.set_title("Early refresh of a hot key: when has it started?")
    ax.grid(True, color="#dddddd", lw=0.6)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=8.5, frameon=False)
    fig.tight_layout()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT, format="svg", metadata={"Date": None})
    print(f"wrote {OUT.relative_to(ROOT)} ({OUT.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()

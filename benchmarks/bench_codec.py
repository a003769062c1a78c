"""The codec table: DataSerializer against pickle (and plain msgpack, cbor2) in one run.

    python benchmarks/bench_codec.py [--quick]

Payloads: a ten-field dict; 100 rows (dicts with str, int, float, an aware
datetime, a Decimal and a UUID: the DESIGN target); 100 plain rows (str, int,
float, a list of two str); 100 tuples of (int, str, float). Each cell is the
best of 5 rounds, in microseconds per call; the ratio is to pickle (protocol 5)
of the same payload. Plain msgpack and cbor2 are lossy here (tuples come back
as lists, and msgpack cannot store datetime, Decimal or UUID at all): they are
the floor of a C codec, not alternatives.
"""

from __future__ import annotations

import argparse
import datetime
import decimal
import pickle
import sys
import timeit
import uuid
from collections.abc import Callable
from typing import Any

import msgpack

from stampede.serializers import DataSerializer

UTC = datetime.timezone.utc


def payloads() -> dict[str, Any]:
    ten = dict(
        zip(
            (f"field{i}" for i in range(10)),
            ["alice", 42, 3.14, True, None, "x" * 20, 10**6, -7, "long text " * 3, 2.5],
            strict=True,
        )
    )
    rows = [
        {
            "name": f"user{i}",
            "n": i,
            "score": i / 3,
            "at": datetime.datetime(2026, 1, 1, 12, i % 60, tzinfo=UTC),
            "price": decimal.Decimal(f"{i}.99"),
            "id": uuid.UUID(int=i),
        }
        for i in range(100)
    ]
    plain = [{"name": f"user{i}", "n": i, "score": i / 3, "tags": ["a", "b"]} for i in range(100)]
    tuples = [(i, f"name{i}", i * 1.5) for i in range(100)]
    return {
        "ten-field dict": ten,
        "100 rows (datetime, Decimal, UUID)": rows,
        "100 plain rows": plain,
        "100 tuples": tuples,
    }


def per_call(fn: Callable[[], object], number: int, rounds: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=rounds)) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls, 3 rounds")
    args = parser.parse_args()
    rounds = 3 if args.quick else 5
    data = DataSerializer()
    codecs: list[tuple[str, Callable[[Any], bytes], Callable[[bytes], Any]]] = [
        ("pickle", pickle.dumps, pickle.loads),
        ("DataSerializer", data.dumps, data.loads),
        ("msgpack (plain)", msgpack.packb, msgpack.unpackb),
    ]
    try:
        import cbor2

        codecs.append(("cbor2", cbor2.dumps, cbor2.loads))
    except ImportError:
        pass
    print(
        f"Python {sys.version.split()[0]}, msgpack {msgpack.version}; us per call, best of {rounds}"
    )
    print()
    header = "| payload | " + " | ".join(f"{name} dumps / loads" for name, _, _ in codecs)
    print(header + " | DataSerializer / pickle |")
    print("|---" * (len(codecs) + 2) + "|")
    for label, value in payloads().items():
        number = (2000 if label.startswith("ten") else 100) // (10 if args.quick else 1)
        cells: list[str] = []
        times: dict[str, tuple[float, float]] = {}
        for name, dumps, loads in codecs:
            try:
                blob = dumps(value)
                loads(blob)
            except Exception:
                cells.append("cannot")
                continue
            d = per_call(lambda: dumps(value), number, rounds)  # noqa: B023
            l_ = per_call(lambda: loads(blob), number, rounds)  # noqa: B023
            times[name] = (d, l_)
            cells.append(f"{d:.1f} / {l_:.1f}")
        (pd, pl), (dd, dl) = times["pickle"], times["DataSerializer"]
        print(f"| {label} | " + " | ".join(cells) + f" | {dd / pd:.2f}x / {dl / pl:.2f}x |")


if __name__ == "__main__":
    main()

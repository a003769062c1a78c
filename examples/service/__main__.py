"""``python -m examples.service``: the example service under uvicorn, from the repository root.

The same as ``uvicorn examples.service.app:app --workers 4``, with the settings
checked first (they come from environment variables: see app.py).
"""

from __future__ import annotations

import argparse
import sys

import uvicorn

from .app import Settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m examples.service",
        description="Products through a slow origin, cached on Redis by stampede "
        "(REDIS_URL is required; see examples/service/README.md).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port (8000)")
    parser.add_argument("--workers", type=int, default=4, help="worker processes (4)")
    parser.add_argument(
        "--access-log", action="store_true", help="log every request (off: it costs CPU)"
    )
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except RuntimeError as exc:
        print(f"python -m examples.service: {exc}", file=sys.stderr)
        return 2
    print(
        f"origin {settings.origin_url}, TTL {settings.ttl:g} s, stale {settings.stale_ttl:g} s, "
        f"namespace {settings.namespace!r}",
        file=sys.stderr,
    )
    uvicorn.run(
        "examples.service.app:app",
        host=args.host,
        port=args.port,
        workers=args.workers,
        access_log=args.access_log,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

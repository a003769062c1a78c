"""A slow origin for the example service: it sleeps on every request and counts them.

The stand-in for the database or API a cache protects. Every product request
waits ``delay`` seconds, then answers; the origin counts requests per path
when they arrive, so a test can tell how often the service really called it.

    GET    /products/{id}  {"id", "name", "price_cents", "version"}, after the delay;
                           "version" is the request's number for that path, so two
                           loads of one product never answer the same payload.
                           Ids starting with "missing" answer 404, "broken" 503.
    GET    /_counts        {"delay_ms", "total", "counts": {path: requests}} (no delay)
    DELETE /_counts        the same, and the counts start again from zero

Standalone (from the repository root)::

    python -m examples.service.origin --port 8081 --delay-ms 500

In a test: ``with OriginServer(delay=0.5) as origin: ... origin.url ...``
(a free loopback port, served by a thread). ``origin.hold()`` makes product
requests wait (counted, not answered) until ``origin.release()``, so a test
can decide when a load ends instead of racing a timer.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading
import time
import zlib
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

PRODUCTS = "/products/"
COUNTS = "/_counts"


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a keep-alive connection left open never holds up close()
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], delay: float, quiet: bool) -> None:
        super().__init__(address, _Handler)
        self.delay = delay
        self.quiet = quiet
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.gate = threading.Event()  # cleared by hold(): product requests wait for it
        self.gate.set()
        self.hold_limit = 30.0  # a held request gives up (503) after this many seconds

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hung up (a service timing out on a held request) is not news.
        if self.quiet and isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)

    def count(self, path: str) -> int:
        with self.lock:
            self.counts[path] += 1
            return self.counts[path]

    def snapshot(self, reset: bool = False) -> dict[str, Any]:
        with self.lock:
            counts = dict(self.counts)
            if reset:
                self.counts.clear()
        return {
            "delay_ms": self.delay * 1000,
            "total": sum(counts.values()),
            "counts": counts,
        }


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the service's client reuses connections
    timeout = 30  # an idle keep-alive connection gives its thread back after this

    @property
    def origin(self) -> _Server:
        assert isinstance(self.server, _Server)
        return self.server

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == COUNTS:
            self._reply(200, self.origin.snapshot())
        elif path.startswith(PRODUCTS) and len(path) > len(PRODUCTS):
            self._product(path, path[len(PRODUCTS) :])
        else:
            self._reply(404, {"error": f"no route {path}"})

    def do_DELETE(self) -> None:
        if self.path.split("?", 1)[0] == COUNTS:
            self._reply(200, self.origin.snapshot(reset=True))
        else:
            self._reply(404, {"error": f"no route {self.path}"})

    def _product(self, path: str, product_id: str) -> None:
        origin = self.origin
        version = origin.count(path)  # counted on arrival: a request cut short counts too
        if not origin.gate.wait(origin.hold_limit):
            self._reply(503, {"error": "held too long"})
            return
        time.sleep(origin.delay)
        if product_id.startswith("missing"):
            self._reply(404, {"error": f"no product {product_id}"})
        elif product_id.startswith("broken"):
            self._reply(503, {"error": "origin overloaded"})
        else:
            price = zlib.crc32(product_id.encode()) % 100_000  # stable, whatever the process
            body = {
                "id": product_id,
                "name": f"Product {product_id}",
                "price_cents": price,
                "version": version,
            }
            self._reply(200, body)

    def _reply(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        if not self.origin.quiet:
            super().log_message(format, *args)


class OriginServer:
    """The origin on ``host:port`` (0: a free port), served by a background thread."""

    def __init__(
        self, delay: float = 0.5, host: str = "127.0.0.1", port: int = 0, quiet: bool = True
    ) -> None:
        if delay < 0:
            raise ValueError(f"delay must be >= 0 seconds, got {delay}")
        self._server = _Server((host, port), delay, quiet)
        self._thread: threading.Thread | None = None

    @property
    def delay(self) -> float:
        return self._server.delay

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = self._server.server_address[0]
        return f"http://{host!s}:{self.port}"

    def counts(self) -> dict[str, int]:
        """Requests received per path since the start or the last ``reset``."""
        return dict(self._server.snapshot()["counts"])

    def calls(self, path: str) -> int:
        return self.counts().get(path, 0)

    def reset(self) -> None:
        self._server.snapshot(reset=True)

    def hold(self) -> None:
        """Product requests from now on wait (counted) until ``release()`` (30 s at most)."""
        self._server.gate.clear()

    def release(self) -> None:
        """Let held and later product requests go on (after the delay, as always)."""
        self._server.gate.set()

    def start(self) -> OriginServer:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.1},
                name="slow-origin",
                daemon=True,
            )
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving and close the listening socket (bounded: a second or so)."""
        self.release()
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(5)
            self._thread = None
        self._server.server_close()

    def serve_forever(self) -> None:
        """Serve on this thread until interrupted (the standalone mode)."""
        try:
            self._server.serve_forever(poll_interval=0.1)
        finally:
            self._server.server_close()

    def __enter__(self) -> OriginServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m examples.service.origin",
        description="A slow HTTP origin that counts its requests (see the module docstring).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8081, help="port (0: a free one)")
    parser.add_argument(
        "--delay-ms", type=float, default=500.0, help="time each product request takes"
    )
    parser.add_argument("--verbose", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    if args.delay_ms < 0:
        parser.error("--delay-ms must be >= 0")
    origin = OriginServer(args.delay_ms / 1000, args.host, args.port, quiet=not args.verbose)
    print(f"slow origin on {origin.url}, {args.delay_ms:g} ms per product request", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        origin.serve_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

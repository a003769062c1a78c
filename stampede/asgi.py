"""``IdempotencyMiddleware``: the ``Idempotency-Key`` header for ASGI apps (Starlette, FastAPI).

    app.add_middleware(stampede.asgi.IdempotencyMiddleware, idempotency=AsyncIdempotency(redis))

For a request with a method in ``methods`` (POST, PATCH) and an
``Idempotency-Key`` header (an RFC 8941 string, ``"..."``, or a bare token;
1-255 printable ASCII characters):

- the first request runs the app; its response (status, an allow-list of
  headers, the body bytes) is recorded when its status is 2xx, or any status
  after the handler called ``stampede.idempotency.current().effect_started()``;
  otherwise the key is released and a retry runs again;
- a request with the same key while it runs waits for it (``on_conflict``,
  ``wait_timeout`` of the ``AsyncIdempotency``) and gets the same response;
- a retry after it finished gets the recorded response, with
  ``Idempotent-Replayed: true``;
- a different request with the same key (method, path, query, content type,
  body; JSON bodies compared with sorted keys) gets 422.

Errors are ``application/problem+json``: 400 (missing key where required, a
malformed key, two key fields, no caller identity from ``scope``), 413 (a
request body larger than ``max_body_size``), 409 + ``Retry-After`` (still
running past the wait, or at once in reject mode; or ran but not replayable),
422 (key reused), 503 + ``Retry-After`` (the store is down and the
``AsyncIdempotency`` raises). The work runs as its own task: a client that
disconnects does not stop it, and its retry replays.

A response larger than the idempotency's ``max_record_size``, or streamed in
more than one body message, is sent to its client and recorded as not
replayable: a retry gets 409, never a second run. Keys are stored hashed,
with the caller's identity (``scope=``) and the method and path.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from ._errors import BackendUnavailable, InFlight, KeyReused, ReplayUnavailable
from ._idem import Unrecordable, current
from ._idempotency import AsyncIdempotency

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Response headers a replay carries (never Set-Cookie, authorization or hop-by-hop ones).
REPLAYED_HEADERS = frozenset(
    {
        "content-type",
        "content-encoding",
        "content-language",
        "content-disposition",
        "location",
        "etag",
        "last-modified",
        "link",
        "cache-control",
        "retry-after",
        "content-length",  # the body replayed is the same bytes
    }
)
PROBLEM = "https://stampede.readthedocs.io/idempotency#"


class IdempotencyMiddleware:
    """Apply idempotency keys to an ASGI app's mutating requests (see the module)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        idempotency: AsyncIdempotency,
        methods: Iterable[str] = ("POST", "PATCH"),
        require_key: bool = True,
        scope: Callable[[Scope], str | None] | None = None,
        header: str = "Idempotency-Key",
        replayed_header: str = "Idempotent-Replayed",
        max_body_size: int = 1 << 20,
        replayed_headers: Iterable[str] = REPLAYED_HEADERS,
    ) -> None:
        if not isinstance(idempotency, AsyncIdempotency):
            raise TypeError("idempotency must be an AsyncIdempotency (an ASGI app is async)")
        self.app: ASGIApp = app
        self.idempotency: AsyncIdempotency = idempotency
        self.methods: frozenset[str] = frozenset(m.upper() for m in methods)
        self.require_key: bool = require_key
        self.scope: Callable[[Scope], str | None] | None = scope
        self.header: bytes = header.lower().encode("latin-1")
        self.replayed_header: bytes = replayed_header.lower().encode("latin-1")
        self.max_body_size: int = max_body_size
        self.replayed_headers: frozenset[str] = frozenset(h.lower() for h in replayed_headers) - {
            "set-cookie",
            "authorization",
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"].upper() not in self.methods:
            await self.app(scope, receive, send)
            return
        fields = [v for k, v in scope.get("headers", ()) if k.lower() == self.header]
        if not fields:
            if self.require_key:
                await _problem(send, 400, "missing-key", "this request needs an Idempotency-Key")
                return
            await self.app(scope, receive, send)
            return
        if len(fields) > 1:
            await _problem(send, 400, "invalid-key", "one Idempotency-Key field, not several")
            return
        key = parse_key(fields[0])
        if key is None:
            await _problem(
                send, 400, "invalid-key", "an Idempotency-Key is 1-255 printable ASCII characters"
            )
            return
        identity = ""
        if self.scope is not None:
            found = self.scope(scope)
            if not found:
                await _problem(send, 400, "identity-unavailable", "no caller identity for this key")
                return
            identity = found
        try:
            body = await _read_body(receive, self.max_body_size)
        except _Gone:
            return  # the client left before its request was whole: nothing runs
        if body is None:
            await _problem(send, 413, "body-too-large", "the request body is too large")
            return
        effective = (identity, scope["method"].upper(), scope.get("path", ""), key)
        fingerprint = _fingerprint(scope, body)
        ran: list[Response] = []  # the response as the app sent it, when it ran for us
        try:
            recorded, replayed = await self.idempotency.do(
                effective, lambda: self._run(scope, body, ran), fingerprint=fingerprint
            )
        except _NotRecorded as released:
            if ran:  # it ran for this client: its response as sent
                await _send_response(send, ran[0], None)
            else:  # joined the run here: its allow-listed response, marked
                await _send_response(send, released.response, self.replayed_header)
            return
        except KeyReused:
            await _problem(send, 422, "key-reused", "this key was used for another request")
            return
        except InFlight as exc:
            await _problem(
                send,
                409,
                "in-flight",
                "the first request with this key is still being processed",
                retry_after=exc.retry_after,
            )
            return
        except ReplayUnavailable:
            await _problem(
                send,
                409,
                "replay-unavailable",
                "the request with this key was processed; its response cannot be replayed",
            )
            return
        except BackendUnavailable:
            await _problem(
                send, 503, "store-unavailable", "idempotency records are unavailable", 1.0
            )
            return
        if not replayed and ran:
            await _send_response(send, ran[0], None)  # all its headers: it ran for this client
            return
        if isinstance(recorded, Unrecordable):
            recorded = recorded.value  # joined the run here: its allow-listed response
        await _send_response(send, recorded, self.replayed_header)

    async def _run(self, scope: Scope, body: bytes, ran: list[Response]) -> Any:
        """Run the app once on the buffered request. Its response goes to ``ran``; the
        value returned is what is recorded (allow-listed headers), or ``_NotRecorded``
        is raised (the key is released)."""
        messages: list[Message] = []
        request_sent = False
        never = asyncio.Event()

        async def replay_receive() -> Message:
            nonlocal request_sent
            if not request_sent:
                request_sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await never.wait()  # the client's disconnect does not reach the work
            return {"type": "http.disconnect"}

        async def capture(message: Message) -> None:
            messages.append(message)

        # Without the send extensions that hand the server a file to send (pathsend,
        # zerocopysend): the response must come as body messages to be kept.
        extensions = {
            name: value
            for name, value in (scope.get("extensions") or {}).items()
            if name not in ("http.response.pathsend", "http.response.zerocopysend")
        }
        await self.app({**scope, "extensions": extensions}, replay_receive, capture)
        status, headers, chunks = 500, [], []
        for message in messages:
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = [(bytes(k), bytes(v)) for k, v in message.get("headers", ())]
            elif message["type"] == "http.response.body":
                chunks.append(bytes(message.get("body", b"")))
        response = (status, headers, b"".join(chunks))
        ran.append(response)
        kept = [(k, v) for k, v in headers if k.decode("latin-1").lower() in self.replayed_headers]
        recorded = (status, kept, response[2])
        claim = current()
        if not (200 <= status < 300 or (claim is not None and claim.effect)):
            raise _NotRecorded(recorded)  # the key is released: a retry runs again
        if sum(1 for chunk in chunks if chunk) > 1:
            return Unrecordable(recorded)  # streamed: recorded as not replayable
        return recorded


Response = tuple[int, list[tuple[bytes, bytes]], bytes]


class _NotRecorded(Exception):
    """A response not to be recorded (a failure before the effect): the key is
    released, whatever ``record_errors`` lists. ``response``: its allow-listed form."""

    releases_key = True

    def __init__(self, response: Response) -> None:
        super().__init__("not recorded")
        self.response = response


class _Gone(Exception):
    """The client disconnected before its request body was whole."""


def parse_key(raw: bytes) -> str | None:
    """The key of an ``Idempotency-Key`` field (``"..."`` or a bare token); None if invalid."""
    text = raw.decode("latin-1").strip(" \t")
    if text.startswith('"'):
        if len(text) < 2 or not text.endswith('"'):
            return None
        inner, out, escaped = text[1:-1], [], False
        for ch in inner:
            if escaped:
                if ch not in '"\\':
                    return None
                out.append(ch)
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                return None
            else:
                out.append(ch)
        if escaped:
            return None
        text = "".join(out)
        allowed = range(0x20, 0x7F)
    else:
        allowed = range(0x21, 0x7F)
        if any(ch in ',;"\\' for ch in text):
            return None  # a list, parameters or a broken string: not one bare key
    if not 1 <= len(text) <= 255 or any(ord(ch) not in allowed for ch in text):
        return None
    return text


def _fingerprint(scope: Scope, body: bytes) -> bytes:
    content_type = b""
    for k, v in scope.get("headers", ()):
        if k.lower() == b"content-type":
            content_type = bytes(v).split(b";")[0].strip().lower()
    canonical = body
    if content_type.endswith(b"json") and body:
        with contextlib.suppress(ValueError, RecursionError):  # not JSON: the bytes as they are
            canonical = json.dumps(
                json.loads(body), sort_keys=True, separators=(",", ":")
            ).encode()
    digest = hashlib.sha256()
    for part in (
        scope["method"].upper().encode(),
        scope.get("path", "").encode("utf-8", "surrogateescape"),
        bytes(scope.get("query_string", b"")),
        content_type,
        canonical,
    ):
        digest.update(len(part).to_bytes(8, "big") + part)
    return digest.digest()


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Gone
        chunk = bytes(message.get("body", b""))
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def _send_response(send: Send, response: Any, replayed: bytes | None) -> None:
    status, raw_headers, body = response
    headers = [(bytes(k), bytes(v)) for k, v in raw_headers]
    if replayed is not None:
        headers.append((replayed, b"true"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _problem(
    send: Send, status: int, kind: str, detail: str, retry_after: float | None = None
) -> None:
    problem = {"type": PROBLEM + kind, "title": kind.replace("-", " "), "status": status}
    body = json.dumps({**problem, "detail": detail}).encode()
    headers = [
        (b"content-type", b"application/problem+json"),
        (b"content-length", str(len(body)).encode()),
    ]
    if retry_after is not None:
        headers.append((b"retry-after", str(max(1, round(retry_after))).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


__all__ = ["REPLAYED_HEADERS", "IdempotencyMiddleware", "parse_key"]

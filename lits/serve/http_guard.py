"""The HTTP API's door (pure ASGI, no Ray): what every request passes before a route sees it.

`Guard` wraps the FastAPI app of the ingress. For every request, in this order and before one byte
of the body is read:
  1. the token (401), on every path but the open ones (/healthz and the API docs) and the results
     pages (which show their own login); a read (GET, HEAD) may carry the pages' session cookie
     instead (`lits.serve.page_auth`);
  2. a declared Content-Length over the path's limit (413): `--max-body-mb` for uploads, 1 MB for
     the JSON routes;
then it reads the whole body itself, counting it (a chunked body without Content-Length is cut at
the limit: 413) and timing it: the body must keep arriving at `min_rate` bytes/s after a grace of
`grace_s` (408). The route gets the body replayed from memory, so a route never waits on a slow
client: /v1/segment takes an upload slot only once its body is here, and a stalled client holds
no slot, only its connection, and that for `grace_s` at most. Upload bodies are received at most
`receiving` at a time (a request waits up to 2 x `grace_s` for its turn, else 503 with Retry-After),
so the memory of bodies being received is bounded by `receiving` x the upload limit, however many
clients connect at once.

Redirects (FastAPI's trailing-slash 307) leave with a relative Location, never one built from
the request's Host header.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple
from urllib.parse import urlsplit

from lits.core.errors import UserError
from lits.serve import page_auth

SMALL_BODY_BYTES = 1024 * 1024  # the JSON routes' bodies are a few hundred bytes
UNAUTHORISED = "missing or wrong API token: send 'Authorization: Bearer <token>'"


def token_sha256(token: Optional[str]) -> Optional[str]:
    """sha256 hex of the API token (None without one). UserError for a token no client can send:
    HTTP headers carry visible ASCII, so a token with other characters (non-ASCII, spaces,
    control characters) could never match."""
    if not token:
        return None
    if not all(33 <= ord(c) <= 126 for c in token):
        raise UserError("the API token (LITS_API_TOKEN) must be visible ASCII characters only (no spaces, accents or "
                        "control characters): no client could send it in an HTTP header")
    return hashlib.sha256(token.encode("ascii")).hexdigest()


def token_matches(authorization: bytes, expected_sha256: Optional[str]) -> bool:
    """Whether an Authorization header (raw bytes) carries the token hashed in `expected_sha256`;
    always True without a token."""
    if not expected_sha256:
        return True
    scheme, _, token = authorization.partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(hashlib.sha256(token.strip()).hexdigest(), expected_sha256)


def exposed(host: str) -> bool:
    """Whether listening on `host` reaches beyond this machine (anything but a loopback address)."""
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return True


@dataclass(frozen=True)
class GuardSettings:
    """What `Guard` enforces.

    Attributes:
        token_sha256: sha256 hex of the API token; None: every caller is let in.
        open_paths: paths answered without the token (/healthz, the docs).
        page_prefixes: path prefixes of the HTML pages, let in without the token: each page shows a
            login unless its request is signed in (`lits.serve.page_auth`).
        upload_path, upload_bytes: the upload route and its body limit; every other path has
            SMALL_BODY_BYTES.
        grace_s, min_rate: a body must have arrived at `grace_s + received / min_rate` seconds
            (min_rate in bytes/s) whenever the next part is awaited.
        receiving: upload bodies received at once (twice the default --max-uploads).
    """

    token_sha256: Optional[str] = None
    open_paths: Tuple[str, ...] = ()
    page_prefixes: Tuple[str, ...] = page_auth.PAGE_PREFIXES
    upload_path: str = "/v1/segment"
    upload_bytes: int = 1024 * 1024 * 1024
    grace_s: float = 10.0
    min_rate: float = 64 * 1024
    receiving: int = 16

    def limit(self, path: str) -> int:
        return self.upload_bytes if path == self.upload_path else SMALL_BODY_BYTES


def _mb(n: int) -> str:
    return f"{n / (1024 * 1024):g} MB"


class Refused(Exception):
    """A request answered by the guard itself: status, one-line detail, extra headers."""

    def __init__(self, status: int, detail: str, headers: Optional[Dict[str, str]] = None):
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers or {}


def _header(scope, name: bytes) -> Optional[bytes]:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value
    return None


def check_head(scope, settings: GuardSettings) -> None:
    """Refused for a request whose head alone condemns it: no token (401), a declared body over the
    limit or an unreadable Content-Length (413, 400)."""
    path = scope.get("path", "")
    if not (path in settings.open_paths or path.startswith(settings.page_prefixes)
            or token_matches(_header(scope, b"authorization") or b"", settings.token_sha256)
            or page_auth.session_matches(_header(scope, b"cookie") or b"", settings.token_sha256,
                                         scope.get("method", ""))):
        raise Refused(401, UNAUTHORISED, {"WWW-Authenticate": "Bearer"})
    declared = _header(scope, b"content-length")
    if declared is None:
        return
    if not declared.strip().isdigit():
        raise Refused(400, f"Content-Length {declared[:40].decode('latin-1')!r} is not a number of bytes")
    limit = settings.limit(path)
    if int(declared) > limit:
        raise Refused(413, f"body of {int(declared)} bytes exceeds the limit of {_mb(limit)} for {path}")


async def read_body(receive, limit: int, settings: GuardSettings, path: str) -> Optional[bytes]:
    """The whole request body (None when the client went away); Refused 413 past `limit`, 408
    when it arrives slower than the settings allow."""
    loop = asyncio.get_running_loop()
    start, parts, received = loop.time(), [], 0
    while True:
        wait = start + settings.grace_s + received / settings.min_rate - loop.time()
        try:
            if wait <= 0:
                raise asyncio.TimeoutError
            message = await asyncio.wait_for(receive(), wait)
        except asyncio.TimeoutError:
            raise Refused(408, f"the request body came too slowly ({received} bytes in {loop.time() - start:.0f} s; "
                               f"at least {settings.min_rate / 1024:g} KB/s after {settings.grace_s:g} s)") from None
        if message["type"] == "http.disconnect":
            return None
        part = message.get("body", b"")
        received += len(part)
        if received > limit:
            raise Refused(413, f"body exceeds the limit of {_mb(limit)} for {path}")
        parts.append(part)
        if not message.get("more_body", False):
            return b"".join(parts)


async def _answer(send, refused: Refused) -> None:
    body = json.dumps({"detail": refused.detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")] + [(k.lower().encode(), v.encode()) for k, v in refused.headers.items()]
    await send({"type": "http.response.start", "status": refused.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _relative_redirects(send):
    """`send` with every redirect's Location made relative (path and query only)."""

    async def sending(message):
        if message["type"] == "http.response.start" and 300 <= message["status"] < 400:
            headers = []
            for key, value in message.get("headers", ()):
                if key.lower() == b"location":
                    parts = urlsplit(value.decode("latin-1"))
                    value = (parts.path + (f"?{parts.query}" if parts.query else "")).encode("latin-1")
                headers.append((key, value))
            message = {**message, "headers": headers}
        await send(message)

    return sending


class Guard:
    """ASGI middleware: token, body limit and body deadline for every HTTP request (module
    docstring). `settings` is called once per request (the ingress reads its replica's)."""

    def __init__(self, app, settings: Callable[[], GuardSettings]):
        self.app = app
        self.settings = settings
        self._receiving = None  # (event loop, its Semaphore of upload receptions)

    def _receptions(self, settings: GuardSettings) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if self._receiving is None or self._receiving[0] is not loop:
            self._receiving = (loop, asyncio.Semaphore(settings.receiving))
        return self._receiving[1]

    async def _read_upload(self, receive, settings: GuardSettings, path: str) -> Optional[bytes]:
        """`read_body` of an upload once one of the `receiving` receptions is free (503 when none
        frees within 2 x grace_s: a stalled client's is freed within grace_s)."""
        receptions = self._receptions(settings)
        try:
            await asyncio.wait_for(receptions.acquire(), 2 * settings.grace_s)
        except asyncio.TimeoutError:
            raise Refused(503, f"{settings.receiving} uploads are being received already; send it again shortly",
                          {"Retry-After": str(max(1, math.ceil(settings.grace_s)))}) from None
        try:
            return await read_body(receive, settings.limit(path), settings, path)
        finally:
            receptions.release()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        settings = self.settings()
        path = scope.get("path", "")
        try:
            check_head(scope, settings)
            if path == settings.upload_path:
                body = await self._read_upload(receive, settings, path)
            else:
                body = await read_body(receive, settings.limit(path), settings, path)
        except Refused as refused:
            return await _answer(send, refused)
        if body is None:
            return None
        held = [body]
        del body

        async def replay():
            if held:  # handed over once, then dropped: the route holds the only reference
                return {"type": "http.request", "body": held.pop(), "more_body": False}
            return await receive()

        return await self.app(scope, replay, _relative_redirects(send))


def _finite(value):
    """`value` with every non-finite float (NaN, ±inf, which JSON cannot carry) as its repr string."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def validation_detail(errors: List) -> List:
    """FastAPI's validation errors made JSON-safe (its own 422 cannot carry a NaN it was sent)."""
    from fastapi.encoders import jsonable_encoder

    return _finite(jsonable_encoder(errors))

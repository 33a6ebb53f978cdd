"""The browser's sign-in for the results pages (pure: no Ray, no I/O): a session cookie instead of the
Authorization header a browser cannot send on a link or a picture.

A person types the API token once (the login form, or a `?token=` link that the page exchanges for the
cookie and redirects away from, so the token stays out of the address bar, history and access logs). The
cookie never holds the token: it holds an expiry and an HMAC of it keyed by the token's sha256 (what the
server keeps), so a leaked cookie is worth `SESSION_S` seconds of reading and nothing else:

- it authorises GET and HEAD only (pages, status, records, pictures, masks, reports); submitting,
  cancelling and uploading still need `Authorization: Bearer <token>`, so a page elsewhere cannot make a
  signed-in browser start or stop jobs (the cookie is also SameSite=Strict);
- it is HttpOnly: the page's JavaScript never sees it, and reads the API with the browser's cookie.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Optional
from urllib.parse import urlsplit

COOKIE = "lits_session"
PAGE_PREFIXES = ("/jobs/", "/watches/", "/login", "/logout")  # the pages' paths: each shows its own login (the guard lets them in)
SESSION_S = 12 * 3600
READ_METHODS = ("GET", "HEAD")


def _mac(expires: int, token_sha256: str) -> str:
    return hmac.new(token_sha256.encode("ascii"), f"lits-session:{expires}".encode("ascii"), hashlib.sha256).hexdigest()


def session_value(token_sha256: str, now: Optional[float] = None, session_s: int = SESSION_S) -> str:
    """The cookie's value: '<expiry, unix seconds>.<hex HMAC>'."""
    expires = int((time.time() if now is None else now) + session_s)
    return f"{expires}.{_mac(expires, token_sha256)}"


def session_header(token_sha256: str, now: Optional[float] = None) -> str:
    """A Set-Cookie header value that signs this browser in for SESSION_S seconds."""
    return (f"{COOKIE}={session_value(token_sha256, now)}; Max-Age={SESSION_S}; Path=/; HttpOnly; "
            "SameSite=Strict")


def signed_out_header() -> str:
    return f"{COOKIE}=; Max-Age=0; Path=/; HttpOnly; SameSite=Strict"


def cookie_value(cookie_header: bytes, name: str = COOKIE) -> Optional[str]:
    """The value of cookie `name` in a raw Cookie header, else None."""
    for part in cookie_header.decode("latin-1").split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key == name:
            return value.strip().strip('"')
    return None


def session_matches(cookie_header: bytes, token_sha256: Optional[str], method: str,
                    now: Optional[float] = None) -> bool:
    """Whether a request's Cookie header signs it in for `method`: always without a token; with one, a
    read (GET, HEAD) carrying an unexpired cookie made by `session_value` for this token."""
    if not token_sha256:
        return True
    value = cookie_value(cookie_header) if method.upper() in READ_METHODS else None
    expires, _, mac = (value or "").partition(".")
    if not expires.isdigit() or len(expires) > 12:
        return False
    if int(expires) < (time.time() if now is None else now):
        return False
    return hmac.compare_digest(mac, _mac(int(expires), token_sha256))


def token_sha256_of(token: str) -> str:
    return hashlib.sha256(token.strip().encode("utf-8")).hexdigest()


def local_next(url: Optional[str], default: str) -> str:
    """Where to send the browser after signing in: `url` when it is a path on this server (no scheme,
    no host, no '//' or backslash that a browser would read as another host), else `default`."""
    if not url:
        return default
    parts = urlsplit(url)
    if (parts.scheme or parts.netloc or not url.startswith("/") or url.startswith("//") or "\\" in url
            or any(ord(c) < 32 for c in url)):
        return default
    return url

"""The results pages a person opens in a browser, served by the ingress beside the JSON API:

    GET  /jobs/{id}            a job's page: progress while it runs (refreshing), then its totals, a histogram
                               of tumour burden and a sortable table of its volumes with their previews and
                               links to each mask and report (`lits.serve.page_html`: the page's script
                               reads /v1/jobs/{id} and /v1/jobs/{id}/volumes, the JSON API stays the source)
    GET  /watches/{id}         a watch's page, refreshing while it runs: its state, polls, listing, error,
                               counts, lag and a sortable table of the WATCH_ROWS keys that moved last
                               (state, when, lag, failure, a link to its job's page), from
                               /v1/watches/{id}?entries=WATCH_ROWS&order=recent
    GET  /jobs/{id}?token=T    (and /watches/{id}?token=T) signs the browser in (`lits.serve.page_auth`) and
                               redirects to the page without it, so the token leaves the address bar at once
    GET  /login, POST /login   the login form (token and the page to go back to, in the body)
    GET  /logout               signs the browser out

The guard lets these paths in without the token (`page_auth.PAGE_PREFIXES`); each page shows the login, and no
data, unless the request is signed in: a session cookie, or the Bearer header itself.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations at runtime.
import hmac
import secrets
from typing import Optional
from urllib.parse import parse_qs

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from ray import serve

from lits.serve import http_guard, job_results, page_auth, page_html, watch_routes
from lits.serve.job_spec import JOB_ID as ITEM_ID  # a job's and a watch's ids: 12 hex digits

router = APIRouter(include_in_schema=False)
REFRESH_MS = 2000  # a running job's or watch's page asks for its status this often
PAGES = {"job": "/jobs", "watch": "/watches"}
WATCH_ROWS = 500  # keys a watch's page lists (its first by key; the counts cover them all)
TITLE = "LiTS segmentation"


def _token_sha256() -> Optional[str]:
    return serve.get_replica_context().servable_object.cfg.token_sha256


def signed_in(request: Request, token_sha256: Optional[str]) -> bool:
    """Whether the request may see data: no token configured, the Bearer header, or a session cookie."""
    return (http_guard.token_matches(request.headers.get("authorization", "").encode("latin-1"), token_sha256)
            or page_auth.session_matches(request.headers.get("cookie", "").encode("latin-1"), token_sha256,
                                         request.method))


def _html(body: str, nonce: str, status: int = 200, headers: Optional[dict] = None) -> HTMLResponse:
    """An HTML answer that no other site may frame, that runs only its own inline script (by nonce), is
    never cached and sends no Referer."""
    policy = (f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; img-src 'self'; "
              "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
    return HTMLResponse(body, status_code=status, headers={
        "Content-Security-Policy": policy, "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff", **(headers or {})})


def login_page(next_url: str, what: str = "this page", error: str = "", status: int = 401) -> HTMLResponse:
    nonce = secrets.token_urlsafe(16)
    body = page_html.LOGIN.substitute(title=TITLE, nonce=nonce, style=page_html.STYLE, what=_escape(what),
                                      error=_escape(error), next=_escape(next_url))
    return _html(body, nonce, status)


def _escape(text: str) -> str:
    import html

    return html.escape(text, quote=True)


def _signed_in_redirect(to: str, token_sha256: Optional[str]) -> Response:
    headers = {"Set-Cookie": page_auth.session_header(token_sha256)} if token_sha256 else {}
    return RedirectResponse(to, status_code=303, headers={"Cache-Control": "no-store", **headers})


def _token_ok(token: str, token_sha256: Optional[str]) -> bool:
    return not token_sha256 or hmac.compare_digest(page_auth.token_sha256_of(token), token_sha256)


def _page(request: Request, what: str, item_id: str, token: Optional[str], fill: dict) -> Response:
    """The page of job or watch `item_id` (`what`: 'job' or 'watch', at PAGES[what]/{id}) from `page_html`'s
    template of that name filled with `fill`; the login form until the browser is signed in, a `token`
    exchanged for the cookie and a redirect to the page without it."""
    sha = _token_sha256()
    valid = bool(ITEM_ID.fullmatch(item_id))
    here = f"{PAGES[what]}/{item_id}" if valid else "/login"
    if token is not None:  # exchanged once for the cookie, then out of the address bar
        if not _token_ok(token, sha):
            return login_page(here, f"{what} {item_id}", "wrong token")
        return _signed_in_redirect(here, sha)
    if not signed_in(request, sha):
        return login_page(here, f"{what} {item_id}")
    nonce = secrets.token_urlsafe(16)
    if not valid:
        return _html(f"<!doctype html><title>{TITLE}</title><p>no {what} {_escape(item_id)!s}: a {what} id is 12 "
                     "hexadecimal digits</p>", nonce, 404)
    template = page_html.JOB_PAGE if what == "job" else page_html.WATCH_PAGE
    body = template.substitute(title=f"{TITLE}: {what} {item_id}", nonce=nonce, style=page_html.STYLE,
                               common=page_html.common_js(REFRESH_MS), **{f"{what}_id": item_id}, **fill)
    return _html(body, nonce)


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
async def job_page(request: Request, job_id: str, token: Optional[str] = None) -> Response:
    """The job's page (module docstring); the login form until the browser is signed in."""
    return _page(request, "job", job_id, token, {})


@router.get("/watches/{watch_id}", response_class=HTMLResponse)
async def watch_page(request: Request, watch_id: str, token: Optional[str] = None) -> Response:
    """The watch's page (module docstring); the login form until the browser is signed in."""
    return _page(request, "watch", watch_id, token, {"rows": WATCH_ROWS})


@router.get("/login", response_class=HTMLResponse)
async def login_form(request: Request, next: Optional[str] = None) -> Response:
    sha = _token_sha256()
    to = page_auth.local_next(next, "/login")
    if signed_in(request, sha) and to != "/login":
        return RedirectResponse(to, status_code=303)
    return login_page(to, error="signed in" if signed_in(request, sha) else "", status=200)


@router.post("/login", response_class=HTMLResponse)
async def login(request: Request) -> Response:
    """The form's POST (application/x-www-form-urlencoded: token, next): the cookie and a redirect to
    `next` (a path on this server), or the form again with 'wrong token'."""
    form = parse_qs((await request.body()).decode("utf-8", "replace"), max_num_fields=4)
    token = (form.get("token") or [""])[0]
    to = page_auth.local_next((form.get("next") or [""])[0], "/login")
    sha = _token_sha256()
    if not token or not _token_ok(token, sha):
        return login_page(to, error="wrong token")
    return _signed_in_redirect(to, sha)


@router.get("/logout", response_class=HTMLResponse)
async def logout() -> Response:
    response = login_page("/login", error="signed out", status=200)
    response.headers["Set-Cookie"] = page_auth.signed_out_header()
    return response


def mount(api: FastAPI, v1: APIRouter) -> None:
    """Add the API router `v1` (with the JSON routes the pages read, `lits.serve.job_results`, and the
    watches', `lits.serve.watch_routes`, which take its token dependency) and then these pages to `api`,
    before Serve binds its routes."""
    v1.include_router(job_results.router)
    v1.include_router(watch_routes.router)
    api.include_router(v1)
    api.include_router(router)

"""The web UI: static pages at ``/ui/`` and the session routes it signs in with.

The UI is plain HTML, CSS and ES modules shipped in the package (``gateway/static/ui``), read
once at start and served with a Content-Security-Policy that allows no inline script. Every
path under ``/ui/`` that is not a static file answers the one page, which reads the URL
(``/ui/{tenant}/files/{key}``, ``/ui/{tenant}/admin/tenants``, ...) in the browser.

It is a client of the API: signed in with ``POST /api/v1/session`` (a form with ``username``
and ``password``), it calls the same ``/api/v1/...`` routes as any client, authenticated by
the session cookie (``gateway.access``), with the session's CSRF token on every change.
"""

from __future__ import annotations

import mimetypes
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Final

from aiohttp import web

from .access import ANONYMOUS, Identity, check_password, forwarded, identify, identify_session
from .errors import BadRequest, Forbidden, NotFound, SignInRequired
from .observability import note_identity
from .sessions import COOKIE, SESSIONS
from .state import CONFIG, REGISTRY

STATIC_DIR: Final = Path(__file__).parent / "static" / "ui"
PAGE: Final = "index.html"
UI_HEADERS: Final[Mapping[str, str]] = MappingProxyType(
    {
        "Content-Security-Policy": (
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
            "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
        ),
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-cache",
    }
)
MAX_FIELD: Final = 1024


def _load_static() -> Mapping[str, tuple[bytes, str]]:
    """Return every file of the UI by name, with its content type (read once)."""
    files: dict[str, tuple[bytes, str]] = {}
    for path in sorted(STATIC_DIR.iterdir()):
        if path.is_file():
            kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            if path.suffix == ".js":
                kind = "text/javascript"
            files[path.name] = (path.read_bytes(), f"{kind}; charset=utf-8")
    return MappingProxyType(files)


STATIC: Final = web.AppKey("ui_static", Mapping[str, tuple[bytes, str]])


def _file(request: web.Request, name: str) -> web.Response:
    found = request.app[STATIC].get(name)
    if found is None:
        raise NotFound("no such file of the web UI")
    body, kind = found
    return web.Response(body=body, headers={**UI_HEADERS, "Content-Type": kind})


async def static_file(request: web.Request) -> web.Response:
    return _file(request, request.match_info["name"])


async def page(request: web.Request) -> web.Response:
    """Any other path under ``/ui/``: the one page, which routes in the browser."""
    return _file(request, PAGE)


async def to_page(request: web.Request) -> web.Response:
    raise web.HTTPFound("/ui/")


# -- sessions ----------------------------------------------------------------------------------


def _over_tls(request: web.Request) -> bool:
    return request.secure or (forwarded(request, "X-Forwarded-Proto") or "").lower() == "https"


def _check_same_origin(request: web.Request) -> None:
    """Refuse a sign-in posted by a page of another site (login CSRF)."""
    origin = request.headers.get("Origin")
    if origin is None:
        return  # not sent by a browser's cross-site form or script
    # An origin is scheme://host[:port], the port left out when it is the scheme's default,
    # as in the Host header the same browser sends.
    hosts = {request.host, forwarded(request, "X-Forwarded-Host") or request.host}
    scheme, separator, authority = origin.partition("://")
    known = {host.lower() for host in hosts if host}
    if not separator or scheme.lower() not in ("http", "https") or authority.lower() not in known:
        raise Forbidden("a sign-in must come from a page of this gateway (Origin)")


def _tenancy(request: web.Request) -> dict[str, bool]:
    config = request.app[CONFIG]
    return {"enabled": config["tenants.enabled"], "nullTenant": config.null_tenant_served}


def _answer(request: web.Request, identity: Identity, csrf: str | None) -> dict[str, object]:
    bindings = request.app[REGISTRY].snapshot.bindings_of(identity.kind, identity.name)
    return {
        **identity.to_json(),
        "bindings": [b.to_json() for b in bindings],
        "csrfToken": csrf,
        "tenancy": _tenancy(request),
    }


async def sign_in(request: web.Request) -> web.Response:
    """``POST /api/v1/session``: a form with ``username`` and ``password``; sets the cookie."""
    if not request.app[CONFIG]["auth.enabled"]:
        raise BadRequest("authentication is disabled: no sign-in is needed")
    _check_same_origin(request)
    if request.content_type != "application/x-www-form-urlencoded":
        raise BadRequest("sign in with a form (application/x-www-form-urlencoded)")
    try:
        form = await request.post()
    except ValueError:
        raise BadRequest("the form cannot be read") from None
    username, password = form.get("username"), form.get("password")
    if not isinstance(username, str) or not isinstance(password, str):
        raise BadRequest("username and password: required")
    if len(username) > MAX_FIELD or len(password) > MAX_FIELD:
        raise BadRequest(f"username and password: at most {MAX_FIELD} characters")
    registry = request.app[REGISTRY]
    user = await check_password(request, registry, username, password)
    if user is None:
        raise SignInRequired("wrong username or password")
    identity = Identity("user", user.username, user.super_admin, user.can_create_tenants)
    note_identity(request, identity)
    session_id, session = await request.app[SESSIONS].create(user.username)
    response = web.json_response(_answer(request, identity, session.csrf))
    # No Max-Age: the store decides when a session ends, and answers 401 to a page still open.
    response.set_cookie(
        COOKIE, session_id, path="/", httponly=True, samesite="Strict", secure=_over_tls(request)
    )
    return response


async def get_session(request: web.Request) -> web.Response:
    """``GET /api/v1/session``: who is signed in, the CSRF token, what tenancy is served."""
    if not request.app[CONFIG]["auth.enabled"]:
        caller = Identity("anonymous", ANONYMOUS.name, super_admin=True, can_create_tenants=True)
        return web.json_response(_answer(request, caller, None))
    registry = request.app[REGISTRY]
    if "Authorization" in request.headers:
        caller, csrf = await identify(request, registry), None
    elif COOKIE in request.cookies:
        caller = await identify_session(request, registry)
        session = await request.app[SESSIONS].get(request.cookies[COOKIE])
        csrf = None if session is None else session.csrf
    else:
        raise SignInRequired("not signed in")
    note_identity(request, caller)
    return web.json_response(_answer(request, caller, csrf))


async def sign_out(request: web.Request) -> web.Response:
    """``DELETE /api/v1/session``: end the cookie's session (with its CSRF token)."""
    if not request.app[CONFIG]["auth.enabled"]:
        raise BadRequest("authentication is disabled: there is no session")
    if COOKIE not in request.cookies:
        raise SignInRequired("not signed in")
    note_identity(request, await identify_session(request, request.app[REGISTRY]))
    await request.app[SESSIONS].delete(request.cookies[COOKIE])
    response = web.Response(status=204)
    response.del_cookie(COOKIE, path="/", samesite="Strict", secure=_over_tls(request))
    return response


def add_routes(app: web.Application) -> None:
    """Register the UI and session routes (before the catch-all object routes)."""
    app[STATIC] = _load_static()
    app.router.add_post("/api/v1/session", sign_in)
    app.router.add_get("/api/v1/session", get_session)
    app.router.add_delete("/api/v1/session", sign_out)
    app.router.add_get("/ui", to_page)
    app.router.add_get("/ui/static/{name}", static_file)
    app.router.add_get(r"/ui/{tail:.*}", page)

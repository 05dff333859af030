"""Who is calling, and may they do this in this scope?

Identity: HTTP Basic for users, ``Authorization: Bearer`` for service-account tokens
(``gateway.registry`` verifies both in constant time), or, without an ``Authorization`` header,
the web UI's session cookie (``gateway.sessions``), whose mutating requests must also carry the
session's CSRF token. Access: a role binding of the identity on the scope. A super admin
manages tenants and identities but reads or writes no tenant's files without a binding, as the
seed says.

Every check reads ``registry.snapshot``, an in-memory view: no I/O on the request path, and a
cost that does not grow with the number of tenants (dictionary look-ups).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
from dataclasses import dataclass
from typing import Final, Literal

from aiohttp import web

from .errors import CsrfRefused, Forbidden, SignInRequired, TenantNotFound, Unauthorized
from .guard import forwarded_address, last_entry
from .keys import Scope
from .registry import Registry, Snapshot, User
from .sessions import COOKIE, CSRF_HEADER, SAFE_METHODS, SESSIONS
from .state import CONFIG, GUARD

Action = Literal["read", "write", "manage"]

# Which roles allow which action (ADMIN > EDITOR > VIEWER).
ALLOWED: Final = {
    "read": frozenset({"ADMIN", "EDITOR", "VIEWER"}),
    "write": frozenset({"ADMIN", "EDITOR"}),
    "manage": frozenset({"ADMIN"}),
}
# One answer for "no such tenant", "deleted tenant" and "no access": existence does not leak.
NO_ACCESS: Final = "no access to this tenant"


@dataclass(frozen=True, slots=True)
class Identity:
    kind: Literal["user", "service-account", "anonymous"]
    name: str
    super_admin: bool = False
    can_create_tenants: bool = False

    def to_json(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "name": self.name,
            "superAdmin": self.super_admin,
            "canCreateTenants": self.can_create_tenants,
        }


ANONYMOUS: Final = Identity("anonymous", "anonymous")


async def identify(request: web.Request, registry: Registry) -> Identity:
    """Given a request, return the identity its credentials prove, or raise ``Unauthorized``."""
    header = request.headers.get("Authorization")
    if header is None and COOKIE in request.cookies:
        return await identify_session(request, registry)
    if header is None:
        raise Unauthorized("authentication required: HTTP Basic (users) or Bearer (tokens)")
    scheme, _, value = header.partition(" ")
    scheme = scheme.lower()
    if scheme == "basic":
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            raise Unauthorized("malformed Basic credentials") from None
        username, colon, password = decoded.partition(":")
        user = await check_password(request, registry, username, password) if colon else None
        if user is None:
            raise Unauthorized("wrong username or password")
        return Identity("user", user.username, user.super_admin, user.can_create_tenants)
    if scheme == "bearer":
        found = registry.verify_token(value.strip())
        if found is None:
            raise Unauthorized("invalid, revoked or expired token")
        _token, account = found
        return Identity("service-account", account.name)
    raise Unauthorized("unsupported authentication scheme: use Basic or Bearer")


def forwarded(request: web.Request, name: str) -> str | None:
    """The entry of the ``X-Forwarded-*`` header ``name`` that the trusted proxy set or added
    (``gateway.guard.last_entry``), if the configuration trusts a proxy
    (``server.trust-proxy``); else, or if there is none, None."""
    if not request.app[CONFIG]["server.trust-proxy"]:
        return None
    return last_entry(request.headers.getall(name, [])) or None


def client_address(request: web.Request) -> str | None:
    """The address a request came from: the peer's, or, behind a trusted proxy, the
    ``X-Forwarded-For`` entry that proxy added (``forwarded``; the peer's if that entry is
    not an address)."""
    entry = forwarded(request, "X-Forwarded-For")
    address = forwarded_address([entry]) if entry is not None else None
    return address if address is not None else request.remote


async def check_password(
    request: web.Request, registry: Registry, username: str, password: str
) -> User | None:
    """Given a username and password sent with ``request``, return the user they prove, or
    ``None``. A remembered success is answered at once; otherwise the check is hashed under
    the guard (``gateway.guard``: 429 once the address has spent its budget of failures, 503
    when too many checks wait), and only a failure stays counted against the address."""
    user = registry.remembered(username, password)
    if user is not None:
        return user
    async with request.app[GUARD].checking(client_address(request)) as succeeded:
        user = await _to_the_end(
            asyncio.ensure_future(asyncio.to_thread(registry.verify_password, username, password))
        )
        if user is not None:
            succeeded()
    return user


async def _to_the_end(hashing: asyncio.Future[User | None]) -> User | None:
    """Await a password check's thread; if this task is cancelled meanwhile, still wait for
    the thread to end (it cannot be stopped), then let the cancellation through: its hashing
    place is held until then, so a cancelled check never lets another hash beside it."""
    cancelled = False
    while not hashing.done():
        try:
            await asyncio.wait({hashing})  # (cancelled, it leaves the thread's future alone)
        except asyncio.CancelledError:
            cancelled = True  # the thread hashes on: wait for it (a second or so at most)
    if cancelled:
        if not hashing.cancelled():
            hashing.exception()  # seen, whatever it was: the cancellation is what goes on
        raise asyncio.CancelledError
    return hashing.result()


async def identify_session(request: web.Request, registry: Registry) -> Identity:
    """Given a request with the session cookie, return its user, or raise.

    A mutating method must carry the session's CSRF token (a page of another site can make the
    browser send the cookie, not read the token).
    """
    session = await request.app[SESSIONS].get(request.cookies.get(COOKIE, ""))
    user = None if session is None else registry.snapshot.users.get(session.username)
    if session is None or user is None:
        raise SignInRequired("the session has ended or does not exist: sign in again")
    if request.method not in SAFE_METHODS:
        sent = request.headers.get(CSRF_HEADER, "")
        if not hmac.compare_digest(sent.encode(), session.csrf.encode()):
            raise CsrfRefused(
                f"a request signed in with the session cookie must send the session's "
                f"{CSRF_HEADER} header to change anything"
            )
    return Identity("user", user.username, user.super_admin, user.can_create_tenants)


def tenant_usable(snapshot: Snapshot, tenant: str | None) -> bool:
    """Given a tenant id (``None``: the null tenant), say if it exists and is not deleted."""
    if tenant is None:
        return True
    found = snapshot.tenants.get(tenant)
    return found is not None and not found.deleted


def role_of(snapshot: Snapshot, identity: Identity, tenant: str | None) -> str | None:
    if identity.kind == "anonymous":
        return None
    return snapshot.role(tenant, identity.kind, identity.name)


def authorize(snapshot: Snapshot, identity: Identity | None, scope: Scope, action: Action) -> None:
    """Raise unless ``identity`` may do ``action`` in ``scope``.

    ``identity=None`` means authentication is off: only the tenant's existence is checked
    (404). Otherwise an unknown, deleted or inaccessible tenant gives the same 403.
    """
    if identity is None:
        if not tenant_usable(snapshot, scope.tenant):
            raise TenantNotFound("no such tenant")
        return
    if not tenant_usable(snapshot, scope.tenant):
        raise Forbidden(NO_ACCESS)
    if action == "manage" and identity.super_admin:
        return  # a super admin manages every tenant (usage, purge), yet reads no file
    role = role_of(snapshot, identity, scope.tenant)
    if role is None or role not in ALLOWED[action]:
        raise Forbidden(NO_ACCESS)

"""The admin API: tenants (the seed's ``POST /api/v1/tenants``), users, service accounts,
tokens and role bindings.

Rules (the seed's): a super admin manages tenants, users and service accounts; the user who
creates a tenant gets its ADMIN role unless they are a super admin; a tenant's ADMIN manages
its members; listing tenants shows only those the caller can access (a super admin sees all).

Audit: a tenant's audit log (``gateway.audit``) is read by its ADMIN or a super admin; anyone
else gets the 403 of a tenant that does not exist. The admin mutations of a tenant (creation,
update, soft delete, restore, role grants and revocations) are recorded in its log once they
pass authorization.
"""

from __future__ import annotations

from typing import Any, Final

from aiohttp import web

from .access import ANONYMOUS, NO_ACCESS, Identity, identify, role_of, tenant_usable
from .audit import DEFAULT_LIMIT, MAX_LIMIT
from .errors import BadRequest, Forbidden, NotFound
from .files import read_json
from .lifecycle import purge_tenant as purge_tenant_data
from .observability import AUDIT, note_identity, note_mutation
from .registry import ROLES, Registry
from .state import BACKEND, CONFIG, REGISTRY, USAGE

KINDS: Final = ("user", "service-account")


def _registry(request: web.Request) -> Registry:
    return request.app[REGISTRY]


async def _caller(request: web.Request) -> Identity:
    """Given a request, return its identity (everyone is a super admin with auth off)."""
    if not request.app[CONFIG]["auth.enabled"]:
        caller = Identity("anonymous", ANONYMOUS.name, super_admin=True, can_create_tenants=True)
    else:
        caller = await identify(request, _registry(request))
    note_identity(request, caller)
    return caller


async def _super_admin(request: web.Request) -> Identity:
    caller = await _caller(request)
    if not caller.super_admin:
        raise Forbidden("this needs a super admin")
    return caller


def _field(body: dict[str, Any], name: str, kind: type, *, required: bool = True) -> Any:
    if name not in body:
        if required:
            raise BadRequest(f"{name}: required")
        return None
    value = body[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BadRequest(f"{name}: must be a {kind.__name__}")
    return value


def _tenant_param(value: object) -> str | None:
    """A binding's tenant: an id, or null / absent for the default (null) tenant."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise BadRequest("tenant: must be a tenant id or null")
    return value


async def _may_manage_members(request: web.Request, tenant: str | None) -> Identity:
    caller = await _caller(request)
    if caller.super_admin:
        return caller
    snapshot = _registry(request).snapshot
    if not tenant_usable(snapshot, tenant) or role_of(snapshot, caller, tenant) != "ADMIN":
        raise Forbidden(NO_ACCESS)
    return caller


# -- tenants -----------------------------------------------------------------------------------


async def create_tenant(request: web.Request) -> web.Response:
    caller = await _caller(request)
    if not (caller.super_admin or caller.can_create_tenants):
        raise Forbidden("creating tenants needs a super admin or the tenant-creation right")
    body = await read_json(request)
    tenant_id = _field(body, "id", str)
    name = _field(body, "name", str, required=False) or tenant_id
    deleted = _field(body, "deleted", bool, required=False) or False
    note_mutation(request, tenant_id, "tenant.create", tenant_id)
    registry = _registry(request)
    tenant = await registry.create_tenant(tenant_id, name)
    if deleted:
        tenant = await registry.update_tenant(tenant_id, deleted=True)
    if not caller.super_admin and caller.kind != "anonymous":
        # The seed: the creator gets the Admin role, except a super admin.
        await registry.grant(tenant.id, caller.kind, caller.name, "ADMIN")
    return web.json_response(tenant.to_json(), status=201)


async def list_tenants(request: web.Request) -> web.Response:
    caller = await _caller(request)
    snapshot = _registry(request).snapshot
    if caller.super_admin:
        tenants = list(snapshot.tenants.values())
    else:
        ids = {b.tenant for b in snapshot.bindings_of(caller.kind, caller.name)}
        tenants = [t for t in (snapshot.tenants.get(i) for i in ids if i) if t and not t.deleted]
    tenants.sort(key=lambda t: t.id)
    return web.json_response([t.to_json() for t in tenants])


async def _visible_tenant(request: web.Request) -> tuple[Identity, str]:
    caller = await _caller(request)
    tenant_id = request.match_info["tenant"]
    snapshot = _registry(request).snapshot
    tenant = snapshot.tenants.get(tenant_id)
    if caller.super_admin:
        if tenant is None:
            raise NotFound("no such tenant")
        return caller, tenant_id
    if not tenant_usable(snapshot, tenant_id) or role_of(snapshot, caller, tenant_id) is None:
        raise Forbidden(NO_ACCESS)
    return caller, tenant_id


async def get_tenant(request: web.Request) -> web.Response:
    _, tenant_id = await _visible_tenant(request)
    return web.json_response(_registry(request).snapshot.tenants[tenant_id].to_json())


async def update_tenant(request: web.Request) -> web.Response:
    caller, tenant_id = await _visible_tenant(request)
    body = await read_json(request)
    name = _field(body, "name", str, required=False)
    deleted = _field(body, "deleted", bool, required=False)
    if "id" in body and body["id"] != tenant_id:
        raise BadRequest("id: a tenant's id cannot change")
    if deleted is not None and not caller.super_admin:
        raise Forbidden("deleting or restoring a tenant needs a super admin")
    quota = _field(body, "quota", dict, required=False)
    limits: dict[str, Any] = {}
    if quota is not None:
        if not caller.super_admin:
            raise Forbidden("setting a tenant's quota needs a super admin")
        unknown = set(quota) - {"maxBytes", "maxObjectSize"}
        if unknown:
            raise BadRequest("quota: only maxBytes and maxObjectSize")
        if "maxBytes" in quota:
            limits["max_bytes"] = quota["maxBytes"]
        if "maxObjectSize" in quota:
            limits["max_object_size"] = quota["maxObjectSize"]
    snapshot = _registry(request).snapshot
    if not caller.super_admin and role_of(snapshot, caller, tenant_id) != "ADMIN":
        raise Forbidden(NO_ACCESS)
    note_mutation(request, tenant_id, "tenant.update", tenant_id)
    tenant = await _registry(request).update_tenant(tenant_id, name=name, deleted=deleted, **limits)
    return web.json_response(tenant.to_json())


async def _set_deleted(request: web.Request, deleted: bool) -> web.Response:
    """Soft delete or restore a tenant (super admin)."""
    await _super_admin(request)
    tenant_id = request.match_info["tenant"]
    if tenant_id not in _registry(request).snapshot.tenants:
        raise NotFound("no such tenant")
    note_mutation(request, tenant_id, "tenant.delete" if deleted else "tenant.restore", tenant_id)
    tenant = await _registry(request).update_tenant(tenant_id, deleted=deleted)
    return web.json_response(tenant.to_json())


async def delete_tenant(request: web.Request) -> web.Response:
    return await _set_deleted(request, True)


async def restore_tenant(request: web.Request) -> web.Response:
    return await _set_deleted(request, False)


async def purge_tenant(request: web.Request) -> web.Response:
    """Delete a tenant with every object it holds (super admin, ``{"confirm": "<id>"}``):
    soft delete, wait for the replicas to see it, delete the objects, the roles, the tenant.
    Interrupted, the same request (the tenant is then soft-deleted) finishes it."""
    await _super_admin(request)
    tenant_id = request.match_info["tenant"]
    registry = _registry(request)
    if tenant_id not in registry.snapshot.tenants:
        raise NotFound("no such tenant")
    body = await read_json(request)
    if body.get("confirm") != tenant_id:
        raise BadRequest(
            "confirm: must be the tenant's id; this deletes every object of the tenant, "
            "then the tenant, for good"
        )
    note_mutation(request, tenant_id, "tenant.purge", tenant_id)
    settle = 2 * float(request.app[CONFIG]["auth.cache-seconds"])
    report = await purge_tenant_data(
        request.app[BACKEND], registry, request.app[USAGE], tenant_id, settle=settle
    )
    return web.json_response(report.to_json())


# -- bindings ----------------------------------------------------------------------------------


async def list_bindings(request: web.Request) -> web.Response:
    tenant = _tenant_param(request.query.get("tenant"))
    await _may_manage_members(request, tenant)
    members = _registry(request).snapshot.members(tenant)
    return web.json_response([b.to_json() for b in members])


def _binding_target(body: dict[str, Any]) -> tuple[str | None, str, str]:
    tenant = _tenant_param(body.get("tenant"))
    kind = _field(body, "kind", str)
    if kind not in KINDS:
        raise BadRequest("kind: must be user or service-account")
    subject = _field(body, "subject", str)
    return tenant, kind, subject


async def put_binding(request: web.Request) -> web.Response:
    await _caller(request)  # 401 before anything about the body
    body = await read_json(request)
    tenant, kind, subject = _binding_target(body)
    role = _field(body, "role", str)
    if role not in ROLES:
        raise BadRequest(f"role: must be one of {', '.join(ROLES)}")
    await _may_manage_members(request, tenant)
    note_mutation(request, tenant, f"binding.grant:{role}", f"{kind}/{subject}")
    binding = await _registry(request).grant(tenant, kind, subject, role)
    return web.json_response(binding.to_json())


async def delete_binding(request: web.Request) -> web.Response:
    await _caller(request)  # 401 before anything about the body
    body = await read_json(request)
    tenant, kind, subject = _binding_target(body)
    await _may_manage_members(request, tenant)
    note_mutation(request, tenant, "binding.revoke", f"{kind}/{subject}")
    await _registry(request).revoke(tenant, kind, subject)
    return web.Response(status=204)


# -- audit -------------------------------------------------------------------------------------


async def _audit_page(request: web.Request, tenant: str | None) -> web.Response:
    """Given a tenant the caller may audit, return a page of its audit log (oldest first)."""
    caller = await _caller(request)
    snapshot = _registry(request).snapshot
    found = None if tenant is None else snapshot.tenants.get(tenant)
    if caller.super_admin:
        if tenant is not None and found is None:
            raise NotFound("no such tenant")
    elif (tenant is not None and (found is None or found.deleted)) or role_of(
        snapshot, caller, tenant
    ) != "ADMIN":
        raise Forbidden(NO_ACCESS)  # the same answer as for a tenant that does not exist
    value = request.query.get("limit")
    if value is not None and not (value.isdigit() and 1 <= int(value) <= MAX_LIMIT):
        raise BadRequest(f"limit must be an integer from 1 to {MAX_LIMIT}")
    limit = DEFAULT_LIMIT if value is None else int(value)
    records, cursor = await request.app[AUDIT].read(
        tenant, limit, request.query.get("cursor") or None
    )
    return web.json_response({"records": records, "cursor": cursor})


async def tenant_audit(request: web.Request) -> web.Response:
    return await _audit_page(request, request.match_info["tenant"])


async def null_tenant_audit(request: web.Request) -> web.Response:
    return await _audit_page(request, None)


# -- users, service accounts, tokens ---------------------------------------------------------


async def me(request: web.Request) -> web.Response:
    caller = await _caller(request)
    bindings = _registry(request).snapshot.bindings_of(caller.kind, caller.name)
    return web.json_response({**caller.to_json(), "bindings": [b.to_json() for b in bindings]})


async def list_users(request: web.Request) -> web.Response:
    await _super_admin(request)
    users = sorted(_registry(request).snapshot.users.values(), key=lambda u: u.username)
    return web.json_response([u.to_json() for u in users])


async def create_user(request: web.Request) -> web.Response:
    await _super_admin(request)
    body = await read_json(request)
    user = await _registry(request).create_user(
        _field(body, "username", str),
        _field(body, "password", str),
        super_admin=_field(body, "superAdmin", bool, required=False) or False,
        can_create_tenants=_field(body, "canCreateTenants", bool, required=False) or False,
    )
    return web.json_response(user.to_json(), status=201)


async def update_user(request: web.Request) -> web.Response:
    await _super_admin(request)
    body = await read_json(request)
    user = await _registry(request).update_user(
        request.match_info["username"],
        password=_field(body, "password", str, required=False),
        super_admin=_field(body, "superAdmin", bool, required=False),
        can_create_tenants=_field(body, "canCreateTenants", bool, required=False),
    )
    return web.json_response(user.to_json())


async def delete_user(request: web.Request) -> web.Response:
    await _super_admin(request)
    await _registry(request).delete_user(request.match_info["username"])
    return web.Response(status=204)


async def list_service_accounts(request: web.Request) -> web.Response:
    await _super_admin(request)
    accounts = sorted(_registry(request).snapshot.service_accounts.values(), key=lambda a: a.name)
    return web.json_response([a.to_json() for a in accounts])


async def create_service_account(request: web.Request) -> web.Response:
    await _super_admin(request)
    body = await read_json(request)
    account = await _registry(request).create_service_account(
        _field(body, "name", str), _field(body, "description", str, required=False) or ""
    )
    return web.json_response(account.to_json(), status=201)


async def delete_service_account(request: web.Request) -> web.Response:
    await _super_admin(request)
    await _registry(request).delete_service_account(request.match_info["name"])
    return web.Response(status=204)


async def create_token(request: web.Request) -> web.Response:
    await _super_admin(request)
    body = await read_json(request)
    expires_in = body.get("expiresIn")
    if expires_in is not None and (
        isinstance(expires_in, bool) or not isinstance(expires_in, (int, float))
    ):
        raise BadRequest("expiresIn: must be a number of seconds")
    token, plaintext = await _registry(request).create_token(
        request.match_info["name"],
        description=_field(body, "description", str, required=False) or "",
        expires_in=expires_in,
    )
    # The only time the token is ever shown.
    return web.json_response({**token.to_json(), "token": plaintext}, status=201)


async def list_tokens(request: web.Request) -> web.Response:
    await _super_admin(request)
    name = request.match_info["name"]
    snapshot = _registry(request).snapshot
    if name not in snapshot.service_accounts:
        raise NotFound("no such service account")
    tokens = sorted((t for t in snapshot.tokens.values() if t.account == name), key=lambda t: t.id)
    return web.json_response([t.to_json() for t in tokens])


async def revoke_token(request: web.Request) -> web.Response:
    await _super_admin(request)
    token = await _registry(request).revoke_token(request.match_info["token"])
    return web.json_response(token.to_json())


def add_routes(router: web.UrlDispatcher) -> None:
    """Register the admin routes (before the catch-all object routes)."""
    router.add_post("/api/v1/tenants", create_tenant)
    router.add_get("/api/v1/tenants", list_tenants)
    router.add_get("/api/v1/tenants/{tenant}", get_tenant)
    router.add_put("/api/v1/tenants/{tenant}", update_tenant)
    router.add_delete("/api/v1/tenants/{tenant}", delete_tenant)
    router.add_post("/api/v1/tenants/{tenant}/restore", restore_tenant)
    router.add_post("/api/v1/tenants/{tenant}/purge", purge_tenant)
    router.add_get("/api/v1/tenants/{tenant}/audit", tenant_audit)
    router.add_get("/api/v1/audit", null_tenant_audit)
    router.add_get("/api/v1/bindings", list_bindings)
    router.add_put("/api/v1/bindings", put_binding)
    router.add_delete("/api/v1/bindings", delete_binding)
    router.add_get("/api/v1/me", me)
    router.add_get("/api/v1/users", list_users)
    router.add_post("/api/v1/users", create_user)
    router.add_patch("/api/v1/users/{username}", update_user)
    router.add_delete("/api/v1/users/{username}", delete_user)
    router.add_get("/api/v1/service-accounts", list_service_accounts)
    router.add_post("/api/v1/service-accounts", create_service_account)
    router.add_delete("/api/v1/service-accounts/{name}", delete_service_account)
    router.add_get("/api/v1/service-accounts/{name}/tokens", list_tokens)
    router.add_post("/api/v1/service-accounts/{name}/tokens", create_token)
    router.add_delete("/api/v1/tokens/{token}", revoke_token)

"""The data-lifecycle routes of a scope: its usage and purge (``/api/v1/{tenant}/usage|purge``),
dispatched with the object routes, action ``manage``: the tenant's ADMIN or a super admin.
A tenant's deletion with its data is an admin route (``gateway.admin.purge_tenant``).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from .errors import BadRequest, NotFound
from .files import read_json
from .keys import Scope
from .lifecycle import parse_duration
from .lifecycle import purge as purge_files
from .observability import note_key
from .state import BACKEND, REGISTRY, USAGE


def _no_key(raw_key: str | None) -> None:
    if raw_key is not None:
        raise NotFound("no such route")


def quota_json(request: web.Request, tenant: str | None) -> dict[str, Any]:
    found = None if tenant is None else request.app[REGISTRY].snapshot.tenants.get(tenant)
    return {
        "maxBytes": None if found is None else found.max_bytes,
        "maxObjectSize": None if found is None else found.max_object_size,
    }


async def usage(request: web.Request, scope: Scope, raw_key: str | None) -> web.Response:
    """``GET /api/v1/{tenant}/usage``: bytes and objects, from the stored counters."""
    _no_key(raw_key)
    totals = await request.app[USAGE].read(scope.tenant)
    return web.json_response(
        {"tenant": scope.tenant, **totals.to_json(), "quota": quota_json(request, scope.tenant)}
    )


def _older_than(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise BadRequest("olderThan: required, a duration such as 30d, 12h, 15m or seconds")
    return parse_duration(str(value))


async def purge(request: web.Request, scope: Scope, raw_key: str | None) -> web.Response:
    """``POST /api/v1/{tenant}/purge`` ``{"olderThan", "prefix", "dryRun"}``: delete the files
    last modified before the bound; answer the count and bytes."""
    _no_key(raw_key)
    body = await read_json(request)
    older_than = _older_than(body.get("olderThan"))
    prefix = body.get("prefix") or ""
    if not isinstance(prefix, str):
        raise BadRequest("prefix: must be a key (a directory) or absent")
    dry_run = body.get("dryRun", False)
    if not isinstance(dry_run, bool):
        raise BadRequest("dryRun: must be true or false")
    note_key(request, prefix)
    report = await purge_files(
        request.app[BACKEND], request.app[USAGE], scope, prefix, older_than, dry_run=dry_run
    )
    return web.json_response(report.to_json())

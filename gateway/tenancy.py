"""The tenancy modes of DESIGN.md: which scopes a URL may name, and which tenants exist."""

from __future__ import annotations

from .config import Config
from .errors import NotFound, TenantNotFound
from .keys import NULL_SCOPE, Scope, tenant_scope


class Tenancy:
    """Given the URL's tenant segment (as sent), return its ``Scope`` or refuse it.

    Which tenants exist comes from ``tenants.ids`` until the tenant registry replaces it;
    the check is a set look-up, with no I/O on the request path.
    """

    def __init__(self, config: Config) -> None:
        self.enabled: bool = config["tenants.enabled"]
        self.null_served: bool = config.null_tenant_served
        self.tenant_ids: frozenset[str] = frozenset(config["tenants.ids"])

    def scope(self, raw_tenant: str | None) -> Scope:
        if raw_tenant is None:
            if not self.null_served:
                raise NotFound(
                    "the default (null) tenant is disabled on this gateway "
                    "(tenants.default-tenant: false); name a tenant: /api/v1/{tenant}/..."
                )
            return NULL_SCOPE
        if not self.enabled:
            raise NotFound(
                "multi-tenancy is not enabled on this gateway (tenants.enabled: false); "
                "use /api/v1/files/..."
            )
        scope = tenant_scope(raw_tenant)
        if raw_tenant not in self.tenant_ids:
            raise TenantNotFound("no such tenant")
        return scope

"""The tenancy modes of DESIGN.md: which scopes a URL may name.

Whether a named tenant exists (and may be used by the caller) is ``gateway.access``'s question,
answered from the registry's in-memory snapshot.
"""

from __future__ import annotations

from .config import Config
from .errors import NotFound
from .keys import NULL_SCOPE, Scope, tenant_scope


class Tenancy:
    """Given the URL's tenant segment (as sent), return its ``Scope`` or refuse it."""

    def __init__(self, config: Config) -> None:
        self.enabled: bool = config["tenants.enabled"]
        self.null_served: bool = config.null_tenant_served

    def check_mode(self, raw_tenant: str | None) -> None:
        """Raise ``NotFound`` if the tenancy mode does not serve this kind of route."""
        if raw_tenant is None:
            if not self.null_served:
                raise NotFound(
                    "the default (null) tenant is disabled on this gateway "
                    "(tenants.default-tenant: false); name a tenant: /api/v1/{tenant}/..."
                )
        elif not self.enabled:
            raise NotFound(
                "multi-tenancy is not enabled on this gateway (tenants.enabled: false); "
                "use /api/v1/files/..."
            )

    @staticmethod
    def scope(raw_tenant: str | None) -> Scope:
        """Given a tenant segment the mode serves, return its scope (400 outside the grammar)."""
        return NULL_SCOPE if raw_tenant is None else tenant_scope(raw_tenant)

"""A real gateway process with auth on, one tenant and a worker's token: what clients meet.

``tenant_gateway(config)`` starts ``GatewayProcess`` with a known super admin password and
tenants enabled, then, through the admin API as a deployment would: creates the tenant,
a service account ``worker`` with the EDITOR role on it, and a token for it.
"""

from __future__ import annotations

import base64
import contextlib
import json
import secrets
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypedDict

from tests.support.gateway_process import GatewayProcess, nested

TENANT: Final = "acme"
_OPENER: Final = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ClientOptions(TypedDict):
    """The keyword arguments ``Client`` and ``KestraFileSystem`` take to reach a tenant."""

    url: str
    tenant: str
    token: str


@dataclass(frozen=True)
class TenantGateway:
    process: GatewayProcess
    url: str
    tenant: str
    token: str
    admin_auth: str  # "admin:<password>"

    @property
    def options(self) -> ClientOptions:
        """The client's / fsspec's options for the tenant's worker."""
        return {"url": self.url, "tenant": self.tenant, "token": self.token}


def admin_call(url: str, auth: str, method: str, path: str, body: Any = None) -> Any:
    """Send one admin API request with Basic ``auth``; return the parsed JSON answer."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, method=method)
    request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    if data is not None:
        request.add_header("Content-Type", "application/json")
    with _OPENER.open(request, timeout=30) as response:
        text = response.read()
    return json.loads(text) if text else None


@contextlib.contextmanager
def tenant_gateway(config: Mapping[str, Any], tenant: str = TENANT) -> Iterator[TenantGateway]:
    """Run a gateway over ``config``'s storage with ``tenant`` and a worker token for it."""
    password = secrets.token_urlsafe(16)
    full = nested(config)
    full.setdefault("tenants", {}).update({"enabled": True, "default-tenant": True})
    with GatewayProcess(full, env={"GATEWAY_ADMIN_PASSWORD": password}) as process:
        assert process.url is not None
        auth = f"admin:{password}"
        admin_call(process.url, auth, "POST", "/api/v1/tenants", {"id": tenant, "name": tenant})
        admin_call(process.url, auth, "POST", "/api/v1/service-accounts", {"name": "worker"})
        binding = {"tenant": tenant, "kind": "service-account", "subject": "worker"}
        admin_call(process.url, auth, "PUT", "/api/v1/bindings", {**binding, "role": "EDITOR"})
        token = admin_call(process.url, auth, "POST", "/api/v1/service-accounts/worker/tokens", {})
        yield TenantGateway(process, process.url, tenant, token["token"], auth)

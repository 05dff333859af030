"""The admin API and the seed's walk-through (``shared/seed/kestra-tenants.md``) over HTTP."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway import config
from gateway.app import create_app
from gateway.state import REGISTRY
from tests.support.auth import basic

Client = TestClient[web.Request, web.Application]
ROOT_PASSWORD = "root password for tests"


ROOT = basic("root", ROOT_PASSWORD)


@pytest.fixture
async def client(
    tmp_path: Path, aiohttp_client: Callable[[web.Application], Awaitable[Client]]
) -> Client:
    values: dict[str, Any] = {
        "storage.type": "local",
        "storage.local.base-path": str(tmp_path / "data"),
        "tenants.enabled": True,
        "tenants.default-tenant": False,  # the seed's best practice
        "admin.username": "root",
        "admin.password": ROOT_PASSWORD,
        "admin.password-file": str(tmp_path / "admin.txt"),
    }
    return await aiohttp_client(create_app(config.check(values)))


async def make_user(client: Client, name: str, **rights: bool) -> dict[str, str]:
    password = f"{name} password 123"
    response = await client.post(
        "/api/v1/users", json={"username": name, "password": password, **rights}, headers=ROOT
    )
    assert response.status == 201, await response.text()
    return basic(name, password)


async def test_seed_walk_through_creator_gets_admin_super_admin_gets_nothing(
    client: Client,
) -> None:
    # The seed's curl body, sent by a super admin: no data access until a role is granted.
    response = await client.post(
        "/api/v1/tenants", json={"id": "stage", "name": "staging", "deleted": False}, headers=ROOT
    )
    assert response.status == 201
    assert (await response.json())["id"] == "stage"
    response = await client.put("/api/v1/stage/files/a.txt", data=b"x", headers=ROOT)
    assert response.status == 403
    # ... until the super admin grants a role, to themself here.
    response = await client.put(
        "/api/v1/bindings",
        json={"tenant": "stage", "kind": "user", "subject": "root", "role": "ADMIN"},
        headers=ROOT,
    )
    assert response.status == 200
    assert (await client.put("/api/v1/stage/files/a.txt", data=b"x", headers=ROOT)).status == 201

    # A user with the tenant-creation right gets the Admin role on what they create.
    carol = await make_user(client, "carol", canCreateTenants=True)
    response = await client.post(
        "/api/v1/tenants", json={"id": "prod", "name": "production"}, headers=carol
    )
    assert response.status == 201
    assert (await client.put("/api/v1/prod/files/b.txt", data=b"y", headers=carol)).status == 201
    me = await (await client.get("/api/v1/me", headers=carol)).json()
    assert {"tenant": "prod", "kind": "user", "subject": "carol", "role": "ADMIN"} in me["bindings"]
    # Listing tenants shows only those the caller can access; a super admin sees all.
    listed = await (await client.get("/api/v1/tenants", headers=carol)).json()
    assert [t["id"] for t in listed] == ["prod"]
    listed = await (await client.get("/api/v1/tenants", headers=ROOT)).json()
    assert [t["id"] for t in listed] == ["prod", "stage"]


async def test_user_without_the_right_cannot_create_tenants(client: Client) -> None:
    dave = await make_user(client, "dave")
    response = await client.post("/api/v1/tenants", json={"id": "x", "name": "x"}, headers=dave)
    assert response.status == 403
    assert "x" not in client.app[REGISTRY].snapshot.tenants


async def test_creating_an_existing_tenant_is_a_conflict(client: Client) -> None:
    body = {"id": "stage", "name": "Staging"}
    assert (await client.post("/api/v1/tenants", json=body, headers=ROOT)).status == 201
    response = await client.post(
        "/api/v1/tenants", json={"id": "stage", "name": "other"}, headers=ROOT
    )
    assert response.status == 409
    assert client.app[REGISTRY].snapshot.tenants["stage"].name == "Staging"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "no id"}, "id"),
        ({"id": 5, "name": "x"}, "id"),
        ({"id": "ok", "name": 3}, "name"),
        ({"id": "ok", "deleted": "no"}, "deleted"),
    ],
)
async def test_validation_errors_name_the_field(
    client: Client, body: dict[str, Any], field: str
) -> None:
    response = await client.post("/api/v1/tenants", json=body, headers=ROOT)
    assert response.status == 400
    assert (await response.json())["message"].startswith(f"{field}:")


@pytest.mark.parametrize("tenant_id", ["Stage", "st.age", "a/b", "files", "x" * 64])
async def test_tenant_id_outside_the_grammar_is_refused(client: Client, tenant_id: str) -> None:
    response = await client.post("/api/v1/tenants", json={"id": tenant_id}, headers=ROOT)
    assert response.status == 400
    assert (await response.json())["error"] == "invalid_tenant"


async def test_soft_delete_refuses_everyone_until_restored(client: Client) -> None:
    await client.post("/api/v1/tenants", json={"id": "stage"}, headers=ROOT)
    erin = await make_user(client, "erin")
    await client.put(
        "/api/v1/bindings",
        json={"tenant": "stage", "kind": "user", "subject": "erin", "role": "EDITOR"},
        headers=ROOT,
    )
    assert (await client.put("/api/v1/stage/files/k", data=b"1", headers=erin)).status == 201
    assert (await client.delete("/api/v1/tenants/stage", headers=ROOT)).status == 200
    assert (await client.get("/api/v1/stage/files/k", headers=erin)).status == 403
    gone = await client.get("/api/v1/stage/files/k", headers=erin)
    nosuch = await client.get("/api/v1/nosuch/files/k", headers=erin)
    assert (gone.status, await gone.read()) == (nosuch.status, await nosuch.read())
    assert (await client.post("/api/v1/tenants/stage/restore", headers=ROOT)).status == 200
    assert await (await client.get("/api/v1/stage/files/k", headers=erin)).read() == b"1"


async def test_unauthenticated_answers_401_with_a_challenge(client: Client) -> None:
    for method, path in [("GET", "/api/v1/tenants"), ("PUT", "/api/v1/stage/files/x")]:
        response = await client.request(method, path)
        assert response.status == 401
        challenge = response.headers["WWW-Authenticate"]
        assert "Basic" in challenge and "Bearer" in challenge
    response = await client.get("/api/v1/tenants", headers=basic("root", "wrong password"))
    assert response.status == 401
    assert "wrong password" not in await response.text()


async def test_token_is_shown_once_and_works_until_revoked(client: Client) -> None:
    await client.post("/api/v1/tenants", json={"id": "stage"}, headers=ROOT)
    await client.post("/api/v1/service-accounts", json={"name": "worker"}, headers=ROOT)
    await client.put(
        "/api/v1/bindings",
        json={"tenant": "stage", "kind": "service-account", "subject": "worker", "role": "EDITOR"},
        headers=ROOT,
    )
    created = await (
        await client.post("/api/v1/service-accounts/worker/tokens", json={}, headers=ROOT)
    ).json()
    token = created["token"]
    bearer = {"Authorization": f"Bearer {token}"}
    assert (await client.put("/api/v1/stage/files/out", data=b"o", headers=bearer)).status == 201
    listed = await (await client.get("/api/v1/service-accounts/worker/tokens", headers=ROOT)).text()
    assert token not in listed
    assert token.rsplit("_", 1)[-1] not in listed
    response = await client.delete(f"/api/v1/tokens/{created['id']}", headers=ROOT)
    assert response.status == 200
    assert (await client.get("/api/v1/stage/files/out", headers=bearer)).status == 401


async def test_bootstrap_writes_a_generated_password_to_an_owner_only_file(
    tmp_path: Path, aiohttp_client: Callable[[web.Application], Awaitable[Client]]
) -> None:
    secret = tmp_path / "admin.txt"
    values = {
        "storage.type": "local",
        "storage.local.base-path": str(tmp_path / "data"),
        "admin.password-file": str(secret),
    }
    client = await aiohttp_client(create_app(config.check(values)))
    username, _, password = secret.read_text().strip().partition(":")
    assert username == "admin"
    assert len(password) >= 16
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    me = await client.get("/api/v1/me", headers=basic(username, password))
    assert (await me.json())["superAdmin"] is True
    # The stored document holds a hash, never the password.
    documents = list((tmp_path / "data/.gateway/registry").rglob("*.json"))
    assert documents
    assert all(password not in p.read_text() for p in documents)


async def test_auth_disabled_is_a_warning_at_start(
    tmp_path: Path,
    aiohttp_client: Callable[[web.Application], Awaitable[Client]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    values = {
        "storage.type": "memory",
        "auth.enabled": False,
        "admin.password-file": str(tmp_path / "admin.txt"),
    }
    with caplog.at_level(logging.WARNING, logger="gateway"):
        client = await aiohttp_client(create_app(config.check(values)))
    assert any("auth.enabled is false" in r.getMessage() for r in caplog.records)
    assert (await client.put("/api/v1/files/x", data=b"open")).status == 201
    assert not (tmp_path / "admin.txt").exists()

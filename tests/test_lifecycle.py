"""Purge, tenant deletion with its data, usage counters and quotas (the data-lifecycle issue).

The purge and the tenant purge run on every backend (``backend`` fixture: memory, local disk,
S3 on moto's server); the quotas, usage and the routes' access rules over HTTP (the app with
auth on, local disk); the CLI through click's runner on a local store.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient
from click.testing import CliRunner

from backends import s3
from backends.base import Backend
from gateway import config, usage
from gateway.app import create_app
from gateway.cli import main
from gateway.keys import tenant_scope
from gateway.lifecycle import migrate_default_tenant, purge, purge_tenant
from gateway.registry import Registry
from gateway.usage import Usage
from tests.backends.helpers import get, names, put
from tests.conftest import Seeder
from tests.support.auth import basic

# The backend fixture lives in the session's event loop (it shares one S3 client).
on_backends = pytest.mark.asyncio(loop_scope="session")

Client = TestClient[web.Request, web.Application]


@pytest.fixture
def small_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    """Listings (and S3 batch deletes) of 7 entries a page: what pages past the store's
    listing limit is proven without seeding thousands of objects."""
    monkeypatch.setattr(usage, "LIST_PAGE", 7)
    monkeypatch.setattr(s3, "LIST_PAGE", 7)


# -- purge (every backend) ---------------------------------------------------------------------


@on_backends
async def test_purge_deletes_exactly_the_files_older_than_the_bound(
    backend: Backend, small_pages: None
) -> None:
    old = {f"tenants/acme/ns/{d}/old-{i}.bin": b"o" * i for d in ("a", "b") for i in range(12)}
    for key, data in old.items():
        await put(backend, key, data)
    await put(backend, "tenants/acme/ns/a/rewritten.bin", b"first")
    await put(backend, "tenants/other/ns/a/old.bin", b"another tenant's")
    await asyncio.sleep(1.1 if backend.protocol == "s3" else 0.05)  # S3 dates to the second
    bound = time.time()
    await asyncio.sleep(1.1 if backend.protocol == "s3" else 0.05)
    new = {f"tenants/acme/ns/{d}/new-{i}.bin": b"n" * i for d in ("a", "c") for i in range(5)}
    for key, data in new.items():
        await put(backend, key, data)
    await put(backend, "tenants/acme/ns/a/rewritten.bin", b"second")  # now recent
    now = time.time()
    counters = Usage(backend)

    report = await purge(backend, counters, tenant_scope("acme"), "", now - bound, now=now)

    assert (report.deleted, report.bytes, report.kept) == (len(old), sum(map(len, old.values())), 0)
    left = set(await names(backend, "tenants/acme", recursive=True))
    assert left == {*new, "tenants/acme/ns/a/rewritten.bin"}
    assert await get(backend, "tenants/acme/ns/a/rewritten.bin") == b"second"
    assert await names(backend, "tenants/other", recursive=True) == ["tenants/other/ns/a/old.bin"]
    assert counters._pending["acme"] == [-report.bytes, -report.deleted]


@on_backends
async def test_purge_with_a_prefix_or_a_dry_run_touches_nothing_else(backend: Backend) -> None:
    for key in ("x/1", "x/2", "y/1"):
        await put(backend, f"tenants/acme/{key}", b"data")
    scope, counters = tenant_scope("acme"), Usage(backend)
    later = time.time() + 3600

    dry = await purge(backend, counters, scope, "x", 60, dry_run=True, now=later)
    assert (dry.deleted, dry.bytes, dry.dry_run) == (2, 8, True)
    assert len(await names(backend, "tenants/acme", recursive=True)) == 3

    done = await purge(backend, counters, scope, "x", 60, now=later)
    assert (done.deleted, done.bytes) == (2, 8)
    assert await names(backend, "tenants/acme", recursive=True) == ["tenants/acme/y/1"]


# -- a tenant and its data (every backend) ---------------------------------------------------


@pytest_asyncio.fixture(loop_scope="session")
async def registry(backend: Backend) -> AsyncIterator[Registry]:
    found = Registry(backend)
    await found.start()
    try:
        yield found
    finally:
        await found.close()


@on_backends
async def test_tenant_purge_leaves_no_object_under_its_prefix(
    backend: Backend, registry: Registry, seed: Seeder, small_pages: None
) -> None:
    await registry.create_tenant("acme", "Acme")
    await registry.create_tenant("other", "Other")
    await registry.create_user("alice", "alice password")
    await registry.grant("acme", "user", "alice", "ADMIN")
    await registry.grant("other", "user", "alice", "VIEWER")
    await seed({f"tenants/acme/ns{i % 3}/f{i}.bin": b"%d" % i for i in range(110)})
    await seed({"tenants/other/kept.bin": b"kept", "tenants/acme-2/kept.bin": b"kept"})
    counters = Usage(backend)
    await counters.recompute("acme")

    report = await purge_tenant(backend, registry, counters, "acme")

    assert report.deleted == 110
    assert report.bytes == sum(len(b"%d" % i) for i in range(110))
    with pytest.raises(FileNotFoundError):
        await backend.list("tenants/acme", recursive=True)
    assert sorted(await names(backend, "tenants", recursive=True)) == [
        "tenants/acme-2/kept.bin",
        "tenants/other/kept.bin",
    ]
    assert "acme" not in registry.snapshot.tenants
    assert registry.snapshot.role("acme", "user", "alice") is None
    assert registry.snapshot.role("other", "user", "alice") == "VIEWER"
    assert not await backend.exists(usage.folder("acme"))
    # Run again (an interrupted purge is finished so): nothing left to do, no error.
    again = await purge_tenant(backend, registry, counters, "acme")
    assert (again.deleted, again.bytes) == (0, 0)


# -- moving the default tenant's data: roles, conflicts, refusals (every backend) -------------


@on_backends
async def test_migration_grants_roles_moves_dedupes_and_leaves_conflicts_at_the_root(
    backend: Backend, registry: Registry
) -> None:
    long_key = "/".join(["x" * 250] * 4) + "/long.txt"  # fits at the root, not in tenants/acme/
    root = {"a.txt": b"a", "ns/b.txt": b"b", "ns/conflict.txt": b"mine", "dup.txt": b"same",
            long_key: b"long"}  # fmt: skip
    for key, data in root.items():
        await put(backend, key, data)
    await put(backend, "tenants/acme/ns/conflict.txt", b"theirs")
    await put(backend, "tenants/acme/dup.txt", b"same")
    await registry.create_tenant("acme", "Acme")
    for name in ("alice", "bob"):
        await registry.create_user(name, f"{name} password")
    await registry.grant(None, "user", "alice", "EDITOR")
    await registry.grant(None, "user", "bob", "VIEWER")
    await registry.grant("acme", "user", "bob", "ADMIN")
    counters = Usage(backend)

    seen: list[str] = []
    dry = await migrate_default_tenant(
        backend, registry, counters, "acme", dry_run=True, on_key=lambda k, o: seen.append(k)
    )
    assert (dry.moved, dry.refused, dry.granted) == (4, [long_key], ["user/alice=EDITOR"])
    assert sorted(seen) == sorted(k for k in root if k != long_key)
    assert await get(backend, "a.txt") == b"a"  # a dry run moves nothing
    assert registry.snapshot.role("acme", "user", "alice") is None

    report = await migrate_default_tenant(backend, registry, counters, "acme")
    assert (report.moved, report.deduplicated) == (2, 1)
    assert (report.conflicts, report.refused) == (["ns/conflict.txt"], [long_key])
    assert registry.snapshot.role("acme", "user", "alice") == "EDITOR"
    assert registry.snapshot.role("acme", "user", "bob") == "ADMIN"  # kept, not lowered
    assert await get(backend, "tenants/acme/a.txt") == b"a"
    assert await get(backend, "tenants/acme/ns/b.txt") == b"b"
    assert await get(backend, "tenants/acme/ns/conflict.txt") == b"theirs"
    left = {n for n in await names(backend, "", recursive=True) if not n.startswith(".gateway")}
    assert left == {
        "ns/conflict.txt", long_key, "tenants/acme/a.txt", "tenants/acme/ns/b.txt",
        "tenants/acme/ns/conflict.txt", "tenants/acme/dup.txt",
    }  # fmt: skip
    again = await migrate_default_tenant(backend, registry, counters, "acme")
    assert again.nothing_to_do and again.conflicts == ["ns/conflict.txt"]


# -- usage counters ----------------------------------------------------------------------------


@on_backends
async def test_usage_adds_up_the_counters_of_every_process_until_a_recompute(
    local_backend: Backend,
) -> None:
    await put(local_backend, "tenants/acme/a", b"12345")
    first, second, reader = Usage(local_backend), Usage(local_backend), Usage(local_backend)
    assert (await reader.read("acme")).to_json() == {"bytes": 5, "objects": 1}  # counted once
    first.add("acme", 100, 2)
    second.add("acme", 20, 1)
    second.add("acme", -5, -1)
    await first.flush()
    await second.flush()
    assert (await reader.read("acme")).to_json() == {"bytes": 120, "objects": 3}
    # A recompute lists the tenant: the truth, whatever the counters said; they start anew.
    assert (await reader.recompute("acme")).to_json() == {"bytes": 5, "objects": 1}
    first.add("acme", 7, 1)
    await first.flush()
    assert (await second.read("acme")).to_json() == {"bytes": 12, "objects": 2}


# -- over HTTP: quotas, usage, purge routes ----------------------------------------------------


ROOT = basic("root", "root password")


@pytest.fixture
async def client(
    tmp_path: Path, aiohttp_client: Callable[[web.Application], Awaitable[Client]]
) -> Client:
    values: dict[str, Any] = {
        "storage.type": "local",
        "storage.local.base-path": str(tmp_path / "data"),
        "tenants.enabled": True,
        "tenants.ids": ["acme", "other"],
        "auth.cache-seconds": 0.1,
        "admin.username": "root",
        "admin.password": "root password",
        "admin.password-file": str(tmp_path / "admin.txt"),
    }
    client = await aiohttp_client(create_app(config.check(values)))
    for name, tenant, role in (("ann", "acme", "ADMIN"), ("ed", "acme", "EDITOR"),
                               ("olga", "other", "ADMIN")):  # fmt: skip
        response = await client.post(
            "/api/v1/users", json={"username": name, "password": f"{name} password"}, headers=ROOT
        )
        assert response.status == 201
        response = await client.put(
            "/api/v1/bindings",
            json={"tenant": tenant, "kind": "user", "subject": name, "role": role},
            headers=ROOT,
        )
        assert response.status == 200
    return client


def user(name: str) -> dict[str, str]:
    return basic(name, f"{name} password")


async def test_a_quota_stops_an_upload_that_would_cross_it_and_keeps_what_is_stored(
    client: Client, tmp_path: Path
) -> None:
    ann = user("ann")
    response = await client.put(
        "/api/v1/tenants/acme", json={"quota": {"maxBytes": 100}}, headers=ann
    )
    assert response.status == 403  # a tenant's ADMIN does not set its quota
    response = await client.put(
        "/api/v1/tenants/acme",
        json={"quota": {"maxBytes": 100, "maxObjectSize": 80}},
        headers=ROOT,
    )
    assert response.status == 200
    assert (await response.json())["quota"] == {"maxBytes": 100, "maxObjectSize": 80}
    assert (await client.put("/api/v1/acme/files/kept", data=b"k" * 60, headers=ann)).status == 201

    response = await client.put("/api/v1/acme/files/big", data=b"b" * 81, headers=ann)
    assert response.status == 413
    assert "maxObjectSize" in (await response.json())["message"]
    response = await client.put("/api/v1/acme/files/more", data=b"m" * 41, headers=ann)
    assert response.status == 507
    body = await response.json()
    assert body["error"] == "insufficient_storage" and "maxBytes" in body["message"]

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: counted as it streams
        for _ in range(5):
            yield b"c" * 10

    response = await client.put("/api/v1/acme/files/streamed", data=chunked(), headers=ann)
    assert response.status == 507
    # Replacing an object counts only the difference; the limit is reached, not crossed.
    response = await client.put("/api/v1/acme/files/kept", data=b"K" * 80, headers=ann)
    assert response.status == 201
    response = await client.put("/api/v1/acme/files/more", data=b"m" * 20, headers=ann)
    assert response.status == 201
    # What was stored is intact; nothing of the refused uploads was.
    assert await (await client.get("/api/v1/acme/files/kept", headers=ann)).read() == b"K" * 80
    for refused in ("big", "streamed"):
        assert (await client.get(f"/api/v1/acme/files/{refused}", headers=ann)).status == 404
    stored = sorted(p.name for p in (tmp_path / "data/tenants/acme").iterdir())
    assert stored == ["kept", "more"]
    response = await client.get("/api/v1/acme/usage", headers=ann)
    assert response.status == 200
    assert await response.json() == {
        "tenant": "acme",
        "bytes": 100,
        "objects": 2,
        "quota": {"maxBytes": 100, "maxObjectSize": 80},
    }
    # Another tenant has no quota.
    response = await client.put("/api/v1/other/files/x", data=b"x" * 500, headers=user("olga"))
    assert response.status == 201


async def test_usage_and_purge_routes_are_for_the_tenant_admin_and_super_admins(
    client: Client,
) -> None:
    for path in ("/api/v1/acme/files/a", "/api/v1/acme/files/b/c"):
        assert (await client.put(path, data=b"abc", headers=user("ed"))).status == 201
    assert (await client.delete("/api/v1/acme/files/a", headers=user("ed"))).status == 204
    for who in (user("ed"), user("olga")):
        assert (await client.get("/api/v1/acme/usage", headers=who)).status == 403
        response = await client.post("/api/v1/acme/purge", json={"olderThan": "1s"}, headers=who)
        assert response.status == 403
        assert (await response.json())["message"] == "no access to this tenant"
    response = await client.get("/api/v1/acme/usage", headers=ROOT)
    assert (await response.json())["objects"] == 1
    response = await client.post("/api/v1/acme/purge", json={"olderThan": "soon"}, headers=ROOT)
    assert response.status == 400
    response = await client.post(
        "/api/v1/acme/purge", json={"olderThan": "1d", "dryRun": True}, headers=user("ann")
    )
    assert await response.json() == {"deleted": 0, "bytes": 0, "kept": 0, "dryRun": True}
    await asyncio.sleep(1.05)
    response = await client.post("/api/v1/acme/purge", json={"olderThan": 1}, headers=user("ann"))
    assert await response.json() == {"deleted": 1, "bytes": 3, "kept": 0, "dryRun": False}
    response = await client.get("/api/v1/acme/usage", headers=user("ann"))
    assert (await response.json())["objects"] == 0
    audit = await client.get("/api/v1/tenants/acme/audit", headers=ROOT)
    actions = [r["action"] for r in (await audit.json())["records"]]
    assert "files.purge" in actions


async def test_tenant_purge_route_needs_a_super_admin_and_the_confirmation(
    client: Client, tmp_path: Path
) -> None:
    await client.put("/api/v1/acme/files/ns/f", data=b"data", headers=user("ann"))
    response = await client.post(
        "/api/v1/tenants/acme/purge", json={"confirm": "acme"}, headers=user("ann")
    )
    assert response.status == 403
    response = await client.post("/api/v1/tenants/acme/purge", json={}, headers=ROOT)
    assert response.status == 400 and "confirm" in (await response.json())["message"]
    response = await client.post(
        "/api/v1/tenants/acme/purge", json={"confirm": "acme"}, headers=ROOT
    )
    assert response.status == 200
    assert await response.json() == {"tenant": "acme", "deleted": 1, "bytes": 4}
    assert not (tmp_path / "data/tenants/acme").exists()
    assert (await client.get("/api/v1/tenants/acme", headers=ROOT)).status == 404
    assert (await client.get("/api/v1/acme/files/ns/f", headers=user("ann"))).status == 403


# -- the CLI -----------------------------------------------------------------------------------


def test_cli_quota_usage_purge_and_tenant_purge(tmp_path: Path) -> None:
    base = tmp_path / "data"
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(
        f"storage:\n  type: local\n  local:\n    base-path: {json.dumps(str(base))}\n"
        "tenants:\n  enabled: true\n",
        encoding="utf-8",
    )

    def gateway(*args: str, input: str | None = None) -> Any:
        return CliRunner().invoke(main, [*args, "-c", str(cfg)], input=input)

    assert gateway("tenants", "create", "--tenant", "acme").exit_code == 0
    result = gateway("tenants", "update", "--tenant", "acme", "--max-bytes", "1KiB")
    assert result.exit_code == 0, result.output
    (base / "tenants/acme/ns").mkdir(parents=True)
    (base / "tenants/acme/ns/a.bin").write_bytes(b"a" * 10)
    (base / "tenants/acme/ns/b.bin").write_bytes(b"b" * 20)
    result = gateway("tenants", "usage", "--tenant", "acme", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == [
        {"tenant": "acme", "bytes": 30, "objects": 2, "maxBytes": 1024, "maxObjectSize": None}
    ]
    result = gateway("purge", "--tenant", "acme", "--older-than", "1h", "--dry-run")
    assert result.output.startswith("would delete 0 file(s)"), result.output
    result = gateway("purge", "--tenant", "acme", "--prefix", "ns", "--older-than", "1h")
    assert result.output.startswith("deleted 0 file(s) (0 bytes) of tenant acme"), result.output
    result = gateway("purge", "--tenant", "acme", "--prefix", "../x", "--older-than", "1d")
    assert result.exit_code == 1 and "dot" in result.output
    result = gateway("tenants", "delete", "--tenant", "acme", "--purge", input="n\n")
    assert result.exit_code == 1 and (base / "tenants/acme/ns/a.bin").exists()
    result = gateway("tenants", "delete", "--tenant", "acme", "--purge", "--yes")
    assert result.exit_code == 0, result.output
    assert "2 object(s), 30 bytes deleted" in result.output
    assert not (base / "tenants/acme").exists()
    assert "acme" not in gateway("tenants", "list").output
    # Both commands are in the tenant's audit log (kept: it records the purge).
    records = [
        json.loads(line)
        for path in (base / ".gateway/audit/acme").iterdir()
        for line in path.read_text().splitlines()
    ]
    assert {(r["action"], r["key"]) for r in records} == {
        ("files.purge", "ns"),
        ("tenant.purge", "acme"),
    }


# -- usage with several worker processes -------------------------------------------------------


@pytest.mark.slow
def test_usage_stays_exact_with_two_worker_processes(tmp_path: Path) -> None:
    import urllib.request

    from tests.support.gateway_process import GatewayProcess

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def call(gateway: GatewayProcess, method: str, path: str, data: bytes | None = None) -> Any:
        assert gateway.url is not None
        request = urllib.request.Request(gateway.url + path, data=data, method=method)
        with opener.open(request, timeout=30) as response:  # one connection per request
            return response.status, response.read()

    base = tmp_path / "data"
    settings = {
        "storage.type": "local",
        "storage.local.base-path": str(base),
        "auth.enabled": False,
        "tenants": {"enabled": True, "ids": ["t1"]},
    }
    with GatewayProcess(settings, args=["--workers", "2"]) as gateway:
        from tests.test_workers import _workers

        _workers(gateway)  # both listening, so that both take connections
        # The first reading counts the (empty) tenant once: from then on, only counters.
        assert json.loads(call(gateway, "GET", "/api/v1/t1/usage")[1])["objects"] == 0
        for i in range(40):
            assert call(gateway, "PUT", f"/api/v1/t1/files/k{i}", b"x" * i)[0] == 201
        for i in range(10):  # overwrites count the difference
            assert call(gateway, "PUT", f"/api/v1/t1/files/k{i}", b"y" * 100)[0] == 201
        for i in range(30, 40):
            assert call(gateway, "DELETE", f"/api/v1/t1/files/k{i}")[0] == 204
        expected = {"bytes": 10 * 100 + sum(range(10, 30)), "objects": 30}
        deadline = time.monotonic() + 10
        while True:
            found = json.loads(call(gateway, "GET", "/api/v1/t1/usage")[1])
            if {k: found[k] for k in expected} == expected or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        log = gateway.log_text()
    assert {k: found[k] for k in expected} == expected, log[-3000:]
    writers = [p.name for p in (base / ".gateway/usage/t1").iterdir() if p.name.startswith("p-")]
    assert len(writers) == 2, (writers, log[-3000:])  # both counted, each in its own document


async def test_a_read_during_a_flush_counts_the_change_being_written() -> None:
    """A flush writes this process's document while a read lists the counters: the change
    must be counted once, whether the read sees it as written or as pending."""
    from backends.memory import MemoryBackend

    class SlowCounterWrites(MemoryBackend):
        def __init__(self) -> None:
            super().__init__()
            self.writing = asyncio.Event()
            self.release = asyncio.Event()

        async def write(self, key: str, chunks: Any, **options: Any) -> Any:
            if "/p-" in key:
                self.writing.set()
                await self.release.wait()
            return await super().write(key, chunks, **options)

    backend = SlowCounterWrites()
    await backend.start()
    counters = usage.Usage(backend)
    assert await counters.read("acme") == usage.Totals(0, 0)  # counted: an empty tenant
    counters.add("acme", 3, 1)
    flushing = asyncio.create_task(counters.flush())
    await backend.writing.wait()  # the flush is writing its document now
    assert await counters.read("acme") == usage.Totals(3, 1)
    backend.release.set()
    await flushing
    assert await counters.read("acme") == usage.Totals(3, 1)
    counters.add("acme", -3, -1)
    backend.release.clear()
    backend.writing.clear()
    flushing = asyncio.create_task(counters.flush())
    await backend.writing.wait()
    backend.release.set()
    await flushing
    assert await counters.read("acme") == usage.Totals(0, 0)

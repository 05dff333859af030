"""Metrics at /metrics, JSON access logs, the per-tenant audit log and its access rules."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway import config
from gateway.app import create_app
from gateway.audit import AuditLog
from gateway.observability import AUDIT, BadRequestLogFilter
from gateway.registry import Registry
from gateway.state import REGISTRY
from tests.support.auth import basic

Client = TestClient[web.Request, web.Application]
ROOT_PASSWORD = "root password for observability"


ROOT = basic("root", ROOT_PASSWORD)
PASSWORDS = {name: f"{name}-secret-pw-1234" for name in ("alice", "bob", "eve")}
ALICE = basic("alice", PASSWORDS["alice"])  # ADMIN of acme
BOB = basic("bob", PASSWORDS["bob"])  # ADMIN of other
EVE = basic("eve", PASSWORDS["eve"])  # VIEWER of acme


@pytest.fixture
async def client(
    tmp_path: Path, aiohttp_client: Callable[[web.Application], Awaitable[Client]]
) -> Client:
    values: dict[str, Any] = {
        "storage.type": "local",
        "storage.local.base-path": str(tmp_path / "data"),
        "tenants.enabled": True,
        "tenants.default-tenant": True,
        "admin.username": "root",
        "admin.password": ROOT_PASSWORD,
        "admin.password-file": str(tmp_path / "admin.txt"),
    }
    client = await aiohttp_client(create_app(config.check(values)))
    registry: Registry = client.app[REGISTRY]
    for tenant in ("acme", "other"):
        await registry.create_tenant(tenant, tenant)
    for name, password in PASSWORDS.items():
        await registry.create_user(name, password)
    await registry.grant("acme", "user", "alice", "ADMIN")
    await registry.grant(None, "user", "alice", "ADMIN")
    await registry.grant("other", "user", "bob", "ADMIN")
    await registry.grant("acme", "user", "eve", "VIEWER")
    return client


def _samples(text: str, name: str) -> dict[frozenset[tuple[str, str]], float]:
    """Given a text exposition, return the samples of ``name`` by their label set."""
    found: dict[frozenset[tuple[str, str]], float] = {}
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if match:
            labels = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(1)))
            found[labels] = float(match.group(2))
    return found


async def _metrics(client: Client) -> str:
    response = await client.get("/metrics", headers=ROOT)
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    return await response.text()


# -- metrics -----------------------------------------------------------------------------------


async def test_metrics_count_requests_and_bytes_per_tenant(client: Client) -> None:
    body = b"x" * 1234
    for _ in range(2):
        response = await client.put("/api/v1/acme/files/a.bin", data=body, headers=ALICE)
        assert response.status == 201
    response = await client.get("/api/v1/acme/files/a.bin", headers=ALICE)
    assert await response.read() == body
    assert (await client.put("/api/v1/other/files/b", data=b"y", headers=ALICE)).status == 403

    text = await _metrics(client)
    requests = _samples(text, "gateway_requests_total")
    put = {("tenant", "acme"), ("route", "files"), ("method", "PUT"), ("status", "201")}
    assert requests[frozenset(put)] == 2
    get = {("tenant", "acme"), ("route", "files"), ("method", "GET"), ("status", "200")}
    assert requests[frozenset(get)] == 1
    refused = {("tenant", "other"), ("route", "files"), ("method", "PUT"), ("status", "403")}
    assert requests[frozenset(refused)] == 1
    received = _samples(text, "gateway_bytes_received_total")
    assert received[frozenset({("tenant", "acme"), ("route", "files")})] == 2 * len(body)
    sent = _samples(text, "gateway_bytes_sent_total")
    assert sent[frozenset({("tenant", "acme"), ("route", "files")})] >= len(body)
    buckets = _samples(text, "gateway_request_duration_seconds_count")
    labels = {("tenant", "acme"), ("route", "files"), ("method", "PUT")}
    assert buckets[frozenset(labels)] == 2


def _value(text: str, name: str) -> float:
    """Given a text exposition, return the value of the unlabelled sample ``name``."""
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match is not None, f"no {name} in the exposition"
    return float(match.group(1))


async def test_metrics_count_the_journals_batches_of_small_writes(client: Client) -> None:
    before = await _metrics(client)
    records = _value(before, "gateway_journal_records_total")
    answers = await asyncio.gather(
        *(client.put(f"/api/v1/acme/files/j{n}", data=b"small", headers=ALICE) for n in range(8))
    )
    assert [a.status for a in answers] == [201] * 8
    after = await _metrics(client)
    # Each upload is a record (its body, or a marker for one flushed with a new directory),
    # and so is each audit document made; several share a batch.
    assert _value(after, "gateway_journal_records_total") - records >= 8
    batches = _value(after, "gateway_journal_batches_total")
    assert 1 <= batches <= _value(after, "gateway_journal_records_total")
    assert _value(after, "gateway_journal_checkpoints_total") == 0  # (no move, no full segment)


async def test_hostile_tenant_segments_add_no_label_values(client: Client) -> None:
    await client.get("/api/v1/acme/stats", headers=ALICE)  # a known tenant, for comparison
    for hostile in ("nosuch", "x" * 300, "evil%0Aname", "a%22b", "UPPER"):
        response = await client.put(f"/api/v1/{hostile}/files/k", data=b"z", headers=ALICE)
        assert response.status in (400, 403, 404)
        await client.get(f"/api/v1/tenants/{hostile}/audit", headers=ALICE)
    await client.request("BREW", "/api/v1/acme/files/k", headers=ALICE)
    text = await _metrics(client)
    tenants = {dict(labels)["tenant"] for labels in _samples(text, "gateway_requests_total")}
    assert tenants <= {"", "-", "acme"}, tenants
    assert "-" in tenants
    methods = {dict(labels)["method"] for labels in _samples(text, "gateway_requests_total")}
    assert "BREW" not in methods
    assert "nosuch" not in text


async def test_metrics_need_a_super_admin_when_auth_is_on(client: Client) -> None:
    assert (await client.get("/metrics")).status == 401
    assert (await client.get("/metrics", headers=ALICE)).status == 403
    assert (await client.get("/metrics", headers=ROOT)).status == 200


async def test_each_application_has_its_own_registry(
    aiohttp_client: Callable[[web.Application], Awaitable[Client]],
) -> None:
    values: dict[str, Any] = {"storage.type": "memory", "auth.enabled": False}
    first = await aiohttp_client(create_app(config.check(values)))
    second = await aiohttp_client(create_app(config.check(values)))
    await first.get("/health/live")
    await first.get("/health/live")
    await second.get("/health/live")
    for client, expected in ((first, 2), (second, 1)):
        text = await (await client.get("/metrics")).text()
        samples = _samples(text, "gateway_requests_total")
        live = {("tenant", ""), ("route", "/health/live"), ("method", "GET"), ("status", "200")}
        assert samples[frozenset(live)] == expected


# -- access log --------------------------------------------------------------------------------


async def test_access_log_is_json_with_tenant_and_identity_and_no_secrets(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    token, plaintext = await client.app[REGISTRY].create_token(
        await _account(client), description="t"
    )
    await client.app[REGISTRY].grant("acme", "service-account", "worker", "EDITOR")
    with caplog.at_level(logging.INFO, logger="gateway.access"):
        assert (await client.put("/api/v1/acme/files/k", data=b"1", headers=ALICE)).status == 201
        bearer = {"Authorization": f"Bearer {plaintext}"}
        assert (await client.get("/api/v1/acme/files/k", headers=bearer)).status == 200
        wrong = basic("alice", "not-alices-password-99")
        assert (await client.get("/api/v1/acme/files/k", headers=wrong)).status == 401
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.access"]
    assert len(lines) == 3
    entries = [json.loads(line) for line in lines]
    put, get, refused = entries
    assert put["tenant"] == "acme" and put["route"] == "files" and put["method"] == "PUT"
    assert put["status"] == 201 and put["bytes_in"] == 1
    assert put["identity"] == {"kind": "user", "name": "alice"}
    assert get["identity"] == {"kind": "service-account", "name": "worker"}
    assert get["bytes_out"] == 1
    assert refused["status"] == 401 and refused["identity"] is None
    assert all(isinstance(entry["duration_ms"], float) for entry in entries)
    everything = "\n".join(caplog.text.splitlines() + lines)
    for secret in (PASSWORDS["alice"], "not-alices-password-99", plaintext, token.id + "_"):
        assert secret not in everything
    for header in (ALICE, bearer, wrong):
        assert header["Authorization"].split(" ", 1)[1] not in everything


async def _account(client: Client) -> str:
    await client.app[REGISTRY].create_service_account("worker")
    return "worker"


def test_bad_request_errors_become_one_warning_line() -> None:
    from aiohttp.http_exceptions import BadHttpMessage

    try:
        raise BadHttpMessage("Invalid header value char: Authorization: secret")
    except BadHttpMessage as exc:
        error = exc
    record = logging.LogRecord(
        "aiohttp.server",
        logging.ERROR,
        __file__,
        1,
        "Error handling request from %s",
        ("10.0.0.1",),
        (type(error), error, error.__traceback__),
    )
    assert BadRequestLogFilter().filter(record)
    assert record.levelno == logging.WARNING and record.exc_info is None
    assert "10.0.0.1" in record.getMessage() and "BadHttpMessage" in record.getMessage()
    assert "secret" not in record.getMessage()
    other = logging.LogRecord(
        "aiohttp.server", logging.ERROR, __file__, 1, "Unhandled", (), (None, None, None)
    )
    assert BadRequestLogFilter().filter(other) and other.levelno == logging.ERROR


async def test_a_malformed_request_logs_one_warning_without_traceback(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    import asyncio

    assert client.server.port is not None
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    try:
        with caplog.at_level(logging.DEBUG, logger="aiohttp.server"):
            # a first good request, so the bad one is not the connection's first line
            writer.write(b"GET /health/live HTTP/1.1\r\nHost: a\r\n\r\n")
            writer.write(b"GET /health/live HTTP/1.1\r\nHost: a\r\nX-Bad\x01: secret-value\r\n\r\n")
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(), 5.0)
    finally:
        writer.close()
    assert b" 400 " in answer
    server = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert server, "aiohttp logged nothing about the malformed request"
    assert all(r.levelno <= logging.WARNING and r.exc_info is None for r in server)
    assert any(r.levelno == logging.WARNING for r in server)
    assert "secret-value" not in caplog.text and "Traceback" not in caplog.text


# -- audit -------------------------------------------------------------------------------------


async def _records(client: Client, path: str, headers: dict[str, str]) -> list[dict[str, Any]]:
    response = await client.get(path, headers=headers)
    assert response.status == 200, await response.text()
    records: list[dict[str, Any]] = (await response.json())["records"]
    return records


async def test_tenant_admin_reads_its_audit_log_with_who_what_and_result(client: Client) -> None:
    assert (
        await client.put("/api/v1/acme/files/dir/a.txt", data=b"a", headers=ALICE)
    ).status == 201
    response = await client.put(
        "/api/v1/acme/files/dir/a.txt", data=b"b", headers={**ALICE, "If-None-Match": "*"}
    )
    assert response.status == 412
    assert (await client.delete("/api/v1/acme/files/dir/a.txt", headers=ALICE)).status == 204
    assert (await client.post("/api/v1/acme/directories/d", headers=ALICE)).status == 201
    moved = await client.post("/api/v1/acme/move", json={"from": "d", "to": "e"}, headers=ALICE)
    assert moved.status == 200
    assert (await client.put("/api/v1/acme/files/no.txt", data=b"x", headers=EVE)).status == 403
    assert (await client.get("/api/v1/acme/files/e", headers=ALICE)).status in (404, 409)

    records = await _records(client, "/api/v1/tenants/acme/audit", ALICE)
    summary = [(r["action"], r["key"], r["status"], r["identity"]["name"]) for r in records]
    assert summary == [
        ("file.write", "dir/a.txt", 201, "alice"),
        ("file.write", "dir/a.txt", 412, "alice"),
        ("file.delete", "dir/a.txt", 204, "alice"),
        ("directory.create", "d", 201, "alice"),
        ("file.move", "d -> e", 200, "alice"),
    ]  # eve's refused PUT and alice's GET are not mutations that passed authorization
    assert all(r["tenant"] == "acme" for r in records)
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", r["time"]) for r in records)
    assert records[0]["identity"] == {"kind": "user", "name": "alice"}


async def test_other_tenants_admin_gets_the_403_of_a_nonexistent_tenant(client: Client) -> None:
    assert (await client.put("/api/v1/acme/files/a", data=b"a", headers=ALICE)).status == 201
    refused = await client.get("/api/v1/tenants/acme/audit", headers=BOB)
    missing = await client.get("/api/v1/tenants/nosuch/audit", headers=BOB)
    assert refused.status == missing.status == 403
    assert await refused.read() == await missing.read()
    # a VIEWER of acme is refused too; the super admin reads it; bob reads his own
    assert (await client.get("/api/v1/tenants/acme/audit", headers=EVE)).status == 403
    assert (await client.get("/api/v1/tenants/acme/audit")).status == 401
    records = await _records(client, "/api/v1/tenants/acme/audit", ROOT)
    assert [(r["action"], r["key"]) for r in records] == [("file.write", "a")]
    assert await _records(client, "/api/v1/tenants/other/audit", BOB) == []
    assert (await client.get("/api/v1/tenants/nosuch/audit", headers=ROOT)).status == 404


async def test_null_tenant_audit_and_admin_mutations(client: Client) -> None:
    assert (await client.put("/api/v1/files/top.txt", data=b"t", headers=ALICE)).status == 201
    assert [r["key"] for r in await _records(client, "/api/v1/audit", ALICE)] == ["top.txt"]
    assert [r["tenant"] for r in await _records(client, "/api/v1/audit", ROOT)] == [None]
    assert (await client.get("/api/v1/audit", headers=BOB)).status == 403
    # admin mutations on a tenant land in its log, refused ones do not
    grant = {"tenant": "acme", "kind": "user", "subject": "bob", "role": "VIEWER"}
    assert (await client.put("/api/v1/bindings", json=grant, headers=EVE)).status == 403
    assert (await client.put("/api/v1/bindings", json=grant, headers=ALICE)).status == 200
    rename = await client.put("/api/v1/tenants/acme", json={"name": "ACME"}, headers=ALICE)
    assert rename.status == 200
    records = await _records(client, "/api/v1/tenants/acme/audit", ALICE)
    assert [(r["action"], r["key"], r["status"]) for r in records] == [
        ("binding.grant:VIEWER", "user/bob", 200),
        ("tenant.update", "acme", 200),
    ]
    # nothing for bob's own tenant, nothing for users (they belong to no tenant)
    assert await _records(client, "/api/v1/tenants/other/audit", BOB) == []


async def test_audit_pages_and_cursor(client: Client) -> None:
    for index in range(5):
        response = await client.put(f"/api/v1/acme/files/f{index}", data=b"x", headers=ALICE)
        assert response.status == 201
    keys: list[str] = []
    cursor = None
    while True:
        query = "?limit=2" + (f"&cursor={cursor}" if cursor else "")
        response = await client.get(f"/api/v1/tenants/acme/audit{query}", headers=ALICE)
        page = await response.json()
        assert len(page["records"]) <= 2
        keys += [r["key"] for r in page["records"]]
        cursor = page["cursor"]
        if cursor is None:
            break
    assert keys == [f"f{index}" for index in range(5)]
    for bad in ("?limit=0", "?limit=abc", "?cursor=../../x"):
        response = await client.get(f"/api/v1/tenants/acme/audit{bad}", headers=ALICE)
        assert response.status == 400, bad


async def test_audit_records_live_under_the_system_prefix_and_shutdown_flushes(
    client: Client, tmp_path: Path
) -> None:
    assert (await client.put("/api/v1/acme/files/k", data=b"x", headers=ALICE)).status == 201
    audit: AuditLog = client.app[AUDIT]
    assert await audit.flush(5.0)
    folder = tmp_path / "data" / ".gateway" / "audit" / "acme"
    files = list(folder.iterdir())
    assert len(files) == 1 and re.fullmatch(r"\d{20}-[0-9a-f]{12}\.json", files[0].name)
    assert json.loads(files[0].read_text())["key"] == "k"
    # the tenant cannot see nor reach the system prefix
    listing = await client.get("/api/v1/files/.gateway/audit/acme/x", headers=ALICE)
    assert listing.status == 400
    assert audit.pending == 0


async def test_openapi_lists_the_new_routes(client: Client) -> None:
    paths = (await (await client.get("/openapi.json")).json())["paths"]
    assert "get" in paths["/api/v1/tenants/{tenant}/audit"]
    assert "get" in paths["/api/v1/audit"]
    assert "get" in paths["/metrics"]


async def test_audit_batches_a_burst_and_pages_through_it_without_loss() -> None:
    from backends.memory import MemoryBackend
    from gateway.audit import AUDIT_PREFIX, AuditLog

    backend = MemoryBackend()
    await backend.start()
    audit = AuditLog(backend)
    futures = [
        audit.submit("acme", {"action": "file.write", "key": f"k{i:03d}"}, 1_000_000 + i)
        for i in range(2500)
    ]
    assert all(f is not None for f in futures)
    assert await audit.flush()
    assert all(f is not None and f.result() for f in futures)
    documents = (await backend.list(AUDIT_PREFIX, recursive=True)).entries
    assert 1 <= len(documents) < 100  # a burst costs a few writes, not one per record
    keys: list[str] = []
    cursor = None
    while True:
        records, cursor = await audit.read("acme", limit=333, cursor=cursor)
        assert len(records) <= 333
        keys += [r["key"] for r in records]
        if cursor is None:
            break
    assert keys == [f"k{i:03d}" for i in range(2500)]
    assert audit.dropped == 0


async def test_audit_writes_one_document_per_tenant_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Group commit: the records that arrive while a tenant's document is being written wait,
    # and go out together in its next one; another tenant's do not wait for it.
    from backends.memory import MemoryBackend
    from gateway.audit import AUDIT_PREFIX, AuditLog

    backend = MemoryBackend()
    await backend.start()
    gate = asyncio.Event()
    started: list[str] = []
    write = backend.write

    async def slow_write(key: str, chunks: Any, **options: Any) -> Any:
        started.append(key.split("/")[2])
        await gate.wait()
        return await write(key, chunks, **options)

    monkeypatch.setattr(backend, "write", slow_write)
    audit = AuditLog(backend)
    first = audit.submit("acme", {"action": "file.write", "key": "k0"}, 1_000)
    await asyncio.sleep(0.01)  # acme's first document is being written
    rest = [
        audit.submit("acme", {"action": "file.write", "key": f"k{i}"}, 1_001 + i)
        for i in range(1, 50)
    ]
    other = audit.submit("globex", {"action": "file.write", "key": "g"}, 2_000)
    await asyncio.sleep(0.01)
    assert started == ["acme", "globex"]  # the 49 wait for acme's document in flight
    gate.set()
    assert await audit.flush()
    assert all(f is not None and f.result() for f in [first, *rest, other])
    assert started == ["acme", "globex", "acme"]
    documents = (await backend.list(f"{AUDIT_PREFIX}/acme")).entries
    assert len(documents) == 2
    records, _ = await audit.read("acme", limit=100)
    assert [r["key"] for r in records] == [f"k{i}" for i in range(50)]


def test_served_gateway_writes_one_access_line_per_request_on_stderr() -> None:
    """``gateway serve`` writes access lines straight into its batch (no logging record):
    each request still gets one complete JSON line, flushed within the batch delay."""
    import time
    import urllib.error
    import urllib.request

    from tests.support.gateway_process import GatewayProcess

    with GatewayProcess({"storage": {"type": "memory"}, "auth": {"enabled": False}}) as gateway:
        assert gateway.url is not None
        for number in range(3):
            request = urllib.request.Request(
                f"{gateway.url}/api/v1/files/ns/k{number}", data=b"x" * number, method="PUT"
            )
            with urllib.request.urlopen(request) as answer:
                assert answer.status == 201
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"{gateway.url}/api/v1/files/ns/absent")
        assert missing.value.code == 404
        missing.value.close()
        deadline = time.monotonic() + 5
        while True:
            lines = [
                json.loads(line)
                for line in gateway.log_text().splitlines()
                if line.startswith("{") and '"/api/v1/files/' in line
            ]
            if len(lines) == 4 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    assert [(line["method"], line["path"], line["status"]) for line in lines] == [
        ("PUT", "/api/v1/files/ns/k0", 201),
        ("PUT", "/api/v1/files/ns/k1", 201),
        ("PUT", "/api/v1/files/ns/k2", 201),
        ("GET", "/api/v1/files/ns/absent", 404),
    ]
    assert [line["bytes_in"] for line in lines[:3]] == [0, 1, 2]


def test_access_line_time_is_iso_utc_with_milliseconds_and_current() -> None:
    import time
    from datetime import datetime

    from gateway.observability import _iso_now

    before = time.time()
    text = _iso_now()
    after = time.time()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", text), text
    stamp = datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    assert before - 0.001 <= stamp <= after

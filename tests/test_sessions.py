"""Web UI sessions without a browser: the cookie's flags, CSRF, login CSRF, expiry, sign-out seen
by another process over the same store, and the static pages' headers.

Two applications over one local store stand for two workers (``serve --workers N``) or two
replicas: a session made by one is honoured by the other, and a sign-out in one ends it in the
other within ``auth.cache-seconds``; one test does the same on a real ``serve --workers 2``.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway import config
from gateway.app import create_app
from gateway.sessions import COOKIE, SESSIONS, SESSIONS_PREFIX
from tests.support.gateway_process import GatewayProcess
from tests.test_workers import _owner, _workers

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[[web.Application], Awaitable[Client]]
ROOT_PASSWORD = "root password for tests"
ROOT = {"Authorization": "Basic " + base64.b64encode(f"root:{ROOT_PASSWORD}".encode()).decode()}
ALICE_PASSWORD = "alice password 123"


def _values(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    return {
        "storage.type": "local",
        "storage.local.base-path": str(tmp_path / "data"),
        "tenants.enabled": True,
        "tenants.ids": ["acme"],
        "admin.username": "root",
        "admin.password": ROOT_PASSWORD,
        "admin.password-file": str(tmp_path / "admin.txt"),
        "auth.cache-seconds": 0.1,
        **extra,
    }


async def _client(aiohttp_client: MakeClient, tmp_path: Path, **extra: Any) -> Client:
    return await aiohttp_client(create_app(config.check(_values(tmp_path, **extra))))


async def _alice(client: Client) -> None:
    user = {"username": "alice", "password": ALICE_PASSWORD}
    assert (await client.post("/api/v1/users", json=user, headers=ROOT)).status in (201, 409)
    binding = {"tenant": "acme", "kind": "user", "subject": "alice", "role": "EDITOR"}
    assert (await client.put("/api/v1/bindings", json=binding, headers=ROOT)).status == 200


async def _sign_in(client: Client, **headers: str) -> tuple[str, str, str]:
    """Sign alice in; return the cookie's value, its Set-Cookie header and the CSRF token."""
    response = await client.post(
        "/api/v1/session", data={"username": "alice", "password": ALICE_PASSWORD}, headers=headers
    )
    assert response.status == 200, await response.text()
    body = await response.json()
    assert body["name"] == "alice" and body["tenancy"] == {"enabled": True, "nullTenant": True}
    return response.cookies[COOKIE].value, response.headers["Set-Cookie"], body["csrfToken"]


async def test_cookie_is_httponly_strict_and_secure_only_behind_a_trusted_tls_proxy(
    aiohttp_client: MakeClient, tmp_path: Path
) -> None:
    plain = await _client(aiohttp_client, tmp_path)
    await _alice(plain)
    _, header, _ = await _sign_in(plain, **{"X-Forwarded-Proto": "https"})
    assert "HttpOnly" in header and "SameSite=Strict" in header and "Path=/" in header
    assert "Secure" not in header  # the header is not trusted without server.trust-proxy
    proxied = await _client(aiohttp_client, tmp_path, **{"server.trust-proxy": True})
    _, header, _ = await _sign_in(proxied, **{"X-Forwarded-Proto": "https"})
    assert "Secure" in header and "HttpOnly" in header
    _, header, _ = await _sign_in(proxied, **{"X-Forwarded-Proto": "http"})
    assert "Secure" not in header
    # Behind the proxy, the page's origin is the proxy's host; trusted only when configured.
    forwarded = {"X-Forwarded-Host": "gw.example", "Origin": "https://gw.example"}
    _, header, _ = await _sign_in(proxied, **forwarded, **{"X-Forwarded-Proto": "https"})
    assert "Secure" in header
    form = {"username": "alice", "password": ALICE_PASSWORD}
    refused = await plain.post("/api/v1/session", data=form, headers=forwarded)
    assert refused.status == 403
    # What counts is the entry the proxy set or added, the last: any before it came from the
    # client (as for X-Forwarded-For).
    _, header, _ = await _sign_in(proxied, **{"X-Forwarded-Proto": "https, http"})
    assert "Secure" not in header
    _, header, _ = await _sign_in(proxied, **{"X-Forwarded-Proto": "http, https"})
    assert "Secure" in header
    spoofed = {"X-Forwarded-Host": "evil.example, gw.example", "Origin": "https://evil.example"}
    refused = await proxied.post("/api/v1/session", data=form, headers=spoofed)
    assert refused.status == 403
    _, header, _ = await _sign_in(proxied, **{**spoofed, "Origin": "https://gw.example"})
    assert "HttpOnly" in header


async def test_a_change_with_the_cookie_needs_the_csrf_token_basic_auth_does_not(
    aiohttp_client: MakeClient, tmp_path: Path
) -> None:
    client = await _client(aiohttp_client, tmp_path)
    await _alice(client)
    session, _, csrf = await _sign_in(client)
    cookie = {"Cookie": f"{COOKIE}={session}"}
    for token in (None, "", csrf[:-1] + ("A" if csrf[-1] != "A" else "B")):
        headers = cookie if token is None else {**cookie, "X-CSRF-Token": token}
        response = await client.put("/api/v1/acme/files/a.txt", data=b"x", headers=headers)
        assert response.status == 403
        body = await response.json()
        assert body["error"] == "csrf_token_required" and "X-CSRF-Token" in body["message"]
    assert (await client.get("/api/v1/acme/stats/a.txt", headers=cookie)).status == 404
    ok = await client.put(
        "/api/v1/acme/files/a.txt", data=b"x", headers={**cookie, "X-CSRF-Token": csrf}
    )
    assert ok.status == 201
    alice = base64.b64encode(f"alice:{ALICE_PASSWORD}".encode()).decode()
    basic = await client.put(
        "/api/v1/acme/files/b.txt", data=b"y", headers={"Authorization": f"Basic {alice}"}
    )
    assert basic.status == 201  # Basic (and Bearer) need no token


async def test_sign_in_from_another_site_is_refused_and_sets_no_cookie(
    aiohttp_client: MakeClient, tmp_path: Path
) -> None:
    client = await _client(aiohttp_client, tmp_path)
    await _alice(client)
    form = {"username": "alice", "password": ALICE_PASSWORD}
    for origin in ("https://evil.example", "null", f"http://{client.host}:1"):
        response = await client.post("/api/v1/session", data=form, headers={"Origin": origin})
        assert response.status == 403, origin
        assert "Origin" in (await response.json())["message"]
        assert COOKIE not in response.cookies
    same = f"http://{client.host}:{client.port}"
    assert (await client.post("/api/v1/session", data=form, headers={"Origin": same})).status == 200
    wrong = await client.post("/api/v1/session", data={**form, "password": "not it at all"})
    assert wrong.status == 401 and COOKIE not in wrong.cookies
    # No password dialog in a browser: the challenge names no scheme it knows.
    assert "Basic" not in wrong.headers["WWW-Authenticate"]
    as_json = await client.post("/api/v1/session", json=form)
    assert as_json.status == 400


async def test_a_session_is_shared_by_processes_and_sign_out_ends_it_in_all(
    aiohttp_client: MakeClient, tmp_path: Path
) -> None:
    one = await _client(aiohttp_client, tmp_path)
    two = await _client(aiohttp_client, tmp_path)
    await _alice(one)
    await asyncio.sleep(0.3)  # the second process's registry sees alice
    session, _, csrf = await _sign_in(one)
    cookie = {"Cookie": f"{COOKIE}={session}"}
    assert (await two.get("/api/v1/acme/list", headers=cookie)).status == 200
    made = await two.post("/api/v1/acme/directories/d", headers={**cookie, "X-CSRF-Token": csrf})
    assert made.status == 201
    answer = await two.get("/api/v1/session", headers=cookie)
    assert (await answer.json())["csrfToken"] == csrf
    # Only the id's hash is in the store.
    stored = list((tmp_path / "data" / SESSIONS_PREFIX).iterdir())
    assert len(stored) == 1 and session not in stored[0].name
    assert session.encode() not in stored[0].read_bytes()

    assert (await one.delete("/api/v1/session", headers=cookie)).status == 403  # no token
    out = await one.delete("/api/v1/session", headers={**cookie, "X-CSRF-Token": csrf})
    assert out.status == 204 and out.cookies[COOKIE].value == ""
    assert not list((tmp_path / "data" / SESSIONS_PREFIX).iterdir())
    assert (await one.get("/api/v1/acme/list", headers=cookie)).status == 401
    await asyncio.sleep(0.15)  # auth.cache-seconds
    refused = await two.get("/api/v1/acme/list", headers=cookie)
    assert refused.status == 401
    assert "sign in again" in (await refused.json())["message"]


async def test_a_session_ends_after_its_lifetime_and_is_pruned(
    aiohttp_client: MakeClient, tmp_path: Path
) -> None:
    client = await _client(aiohttp_client, tmp_path, **{"auth.session-seconds": 0.5})
    await _alice(client)
    session, _, _ = await _sign_in(client)
    cookie = {"Cookie": f"{COOKIE}={session}"}
    assert (await client.get("/api/v1/session", headers=cookie)).status == 200
    await asyncio.sleep(0.6)
    assert (await client.get("/api/v1/session", headers=cookie)).status == 401
    assert (await client.get("/api/v1/acme/list", headers=cookie)).status == 401
    folder = tmp_path / "data" / SESSIONS_PREFIX
    assert len(list(folder.iterdir())) == 1
    assert await client.app[SESSIONS].prune() == 1
    assert not list(folder.iterdir())


@pytest.mark.parametrize("value", ["", "x", "a" * 44, "../../registry/users/root", "a" * 43])
async def test_a_malformed_or_unknown_cookie_is_refused(
    aiohttp_client: MakeClient, tmp_path: Path, value: str
) -> None:
    client = await _client(aiohttp_client, tmp_path)
    response = await client.get("/api/v1/acme/list", headers={"Cookie": f"{COOKIE}={value}"})
    assert response.status == 401
    assert (await response.json())["error"] == "unauthorized"


async def test_with_auth_off_the_session_says_so_and_sign_in_is_refused(
    aiohttp_client: MakeClient, tmp_path: Path
) -> None:
    client = await _client(aiohttp_client, tmp_path, **{"auth.enabled": False})
    answer = await client.get("/api/v1/session")
    body = await answer.json()
    assert answer.status == 200 and body["kind"] == "anonymous" and body["csrfToken"] is None
    form = {"username": "alice", "password": ALICE_PASSWORD}
    assert (await client.post("/api/v1/session", data=form)).status == 400


async def test_pages_are_served_with_a_csp_without_inline_script(
    aiohttp_client: MakeClient, tmp_path: Path
) -> None:
    client = await _client(aiohttp_client, tmp_path)
    redirect = await client.get("/ui", allow_redirects=False)
    assert redirect.status == 302 and redirect.headers["Location"] == "/ui/"
    page = await client.get("/ui/acme/files/some/folder/")
    assert page.status == 200 and page.content_type == "text/html"
    csp = page.headers["Content-Security-Policy"]
    assert "script-src 'self';" in csp and "unsafe-inline" not in csp
    assert "frame-ancestors 'none'" in csp and page.headers["X-Content-Type-Options"] == "nosniff"
    html = await page.text()
    assert '<script type="module" src="/ui/static/app.js"></script>' in html
    assert html.count("<script") == 1  # no inline script
    script = await client.get("/ui/static/app.js")
    assert script.status == 200 and script.content_type == "text/javascript"
    assert "innerHTML" not in await script.text()
    assert (await client.get("/ui/static/missing.js")).status == 404
    assert (await client.get("/ui/static/..%2fapp.py")).status == 404


def _call(
    port: int,
    workers: list[Any],
    method: str,
    path: str,
    headers: dict[str, str],
    body: bytes = b"",
) -> tuple[int, bytes, dict[str, str], int | None]:
    """One request on a new connection; return status, body, headers and the worker's pid."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request(method, path, body=body or None, headers=headers)
        response = connection.getresponse()
        reply = response.read()
        return response.status, reply, dict(response.getheaders()), _owner(workers, connection.sock)
    finally:
        connection.close()


@pytest.mark.slow
def test_a_session_works_on_every_worker_and_sign_out_ends_it_on_all(tmp_path: Path) -> None:
    values = _values(tmp_path, **{"auth.cache-seconds": 0.2})
    with GatewayProcess(values, args=["--workers", "2"]) as gateway:
        assert gateway.port is not None
        port = gateway.port
        workers = _workers(gateway, 2)

        def call(method: str, path: str, headers: dict[str, str], body: bytes = b"") -> Any:
            return _call(port, workers, method, path, headers, body)

        user = json.dumps({"username": "alice", "password": ALICE_PASSWORD}).encode()
        assert (
            call("POST", "/api/v1/users", {**ROOT, "Content-Type": "application/json"}, user)[0]
            == 201
        )
        bind = {"tenant": "acme", "kind": "user", "subject": "alice", "role": "EDITOR"}
        headers = {**ROOT, "Content-Type": "application/json"}
        assert call("PUT", "/api/v1/bindings", headers, json.dumps(bind).encode())[0] == 200
        time.sleep(0.5)  # both workers' registries have alice
        form = urllib.parse.urlencode({"username": "alice", "password": ALICE_PASSWORD})
        status, reply, answer, _ = call(
            "POST",
            "/api/v1/session",
            {"Content-Type": "application/x-www-form-urlencoded"},
            form.encode(),
        )
        assert status == 200, reply
        cookie = answer["Set-Cookie"].split(";")[0]
        csrf = json.loads(reply)["csrfToken"]
        owners = set()
        for i in range(16):
            with_cookie = {"Cookie": cookie, "X-CSRF-Token": csrf}
            status, reply, _, owner = call("PUT", f"/api/v1/acme/files/w{i}", with_cookie, b"x")
            assert status == 201, reply
            status, reply, _, owner2 = call("GET", "/api/v1/acme/list", {"Cookie": cookie})
            assert status == 200, reply
            owners |= {owner, owner2}
        assert owners == {w.pid for w in workers}
        status, _, _, _ = call(
            "DELETE", "/api/v1/session", {"Cookie": cookie, "X-CSRF-Token": csrf}
        )
        assert status == 204
        time.sleep(0.3)  # auth.cache-seconds
        for _ in range(8):
            assert call("GET", "/api/v1/acme/list", {"Cookie": cookie})[0] == 401

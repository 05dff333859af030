"""Each class of refused key, sent over HTTP with the raw bytes on the request line.

HTTP clients normalise ``..`` and re-encode paths, so these requests are written to a
socket by hand. Each answer must be 400 with the rule named, and nothing may be written.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway import config
from gateway.app import create_app

RawSend = Callable[..., Awaitable[tuple[int, dict[str, str], bytes]]]


async def raw_request(
    port: int, method: str, target: bytes, body: bytes = b"", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """Send one HTTP/1.1 request with ``target`` exactly as given; return status, headers, body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = [method.encode() + b" " + target + b" HTTP/1.1", b"Host: gateway", b"Connection: close"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}".encode())
    if body or method == "PUT":
        lines.append(f"Content-Length: {len(body)}".encode())
    writer.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
    await writer.drain()
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, payload = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        parsed[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), parsed, payload


@pytest.fixture
async def gateway(
    tmp_path: Path, aiohttp_server: Callable[[web.Application], Awaitable[TestServer]]
) -> tuple[int, Path]:
    base = tmp_path / "data"
    cfg = config.check(
        {
            "storage.type": "local",
            "storage.local.base-path": str(base),
            "tenants.enabled": True,
            "tenants.default-tenant": True,
            "tenants.ids": ["acme", "other"],
            "auth.enabled": False,
        }
    )
    server = await aiohttp_server(create_app(cfg))
    assert server.port is not None
    return server.port, base


def _files(base: Path) -> set[str]:
    return {
        str(p.relative_to(base))
        for p in base.rglob("*")
        if p.is_file() and ".gateway" not in p.parts
    }


# (class number, raw key as sent on the request line, the rule the answer must name)
CASES: list[tuple[int, bytes, str]] = [
    (1, b"../other/x", "dot-segment"),
    (1, b"a/../../other/x", "dot-segment"),
    (1, b"%2e%2e/other/x", "dot-segment"),
    (1, b".%2e/other/x", "dot-segment"),
    (1, b"%2E%2E%2Fother%2Fx", "dot-segment"),
    (1, b"./x", "dot-segment"),
    (2, b"%252e%252e/other/x", "double-encoding"),
    (2, b"a%252fb", "double-encoding"),
    (2, b"%25%32%65%25%32%65/x", "double-encoding"),
    (2, b"a%2", "malformed-percent"),
    (3, b"a\\b", "backslash"),
    (3, b"..%5c..%5cx", "backslash"),
    (3, b"%5cx", "backslash"),
    (4, b"a%00b", "control-character"),
    (4, b"a%0ab", "control-character"),
    (4, b"a%7fb", "control-character"),
    (4, b"a%c2%85b", "control-character"),
    (4, b"a%e2%80%aeb", "control-character"),
    (5, b"%c0%ae%c0%ae/x", "invalid-utf8"),
    (5, b"%ff", "invalid-utf8"),
    (5, b"%ed%a0%80", "invalid-utf8"),
    (6, b"%ef%bc%8e%ef%bc%8e/x", "lookalike"),
    (6, b"%e2%80%a5/x", "lookalike"),
    (6, b"a%ef%bc%8fb", "lookalike"),
    (7, b"/x", "empty-segment"),
    (7, b"a//b", "empty-segment"),
    (7, b"%2fetc%2fpasswd", "empty-segment"),
    (7, b"a/", "empty-segment"),
    (7, b"C:/x", "drive-path"),
    (9, b"a" * 256, "segment-too-long"),
    (9, b"/".join([b"a" * 250] * 5), "key-too-long"),
]


@pytest.mark.parametrize(("number", "raw", "rule"), CASES)
@pytest.mark.parametrize("method", ["PUT", "GET", "DELETE"])
async def test_refused_key_answers_400_naming_the_rule_and_writes_nothing(
    gateway: tuple[int, Path], number: int, raw: bytes, rule: str, method: str
) -> None:
    port, base = gateway
    before = _files(base)
    status, _, body = await raw_request(
        port, method, b"/api/v1/acme/files/" + raw, body=b"attack" if method == "PUT" else b""
    )
    assert status == 400, (number, raw, body)
    answer = json.loads(body)
    assert answer["rule"] == rule
    assert answer["error"] == "invalid_key"
    assert str(base) not in body.decode("utf-8", "replace")
    assert _files(base) == before


@pytest.mark.parametrize("raw", [b"a\xffb", b"\xc0\xae\xc0\xae/x", "é".encode()])
async def test_raw_non_ascii_byte_on_the_request_line_is_refused_by_the_parser(
    gateway: tuple[int, Path], raw: bytes
) -> None:
    # RFC 9112 allows only ASCII on the request line; aiohttp's parser answers 400 itself,
    # before any handler runs (so the answer is its own, not the gateway's JSON).
    port, base = gateway
    status, _, _ = await raw_request(port, "PUT", b"/api/v1/acme/files/" + raw, body=b"x")
    assert status == 400
    assert _files(base) == set()


@pytest.mark.parametrize(
    "raw",
    [b"tenants/acme/x", b"%74enants/acme/x", b"Tenants/acme/x", b".gateway/x", b"%2egateway/x",
     b"%ef%bd%94%ef%bd%85%ef%bd%8e%ef%bd%81%ef%bd%8e%ef%bd%94%ef%bd%93/acme/x"],
)  # fmt: skip
async def test_null_tenant_naming_a_reserved_prefix_is_refused(
    gateway: tuple[int, Path], raw: bytes
) -> None:
    port, base = gateway
    status, _, body = await raw_request(port, "PUT", b"/api/v1/files/" + raw, body=b"x")
    assert status == 400
    assert json.loads(body)["rule"] == "reserved-prefix"
    assert not (base / "tenants").exists()


@pytest.mark.parametrize(
    "tenant",
    [b"ACME", b"ac%6de", b"acme%2f..%2fother", b"..", b"%2e%2e", b"ac.me", b"a" * 64, b"tenants"],
)
async def test_tenant_id_outside_the_grammar_is_refused(
    gateway: tuple[int, Path], tenant: bytes
) -> None:
    port, base = gateway
    status, _, body = await raw_request(port, "PUT", b"/api/v1/" + tenant + b"/files/x", body=b"x")
    assert status in (400, 404)
    if status == 400:
        assert json.loads(body)["rule"] == "tenant-id"
    assert not (base / "tenants").exists()


async def test_unknown_tenant_in_the_grammar_is_not_found(gateway: tuple[int, Path]) -> None:
    port, base = gateway
    status, _, body = await raw_request(port, "PUT", b"/api/v1/ghost/files/x", body=b"x")
    assert status == 404
    assert json.loads(body)["error"] == "tenant_not_found"
    assert b"ghost" not in body
    assert not (base / "tenants").exists()


@pytest.mark.parametrize(
    ("uri", "rule"),
    [
        (b"kestra://../other/x", "dot-segment"),
        (b"kestra://user@ns/x", "uri"),
        (b"kestra://ns:1/x", "uri"),
        (b"kestra:///ns/x%3Fq", "uri"),  # a query inside the URI
        (b"kestra:///ns/x%23f", "uri"),  # a fragment inside the URI
        (b"kestra:////etc/passwd", "empty-segment"),
    ],
)
async def test_kestra_uri_parameter_is_checked_like_a_key(
    gateway: tuple[int, Path], uri: bytes, rule: str
) -> None:
    port, base = gateway
    status, _, body = await raw_request(port, "PUT", b"/api/v1/acme/files?uri=" + uri, body=b"x")
    assert status == 400, body
    assert json.loads(body)["rule"] == rule
    assert _files(base) == set()


async def test_legacy_and_canonical_uri_reach_the_same_object(gateway: tuple[int, Path]) -> None:
    port, base = gateway
    status, _, body = await raw_request(
        port, "PUT", b"/api/v1/acme/files?uri=kestra:///ns/flow/f.txt", body=b"hello"
    )
    assert status == 201
    assert json.loads(body)["uri"] == "kestra:///ns/flow/f.txt"
    assert (base / "tenants/acme/ns/flow/f.txt").read_bytes() == b"hello"
    status, _, body = await raw_request(
        port, "GET", b"/api/v1/acme/files?uri=kestra://ns/flow/f.txt"
    )
    assert (status, body) == (200, b"hello")


async def test_symlink_planted_in_a_tenant_folder_is_not_followed(
    gateway: tuple[int, Path],
) -> None:
    """Class 8: a link inside acme's folder that points at other's folder or outside."""
    port, base = gateway
    status, _, _ = await raw_request(port, "PUT", b"/api/v1/other/files/secret.txt", body=b"SECRET")
    assert status == 201
    (base / "tenants/acme").mkdir(parents=True)
    (base / "tenants/acme/link").symlink_to(base / "tenants/other")
    (base / "tenants/acme/passwd").symlink_to("/etc/passwd")
    for method, target, body in [
        ("GET", b"/api/v1/acme/files/link/secret.txt", b""),
        ("GET", b"/api/v1/acme/files/passwd", b""),
        ("PUT", b"/api/v1/acme/files/link/secret.txt", b"overwritten"),
        ("DELETE", b"/api/v1/acme/files/link/secret.txt", b""),
        ("GET", b"/api/v1/acme/list/link", b""),
        ("GET", b"/api/v1/acme/stats/link/secret.txt", b""),
    ]:
        status, _, answer = await raw_request(port, method, target, body=body)
        assert status in (403, 404), (method, target, status)
        assert b"SECRET" not in answer and b"root:" not in answer
    assert (base / "tenants/other/secret.txt").read_bytes() == b"SECRET"
    status, _, answer = await raw_request(port, "GET", b"/api/v1/acme/list?recursive=true")
    assert status == 200
    assert json.loads(answer)["entries"] == []


async def test_oversized_header_is_refused_with_a_4xx(gateway: tuple[int, Path]) -> None:
    port, base = gateway
    status, _, _ = await raw_request(
        port, "PUT", b"/api/v1/acme/files/x", body=b"x", headers={"X-Meta-big": "v" * 20000}
    )
    assert 400 <= status < 500
    many = {f"X-Meta-h{i}": "v" for i in range(200)}
    status, _, _ = await raw_request(port, "PUT", b"/api/v1/acme/files/y", body=b"y", headers=many)
    assert 400 <= status < 500
    assert _files(base) == set()

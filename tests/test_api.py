"""The object API over HTTP (pytest-aiohttp's client), on the local and memory backends."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway import config
from gateway.app import create_app

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]


@pytest.fixture(params=["local", "memory"])
def make_client(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    aiohttp_client: Callable[[web.Application], Awaitable[Client]],
) -> MakeClient:
    async def make(**overrides: Any) -> Client:
        values: dict[str, Any] = {
            "storage.type": request.param,
            "storage.local.base-path": str(tmp_path / "data"),
            "tenants.enabled": True,
            "tenants.default-tenant": True,
            "tenants.ids": ["acme", "other"],
            "auth.enabled": False,  # access control has its own tests (test_access.py)
        }
        values.update(overrides)
        return await aiohttp_client(create_app(config.check(values)))

    return make


@pytest.fixture
async def client(make_client: MakeClient) -> Client:
    return await make_client()


async def put(client: Client, path: str, data: bytes = b"data", **headers: str) -> dict[str, Any]:
    response = await client.put(path, data=data, headers=headers)
    assert response.status == 201, await response.text()
    body: dict[str, Any] = await response.json()
    return body


# -- upload and download ----------------------------------------------------------------------


async def test_put_answers_201_with_uri_size_and_etag(client: Client) -> None:
    body = await put(client, "/api/v1/acme/files/ns/flow/out.csv", b"a,b\n1,2\n")
    assert body["uri"] == "kestra:///ns/flow/out.csv"
    assert body["size"] == 8
    assert body["etag"].startswith('"')
    response = await client.get("/api/v1/acme/files/ns/flow/out.csv")
    assert response.status == 200
    assert await response.read() == b"a,b\n1,2\n"
    assert response.headers["ETag"] == body["etag"]


async def test_tenant_and_null_tenant_files_land_at_their_physical_places(
    make_client: MakeClient, tmp_path: Path
) -> None:
    client = await make_client(**{"storage.type": "local"})
    await put(client, "/api/v1/acme/files/ns/f.txt", b"acme")
    await put(client, "/api/v1/files/ns/f.txt", b"null")
    base = tmp_path / "data"
    assert (base / "tenants/acme/ns/f.txt").read_bytes() == b"acme"
    assert (base / "ns/f.txt").read_bytes() == b"null"
    assert await (await client.get("/api/v1/acme/files/ns/f.txt")).read() == b"acme"
    assert await (await client.get("/api/v1/files/ns/f.txt")).read() == b"null"


async def test_tenants_do_not_see_each_others_files(client: Client) -> None:
    await put(client, "/api/v1/other/files/secret.txt", b"other's")
    assert (await client.get("/api/v1/acme/files/secret.txt")).status == 404
    assert (await client.get("/api/v1/files/secret.txt")).status == 404
    listing = await (await client.get("/api/v1/acme/list?recursive=true")).json()
    assert listing["entries"] == []
    root = await (await client.get("/api/v1/list?recursive=true")).json()
    assert root["entries"] == []
    assert (await client.delete("/api/v1/acme/files/secret.txt")).status == 404
    assert await (await client.get("/api/v1/other/files/secret.txt")).read() == b"other's"


async def test_content_type_and_metadata_round_trip(client: Client) -> None:
    await put(
        client, "/api/v1/acme/files/a.json", b"{}", **{
            "Content-Type": "application/json", "X-Meta-Flow-Id": "hello", "X-Meta-run": "42"
        }
    )  # fmt: skip
    response = await client.get("/api/v1/acme/files/a.json")
    assert response.headers["Content-Type"] == "application/json"
    assert response.headers["X-Meta-flow-id"] == "hello"
    assert response.headers["X-Meta-run"] == "42"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Content-Disposition"].startswith("attachment")
    stat = await (await client.get("/api/v1/acme/stats/a.json")).json()
    assert stat["metadata"] == {"flow-id": "hello", "run": "42"}
    assert stat["contentType"] == "application/json"


async def test_metadata_over_2_kib_is_refused(client: Client) -> None:
    response = await client.put(
        "/api/v1/acme/files/a", data=b"x", headers={"X-Meta-big": "v" * 2100}
    )
    assert response.status == 400
    assert (await client.get("/api/v1/acme/files/a")).status == 404


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("Content-MD5", base64.b64encode(hashlib.md5(b"other").digest()).decode()),
        ("X-Checksum-Sha256", hashlib.sha256(b"other").hexdigest()),
        ("X-Checksum-Sha256", base64.b64encode(hashlib.sha256(b"other").digest()).decode()),
    ],
)
async def test_checksum_mismatch_answers_400_and_stores_nothing(
    client: Client, header: str, value: str
) -> None:
    await put(client, "/api/v1/acme/files/k", b"old")
    response = await client.put("/api/v1/acme/files/k", data=b"payload", headers={header: value})
    assert response.status == 400
    assert (await response.json())["error"] == "checksum_mismatch"
    assert await (await client.get("/api/v1/acme/files/k")).read() == b"old"


async def test_matching_checksums_are_accepted(client: Client) -> None:
    data = b"payload" * 1000
    await put(
        client, "/api/v1/acme/files/k", data,
        **{"Content-MD5": base64.b64encode(hashlib.md5(data).digest()).decode(),
           "X-Checksum-Sha256": hashlib.sha256(data).hexdigest()},
    )  # fmt: skip
    assert await (await client.get("/api/v1/acme/files/k")).read() == data


async def test_malformed_checksum_header_is_refused(client: Client) -> None:
    response = await client.put("/api/v1/acme/files/k", data=b"x", headers={"Content-MD5": "zz"})
    assert response.status == 400
    assert (await client.get("/api/v1/acme/files/k")).status == 404


async def test_if_none_match_star_refuses_to_overwrite(client: Client) -> None:
    await put(client, "/api/v1/acme/files/k", b"first", **{"If-None-Match": "*"})
    response = await client.put(
        "/api/v1/acme/files/k", data=b"second", headers={"If-None-Match": "*"}
    )
    assert response.status == 412
    assert await (await client.get("/api/v1/acme/files/k")).read() == b"first"


async def test_upload_over_the_maximum_size_answers_413_and_stores_nothing(
    make_client: MakeClient,
) -> None:
    client = await make_client(**{"limits.max-object-size": 1000})
    response = await client.put("/api/v1/acme/files/k", data=b"x" * 1001)
    assert response.status == 413

    async def chunked() -> Any:  # no Content-Length: the limit holds while streaming
        for _ in range(20):
            yield b"y" * 100

    response = await client.put("/api/v1/acme/files/k", data=chunked())
    assert response.status == 413
    assert (await client.get("/api/v1/acme/files/k")).status == 404


async def test_empty_object_round_trips(client: Client) -> None:
    body = await put(client, "/api/v1/acme/files/empty", b"")
    assert body["size"] == 0
    response = await client.get("/api/v1/acme/files/empty")
    assert response.status == 200
    assert await response.read() == b""


async def test_non_ascii_key_round_trips(client: Client) -> None:
    body = await put(client, "/api/v1/acme/files/donn%C3%A9es/%E2%98%83%20x.txt", b"snow")
    assert body["key"] == "données/☃ x.txt"
    assert body["uri"] == "kestra:///donn%C3%A9es/%E2%98%83%20x.txt"
    response = await client.get("/api/v1/acme/files/donn%C3%A9es/%E2%98%83%20x.txt")
    assert await response.read() == b"snow"


# -- ranges and conditional requests -----------------------------------------------------------


@pytest.mark.parametrize(
    ("range_header", "status", "expected", "content_range"),
    [
        ("bytes=0-3", 206, b"0123", "bytes 0-3/10"),
        ("bytes=4-", 206, b"456789", "bytes 4-9/10"),
        ("bytes=-3", 206, b"789", "bytes 7-9/10"),
        ("bytes=8-100", 206, b"89", "bytes 8-9/10"),
        ("bytes=9-9", 206, b"9", "bytes 9-9/10"),
        ("bytes=0-1,4-5", 200, b"0123456789", None),  # several ranges: the whole object
        ("lines=0-1", 200, b"0123456789", None),
    ],
)
async def test_range_request(
    client: Client, range_header: str, status: int, expected: bytes, content_range: str | None
) -> None:
    await put(client, "/api/v1/acme/files/r", b"0123456789")
    response = await client.get("/api/v1/acme/files/r", headers={"Range": range_header})
    assert response.status == status
    assert await response.read() == expected
    assert response.headers.get("Content-Range") == content_range


@pytest.mark.parametrize("range_header", ["bytes=10-", "bytes=100-200"])
async def test_range_past_the_end_answers_416_with_the_size(
    client: Client, range_header: str
) -> None:
    await put(client, "/api/v1/acme/files/r", b"0123456789")
    response = await client.get("/api/v1/acme/files/r", headers={"Range": range_header})
    assert response.status == 416
    assert response.headers["Content-Range"] == "bytes */10"


async def test_if_range_with_a_stale_etag_sends_the_whole_object(client: Client) -> None:
    await put(client, "/api/v1/acme/files/r", b"0123456789")
    response = await client.get(
        "/api/v1/acme/files/r", headers={"Range": "bytes=0-1", "If-Range": '"stale"'}
    )
    assert response.status == 200
    assert await response.read() == b"0123456789"


async def test_if_none_match_answers_304(client: Client) -> None:
    etag = (await put(client, "/api/v1/acme/files/c", b"v1"))["etag"]
    response = await client.get("/api/v1/acme/files/c", headers={"If-None-Match": etag})
    assert response.status == 304
    assert response.headers["ETag"] == etag
    await put(client, "/api/v1/acme/files/c", b"v2 changed")
    response = await client.get("/api/v1/acme/files/c", headers={"If-None-Match": etag})
    assert response.status == 200
    assert await response.read() == b"v2 changed"


async def test_if_modified_since_answers_304_for_an_unchanged_object(client: Client) -> None:
    await put(client, "/api/v1/acme/files/c", b"v1")
    modified = (await client.head("/api/v1/acme/files/c")).headers["Last-Modified"]
    response = await client.get("/api/v1/acme/files/c", headers={"If-Modified-Since": modified})
    assert response.status == 304
    old = "Mon, 01 Jan 2001 00:00:00 GMT"
    response = await client.get("/api/v1/acme/files/c", headers={"If-Modified-Since": old})
    assert response.status == 200


async def test_if_match_mismatch_answers_412(client: Client) -> None:
    await put(client, "/api/v1/acme/files/c", b"v1")
    response = await client.get("/api/v1/acme/files/c", headers={"If-Match": '"nope"'})
    assert response.status == 412


async def test_head_sends_headers_without_a_body(client: Client) -> None:
    await put(client, "/api/v1/acme/files/h", b"12345")
    response = await client.head("/api/v1/acme/files/h")
    assert response.status == 200
    assert response.headers["Content-Length"] == "5"
    assert await response.read() == b""


async def test_get_missing_file_returns_404_json(client: Client) -> None:
    response = await client.get("/api/v1/acme/files/nope/missing.txt")
    assert response.status == 404
    body = await response.json()
    assert body["error"] == "not_found"
    assert "tenants" not in body["message"]


# -- delete, stat, list, mkdir, move ------------------------------------------------------------


async def test_delete_answers_204_then_404(client: Client) -> None:
    await put(client, "/api/v1/acme/files/d")
    assert (await client.delete("/api/v1/acme/files/d")).status == 204
    assert (await client.delete("/api/v1/acme/files/d")).status == 404
    assert (await client.get("/api/v1/acme/files/d")).status == 404


async def test_delete_of_a_directory_needs_recursive(client: Client) -> None:
    for i in range(3):
        await put(client, f"/api/v1/acme/files/dir/sub/{i}")
    response = await client.delete("/api/v1/acme/files/dir")
    assert response.status == 409
    assert (await client.get("/api/v1/acme/files/dir/sub/0")).status == 200
    response = await client.delete("/api/v1/acme/files/dir?recursive=true")
    assert response.status == 200
    assert (await response.json())["deleted"] == 3
    assert (await client.get("/api/v1/acme/files/dir/sub/0")).status == 404


async def test_stat_returns_kestra_file_attributes(client: Client) -> None:
    await put(client, "/api/v1/acme/files/ns/f.txt", b"12345")
    stat = await (await client.get("/api/v1/acme/stats/ns/f.txt")).json()
    assert stat["fileName"] == "f.txt"
    assert stat["type"] == "File"
    assert stat["size"] == 5
    assert isinstance(stat["lastModifiedTime"], int)
    assert isinstance(stat["creationTime"], int)
    assert stat["uri"] == "kestra:///ns/f.txt"
    directory = await (await client.get("/api/v1/acme/stats/ns")).json()
    assert directory["type"] == "Directory"
    assert (await client.get("/api/v1/acme/stats/missing")).status == 404


async def test_list_one_level_and_recursive(client: Client) -> None:
    for key in ["ns/a.txt", "ns/sub/b.txt", "ns/sub/deeper/c.txt", "top.txt"]:
        await put(client, f"/api/v1/acme/files/{key}")
    one = await (await client.get("/api/v1/acme/list/ns")).json()
    assert [(e["key"], e["type"]) for e in one["entries"]] == [
        ("ns/a.txt", "File"),
        ("ns/sub", "Directory"),
    ]
    deep = await (await client.get("/api/v1/acme/list/ns?recursive=true")).json()
    assert [e["key"] for e in deep["entries"]] == [
        "ns/a.txt", "ns/sub/b.txt", "ns/sub/deeper/c.txt"
    ]  # fmt: skip
    root = await (await client.get("/api/v1/acme/list")).json()
    assert [e["key"] for e in root["entries"]] == ["ns", "top.txt"]


async def test_list_pages_with_a_cursor(client: Client) -> None:
    names = [f"p/{i:03d}" for i in range(25)]
    for name in names:
        await put(client, f"/api/v1/acme/files/{name}")
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        query = "?limit=10" + (f"&cursor={cursor}" if cursor else "")
        page = await (await client.get(f"/api/v1/acme/list/p{query}")).json()
        seen += [e["key"] for e in page["entries"]]
        pages += 1
        cursor = page["cursor"]
        if cursor is None:
            break
        assert "tenants" not in base64.urlsafe_b64decode(cursor + "==").decode()
    assert seen == names
    assert pages == 3


async def test_null_tenant_root_listing_hides_reserved_prefixes(client: Client) -> None:
    await put(client, "/api/v1/acme/files/x")
    await put(client, "/api/v1/files/ns/y")
    one = await (await client.get("/api/v1/list")).json()
    assert [e["key"] for e in one["entries"]] == ["ns"]
    deep = await (await client.get("/api/v1/list?recursive=true&limit=1")).json()
    assert [e["key"] for e in deep["entries"]] == ["ns/y"]


async def test_list_missing_directory_returns_404(client: Client) -> None:
    assert (await client.get("/api/v1/acme/list/missing")).status == 404


@pytest.mark.parametrize(
    "query", ["limit=0", "limit=1001", "limit=x", "recursive=maybe", "cursor=%%%"]
)
async def test_bad_list_parameters_answer_400(client: Client, query: str) -> None:
    await put(client, "/api/v1/acme/files/p/x")
    assert (await client.get(f"/api/v1/acme/list/p?{query}")).status == 400


async def test_make_directory_then_list_it(client: Client) -> None:
    response = await client.post("/api/v1/acme/directories/ns/empty")
    assert response.status == 201
    stat = await (await client.get("/api/v1/acme/stats/ns/empty")).json()
    assert stat["type"] == "Directory"
    await put(client, "/api/v1/acme/files/f")
    assert (await client.post("/api/v1/acme/directories/f")).status == 409


async def test_move_a_file_and_a_directory(client: Client) -> None:
    await put(client, "/api/v1/acme/files/a/1.txt", b"one")
    await put(client, "/api/v1/acme/files/a/2.txt", b"two")
    response = await client.post("/api/v1/acme/move", json={"from": "a/1.txt", "to": "b/1.txt"})
    assert response.status == 200
    assert (await response.json())["uri"] == "kestra:///b/1.txt"
    assert await (await client.get("/api/v1/acme/files/b/1.txt")).read() == b"one"
    assert (await client.get("/api/v1/acme/files/a/1.txt")).status == 404
    response = await client.post(
        "/api/v1/acme/move", json={"from": "kestra:///a", "to": "kestra://c/moved"}
    )
    assert response.status == 200
    assert await (await client.get("/api/v1/acme/files/c/moved/2.txt")).read() == b"two"


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"from": "a/1.txt", "to": "../other/x"}, 400),
        ({"from": "../other/secret.txt", "to": "mine.txt"}, 400),
        ({"from": "a/1.txt", "to": "kestra://../x"}, 400),
        ({"from": "a/1.txt", "to": "a/1.txt/inside"}, 400),
        ({"from": "a/1.txt"}, 400),
        ({"from": 1, "to": "x"}, 400),
        ({"from": "missing", "to": "x"}, 404),
        ({"from": "a/1.txt", "to": "b"}, 409),
    ],
)
async def test_refused_moves(client: Client, body: dict[str, Any], status: int) -> None:
    await put(client, "/api/v1/acme/files/a/1.txt", b"one")
    await put(client, "/api/v1/acme/files/b", b"in the way")
    await put(client, "/api/v1/other/files/secret.txt", b"secret")
    response = await client.post("/api/v1/acme/move", json=body)
    assert response.status == status
    assert await (await client.get("/api/v1/acme/files/a/1.txt")).read() == b"one"
    assert await (await client.get("/api/v1/other/files/secret.txt")).read() == b"secret"


async def test_move_with_malformed_json_answers_400(client: Client) -> None:
    response = await client.post("/api/v1/acme/move", data=b"{not json")
    assert response.status == 400
    assert (await response.json())["error"] == "bad_request"


# -- tenancy modes, routes, documents -----------------------------------------------------------


async def test_tenants_disabled_serves_only_the_null_tenant(make_client: MakeClient) -> None:
    client = await make_client(**{"tenants.enabled": False})
    await put(client, "/api/v1/files/x", b"null")
    response = await client.get("/api/v1/acme/files/x")
    assert response.status == 404
    assert "not enabled" in (await response.json())["message"]


async def test_default_tenant_disabled_refuses_null_tenant_routes(make_client: MakeClient) -> None:
    client = await make_client(**{"tenants.default-tenant": False})
    response = await client.put("/api/v1/files/x", data=b"x")
    assert response.status == 404
    assert "default (null) tenant is disabled" in (await response.json())["message"]
    await put(client, "/api/v1/acme/files/x", b"acme")


async def test_unknown_route_and_method_answer_json(client: Client) -> None:
    response = await client.get("/api/v1/acme/nothing/x")
    assert response.status == 404
    assert (await response.json())["error"] == "not_found"
    response = await client.post("/api/v1/acme/files/x")
    assert response.status == 405
    assert "PUT" in response.headers["Allow"]
    assert (await client.get("/nowhere")).status == 404


async def test_openapi_document_describes_every_route(client: Client) -> None:
    document = await (await client.get("/openapi.json")).json()
    assert document["openapi"].startswith("3.")
    paths = document["paths"]
    for action in ("files/{key}", "stats/{key}", "list", "list/{key}", "directories/{key}", "move"):
        assert f"/api/v1/{action}" in paths
        assert f"/api/v1/{{tenant}}/{action}" in paths
    assert set(paths["/api/v1/{tenant}/files/{key}"]) >= {"get", "put", "head", "delete"}


async def test_health_endpoints(client: Client) -> None:
    assert (await client.get("/health/live")).status == 200
    ready = await client.get("/health/ready")
    assert ready.status == 200
    assert json.loads(await ready.text()) == {"status": "ok"}


async def test_upload_that_stops_sending_times_out_with_408_and_stores_nothing(
    make_client: MakeClient,
) -> None:
    import asyncio

    client = await make_client(**{"server.read-timeout": 0.3})

    async def stalls() -> Any:
        yield b"first bytes"
        await asyncio.sleep(2)
        yield b"too late"

    response = await client.put("/api/v1/acme/files/slow", data=stalls())
    assert response.status == 408
    assert (await response.json())["error"] == "request_timeout"
    assert (await client.get("/api/v1/acme/files/slow")).status == 404

"""The object API: upload, download, stat, list, delete, make directory, move.

Every handler receives the request's ``Scope`` and the key as decoded once from the request
line (not yet checked); its first step is ``keys.resolve``, whose output is the only string
given to the backend. Every key an answer shows comes back through ``keys.unresolve``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import errno
import hashlib
import json
import logging
import re
from collections.abc import AsyncIterator, Coroutine, Mapping
from typing import Any, Final
from urllib.parse import quote

from aiohttp import web

from backends.base import (
    DIRECTORY,
    MAX_METADATA_BYTES,
    Backend,
    Info,
    Page,
    Reader,
    metadata_size,
)

from . import keys, zerocopy
from .conditional import NOT_MODIFIED, evaluate, http_date, quote_etag, select_range
from .documents import encode_text
from .errors import (
    BadRequest,
    ChecksumMismatch,
    Conflict,
    InsufficientStorage,
    InvalidKey,
    PayloadTooLarge,
    PreconditionFailed,
    RequestTimeout,
    StorageUnavailable,
)
from .keys import Scope
from .observability import note_key
from .registry import Tenant
from .state import BACKEND, CONFIG, REGISTRY, USAGE
from .usage import walk_files

log = logging.getLogger("gateway")

META_PREFIX: Final = "x-meta-"
_META_NAME: Final = re.compile(r"[a-z0-9][a-z0-9_-]{0,127}")
_PRINTABLE: Final = re.compile(r"[\x20-\x7e]*")
READ_CHUNK: Final = 1 << 20
WHOLE_BODY_MAX: Final = 64 * 1024
"""Downloads up to this size are read whole, then sent with their headers in one write."""
MAX_LIST_LIMIT: Final = 1000
# Kept tight on purpose: this is the header value downloads are served with.
_CONTENT_TYPE: Final = re.compile(r"[A-Za-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+-]+(\s*;[\x20-\x7e]*)?")

# Downloads are data, not pages: never let a browser render or sniff them on this origin.
DOWNLOAD_HEADERS: Final = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "sandbox; default-src 'none'",
}


def _key(scope: Scope, raw: str | None) -> str:
    if raw is None:
        raise InvalidKey("empty-key", "name a key in the path or as ?uri=kestra:///...")
    return keys.resolve(scope, raw)


def _backend(request: web.Request) -> Backend:
    return request.app[BACKEND]


def file_attributes(scope: Scope, info: Info, *, listed: bool = False) -> dict[str, Any]:
    """Given a backend ``Info``, return Kestra's FileAttributes plus the key and URI.

    Listings (``listed``) leave out ``metadata`` and ``contentType``: S3 does not list them,
    and a HEAD per entry would make a page of 1,000 cost 1,000 requests. ``stats`` has them.
    """
    key = "" if info.name == scope.root else keys.unresolve(scope, info.name)
    attributes: dict[str, Any] = {
        "fileName": key.rsplit("/", 1)[-1],
        "key": key,
        "type": "Directory" if info.is_dir else "File",
        "size": info.size,
        "lastModifiedTime": None if info.mtime is None else int(info.mtime * 1000),
        "creationTime": None if info.ctime is None else int(info.ctime * 1000),
    }
    if key:
        attributes["uri"] = keys.make_uri(key)
    if not info.is_dir:
        attributes["etag"] = quote_etag(info.etag)
    if not listed:
        attributes["metadata"] = dict(info.metadata)
        if not info.is_dir:
            attributes["contentType"] = info.content_type
    return attributes


# -- upload ------------------------------------------------------------------------------


def _metadata(headers: Mapping[str, str]) -> dict[str, str]:
    metadata: dict[str, str] = {}
    for name, value in headers.items():
        lower = name.lower()
        if not lower.startswith(META_PREFIX):
            continue
        short = lower[len(META_PREFIX) :]
        if not _META_NAME.fullmatch(short):
            raise BadRequest(
                "metadata names (X-Meta-<name>) use letters, digits, '-' and '_' (at most 128)"
            )
        if not _PRINTABLE.fullmatch(value):
            raise BadRequest("metadata values must be printable ASCII")
        if short in metadata:
            raise BadRequest("a metadata name was sent twice")
        metadata[short] = value
    if metadata_size(metadata) > MAX_METADATA_BYTES:
        raise BadRequest(f"metadata is limited to {MAX_METADATA_BYTES} bytes in all")
    return metadata


def _digest_header(headers: Mapping[str, str], name: str, size: int) -> bytes | None:
    """Given ``Content-MD5`` (base64) or ``X-Checksum-Sha256`` (hex or base64), return bytes."""
    value = headers.get(name)
    if value is None:
        return None
    value = value.strip()
    try:
        if len(value) == size * 2:
            return bytes.fromhex(value)
        digest = base64.b64decode(value, validate=True)
    except (ValueError, binascii.Error):
        digest = b""
    if len(digest) != size:
        raise BadRequest(f"{name} is not a valid digest")
    return digest


class _Body:
    """The request body as chunks, counted, size-bounded and hashed as it streams."""

    def __init__(self, request: web.Request, limits: _Limits, read_timeout: float) -> None:
        self.request = request
        self.limits = limits
        self.read_timeout = read_timeout
        self.md5 = _digest_header(request.headers, "Content-MD5", 16)
        self.sha256 = _digest_header(request.headers, "X-Checksum-Sha256", 32)

    async def _wait_for_bytes(self) -> bytes:
        """Wait for more of the body (``b""`` at its end). A client that stops sending must not
        hold a temporary file (or a multipart upload) and a connection forever: each wait is
        bounded. What has already arrived is taken without one (a small body: all of it)."""
        try:
            async with asyncio.timeout(self.read_timeout):
                return await self.request.content.readany()
        except TimeoutError:
            raise RequestTimeout(
                f"no body bytes for {self.read_timeout:g} s; nothing was stored"
            ) from None

    async def chunks(self) -> AsyncIterator[bytes]:
        md5 = hashlib.md5(usedforsecurity=False) if self.md5 is not None else None
        sha = hashlib.sha256() if self.sha256 is not None else None
        size = 0
        content = self.request.content
        while True:
            chunk = content.read_nowait()
            if not chunk:
                if content.is_eof():
                    break  # all of it has arrived and been taken: no wait to arm
                chunk = await self._wait_for_bytes()
                if not chunk:
                    break
            size += len(chunk)
            self.limits.check(size)  # raised mid-stream: the backend stores nothing
            if md5 is not None:
                md5.update(chunk)
            if sha is not None:
                sha.update(chunk)
            yield chunk
        # Raised before the iterator ends, so the backend aborts and stores nothing.
        if md5 is not None and md5.digest() != self.md5:
            raise ChecksumMismatch("Content-MD5 does not match the body; nothing was stored")
        if sha is not None and sha.digest() != self.sha256:
            raise ChecksumMismatch("X-Checksum-Sha256 does not match the body; nothing was stored")


class _Limits:
    """What an upload may hold: the gateway's object size limit and the tenant's quotas."""

    def __init__(self, max_size: int, size_rule: str, budget: int | None, budget_rule: str):
        self.max_size = max_size
        self.size_rule = size_rule
        self.budget = budget  # bytes left under the tenant's maxBytes, counting a replaced object
        self.budget_rule = budget_rule

    def check(self, size: int) -> None:
        """Given the size of a body (known or counted so far), raise if it is too large."""
        if size > self.max_size:
            raise PayloadTooLarge(self.size_rule)
        if self.budget is not None and size > self.budget:
            raise InsufficientStorage(self.budget_rule)


def _tenant(request: web.Request, scope: Scope) -> Tenant | None:
    if scope.tenant is None:
        return None
    return request.app[REGISTRY].snapshot.tenants.get(scope.tenant)


async def _limits(
    request: web.Request, scope: Scope, tenant: Tenant | None, replaced: int | None
) -> _Limits:
    """Given an upload, its tenant (``_tenant``) and the object it replaces, return its
    limits (413 and 507 rules). (``replaced`` counts only under a ``maxBytes`` quota.)"""
    max_size: int = request.app[CONFIG]["limits.max-object-size"]
    size_rule = f"an object is limited to {max_size} bytes (limits.max-object-size)"
    if (
        tenant is not None
        and tenant.max_object_size is not None
        and tenant.max_object_size < max_size
    ):
        max_size = tenant.max_object_size
        size_rule = f"this tenant's objects are limited to {max_size} bytes (quota maxObjectSize)"
    if tenant is None or tenant.max_bytes is None:
        return _Limits(max_size, size_rule, None, "")
    used = (await request.app[USAGE].current(scope.tenant)).bytes
    budget = tenant.max_bytes - used + (replaced or 0)
    budget_rule = (
        f"this tenant's quota is {tenant.max_bytes} bytes (quota maxBytes) and {used} are "
        "used: the upload would cross it; nothing was stored"
    )
    return _Limits(max_size, size_rule, budget, budget_rule)


async def put_file(request: web.Request, scope: Scope, raw_key: str | None) -> web.Response:
    physical = _key(scope, raw_key)
    headers = request.headers
    backend = _backend(request)
    # What the upload replaces, for the usage counters and the quota: looked up first under a
    # maxBytes quota (the budget needs it before the body) or for a body that may be spliced
    # (a refusal at the key comes before the body leaves aiohttp), else told by the write.
    tenant = _tenant(request, scope)
    replaced = None
    looked = (tenant is not None and tenant.max_bytes is not None) or (
        request.content_length is not None and request.content_length >= zerocopy.SPLICE_MIN
    )
    if looked:
        replaced = await backend.file_size(physical)
    limits = await _limits(request, scope, tenant, replaced)
    if request.content_length is not None:
        limits.check(request.content_length)  # before a byte of the body is read
    if "If-Match" in headers:
        raise BadRequest("If-Match is not supported on uploads; use If-None-Match: *")
    if_none_match = headers.get("If-None-Match")
    if if_none_match is not None and if_none_match.strip() != "*":
        raise BadRequest("on uploads only If-None-Match: * (create only) is supported")
    content_type = headers.get("Content-Type")
    if content_type is not None and not _CONTENT_TYPE.fullmatch(content_type):
        raise BadRequest("Content-Type is not a valid media type")
    read_timeout = request.app[CONFIG]["server.read-timeout"]
    body = _Body(request, limits, read_timeout)
    options: dict[str, Any] = {
        "content_type": content_type,
        "metadata": _metadata(headers),
        "exclusive": if_none_match is not None,
    }
    # A large body with no checksum to verify on the way goes from socket to disk in the
    # kernel (local backend); anything else streams through here.
    socket_body = None
    if backend.splices_sockets and body.md5 is None and body.sha256 is None:
        socket_body = zerocopy.take_body(request, read_timeout)
    try:
        if socket_body is not None:
            info = await backend.write_socket_body(physical, socket_body, **options)
            request[zerocopy.TAKEN].stored = True
        elif looked:
            info = await backend.write(physical, body.chunks(), **options)
        else:
            info, replaced = await backend.write_replacing(physical, body.chunks(), **options)
    except FileExistsError:
        raise PreconditionFailed("If-None-Match: * and an object exists at this key") from None
    except EOFError:
        raise zerocopy.body_ended_early() from None
    request.app[USAGE].add(scope.tenant, info.size - (replaced or 0), 1 if replaced is None else 0)
    key = keys.unresolve(scope, physical)
    etag = quote_etag(info.etag)
    return web.json_response(
        {"uri": keys.make_uri(key), "key": key, "size": info.size, "etag": etag},
        status=201,
        headers={"ETag": etag} if etag else None,
        dumps=encode_text,
    )


# -- download ----------------------------------------------------------------------------


def _object_headers(info: Info) -> dict[str, str]:
    headers = {
        "Content-Type": info.content_type or "application/octet-stream",
        "Accept-Ranges": "bytes",
        **DOWNLOAD_HEADERS,
    }
    etag = quote_etag(info.etag)
    if etag:
        headers["ETag"] = etag
    modified = http_date(info.mtime)
    if modified:
        headers["Last-Modified"] = modified
    for name, value in info.metadata.items():
        headers[f"X-Meta-{name}"] = value
    return headers


# Times a download re-opens an object that was replaced between its HEAD and its first byte.
OPEN_ATTEMPTS: Final = 3


async def get_file(request: web.Request, scope: Scope, raw_key: str | None) -> web.StreamResponse:
    physical = _key(scope, raw_key)
    for attempt in range(OPEN_ATTEMPTS):
        reader = await _backend(request).open_read(physical)
        try:
            return await _send(request, physical, reader)
        except _Replaced:
            if attempt == OPEN_ATTEMPTS - 1:
                raise StorageUnavailable("the object kept changing while being read") from None
        finally:
            await reader.close()
    raise AssertionError("unreachable")


class _Replaced(Exception):
    """The object changed between its metadata and its first byte (S3 pins reads by ETag)."""


async def _send(request: web.Request, physical: str, reader: Reader) -> web.StreamResponse:
    """Answer with the object ``reader`` holds; raise ``_Replaced`` before any byte is sent."""
    info = reader.info
    headers = _object_headers(info)
    name = physical.rsplit("/", 1)[-1]
    headers["Content-Disposition"] = "attachment; filename*=UTF-8''" + quote(name, safe="")
    if evaluate(request.headers, info) == NOT_MODIFIED:
        keep = ("ETag", "Last-Modified")
        return web.Response(status=304, headers={k: headers[k] for k in keep if k in headers})
    byte_range = select_range(request.headers, info)
    start, end = (0, info.size) if byte_range is None else (byte_range.start, byte_range.end)
    status = 200 if byte_range is None else 206
    if byte_range is not None:
        headers["Content-Range"] = byte_range.content_range(info.size)
    if request.method != "HEAD" and end - start <= WHOLE_BODY_MAX:
        # A small body is read first and goes out with its headers in one write.
        chunks = reader.chunks(start, end)
        data = [await _first(chunks)] if end > start else []
        data += [chunk async for chunk in chunks]
        return web.Response(status=status, headers=headers, body=b"".join(data))
    response = web.StreamResponse(status=status, headers=headers)
    response.content_length = end - start
    if request.method == "HEAD":
        await response.prepare(request)
    elif (fd := reader.fileno()) is not None and zerocopy.usable(request):
        # A local file: the kernel sends it (nothing to prefetch, the file is open).
        await response.prepare(request)
        timeout = request.app[CONFIG]["server.read-timeout"]
        sending = zerocopy.send_file(request, fd, start, end - start, timeout)
        if not await _after_headers(request, sending):
            return response
    else:
        chunks = reader.chunks(start, end)
        # The first bytes are fetched before the status line is sent: a store failing here
        # still gets an honest error answer (or a retry, if the object was replaced).
        first = await _first(chunks)
        await response.prepare(request)
        if not await _after_headers(request, _write_all(response, first, chunks)):
            return response
    await response.write_eof()
    return response


async def _first(chunks: AsyncIterator[bytes]) -> bytes:
    try:
        return await anext(chunks)
    except ConnectionError as exc:
        if exc.errno == errno.EAGAIN:  # the backend's "replaced since opened"
            raise _Replaced from exc
        raise


async def _write_all(
    response: web.StreamResponse, first: bytes, chunks: AsyncIterator[bytes]
) -> None:
    await response.write(first)
    async for chunk in chunks:
        await response.write(chunk)


async def _after_headers(request: web.Request, sending: Coroutine[Any, Any, None]) -> bool:
    """Run ``sending``, the body of a response whose status line is already out; say if it
    finished (if not, the connection is cut)."""
    try:
        await sending
    except Exception as exc:
        # The status line is out: the only honest signal left is to cut the connection,
        # so the client sees a short body instead of a well-formed lie (RFC 9112, 9.6).
        log.warning("download of %s broke after its headers: %r", request.path, exc)
        if request.transport is not None:
            request.transport.abort()
        return False
    return True


# -- metadata, listing, directories, delete, move ------------------------------------------


async def stat(request: web.Request, scope: Scope, raw_key: str | None) -> web.Response:
    physical = keys.resolve_dir(scope, raw_key or "")
    try:
        info = await _backend(request).info(physical)
    except FileNotFoundError:
        if physical != scope.root:
            raise
        info = Info(physical, DIRECTORY)  # a tenant's root exists before its first file
    return web.json_response(file_attributes(scope, info))


def _cursor_in(scope: Scope, value: str | None) -> str | None:
    if not value:
        return None
    try:
        padded = value + "=" * (-len(value) % 4)
        relative = base64.b64decode(padded, altchars=b"-_", validate=True).decode("utf-8")
    except (ValueError, binascii.Error):
        raise BadRequest("the cursor is not one this gateway gave") from None
    return scope.prefix + relative


def _cursor_out(scope: Scope, physical: str | None) -> str | None:
    if physical is None:
        return None
    relative = physical[len(scope.prefix) :]
    return base64.urlsafe_b64encode(relative.encode("utf-8")).decode("ascii").rstrip("=")


def _int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    value = request.query.get(name)
    if value is None:
        return default
    if not value.isdigit() or not low <= int(value) <= high:
        raise BadRequest(f"{name} must be an integer from {low} to {high}")
    return int(value)


def _flag(request: web.Request, name: str) -> bool:
    # Exactly the two spellings of an OpenAPI boolean: a flag that deletes a whole directory
    # is not guessed from "", "1" or "yes".
    value = request.query.get(name, "false")
    if value in {"true", "false"}:
        return value == "true"
    raise BadRequest(f"{name} must be true or false")


def _skip_past(physical: str) -> str:
    """Given a reserved top-level name, return a cursor after everything below it."""
    top = physical.split("/", 1)[0]
    return top + "/\U0010ffff"


async def list_dir(request: web.Request, scope: Scope, raw_key: str | None) -> web.Response:
    physical = keys.resolve_dir(scope, raw_key or "")
    recursive = _flag(request, "recursive")
    limit = _int_param(request, "limit", MAX_LIST_LIMIT, 1, MAX_LIST_LIMIT)
    cursor = _cursor_in(scope, request.query.get("cursor"))
    backend = _backend(request)
    entries: list[dict[str, Any]] = []
    while True:
        try:
            page = await backend.list(
                physical, recursive=recursive, limit=limit - len(entries), start_after=cursor
            )
        except FileNotFoundError:
            if physical != scope.root:
                raise
            page = Page([], None)  # a tenant's root exists before its first file
        for info in page.entries:
            if keys.visible(scope, info.name):
                entries.append(file_attributes(scope, info, listed=True))
        cursor = page.next_cursor
        # The null tenant's root holds every tenant's folder: a recursive listing of it
        # jumps over the reserved prefixes instead of paging through other tenants' keys.
        if cursor is not None and scope.tenant is None and not keys.visible(scope, cursor):
            cursor = _skip_past(cursor)
        if cursor is None or len(entries) >= limit:
            break
    return web.json_response({"entries": entries, "cursor": _cursor_out(scope, cursor)})


async def make_directory(request: web.Request, scope: Scope, raw_key: str | None) -> web.Response:
    physical = _key(scope, raw_key)
    try:
        await _backend(request).mkdir(physical)
    except FileExistsError:
        raise Conflict("a file exists at this key") from None
    key = keys.unresolve(scope, physical)
    return web.json_response({"uri": keys.make_uri(key), "key": key}, status=201)


async def delete(request: web.Request, scope: Scope, raw_key: str | None) -> web.Response:
    physical = _key(scope, raw_key)
    backend = _backend(request)
    usage = request.app[USAGE]
    if _flag(request, "recursive"):
        info = await backend.info(physical)
        if info.is_dir:
            size = 0
            async for page in walk_files(backend, scope, physical):  # for the usage counters
                size += sum(entry.size for entry in page)
            count = await backend.delete_prefix(physical)
            usage.add(scope.tenant, -size, -count)
            return web.json_response({"deleted": count})
    gone = await backend.file_size(physical)
    try:
        await backend.delete(physical)
    except IsADirectoryError:
        raise Conflict("a directory is at this key; delete it with ?recursive=true") from None
    if gone is not None:
        usage.add(scope.tenant, -gone, -1)
    return web.Response(status=204)


def _key_or_uri(value: object, field: str) -> str:
    if not isinstance(value, str):
        raise BadRequest(f"{field} must be a key or a kestra:/// URI")
    return keys.parse_uri(value) if value[:7].lower() == "kestra:" else value


async def read_json(request: web.Request) -> dict[str, Any]:
    """Given a request with a JSON object body, return it, or raise ``BadRequest``."""
    try:
        body = await request.json(loads=json.loads)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


async def move(request: web.Request, scope: Scope, raw_key: str | None) -> web.Response:
    if raw_key:
        raise BadRequest('name the keys in the body: {"from": ..., "to": ...}')
    body = await read_json(request)
    src = keys.resolve(scope, _key_or_uri(body.get("from"), "from"))
    dst = keys.resolve(scope, _key_or_uri(body.get("to"), "to"))
    note_key(request, f"{keys.unresolve(scope, src)} -> {keys.unresolve(scope, dst)}")
    if dst == src or dst.startswith(src + "/"):
        raise BadRequest("a file or directory cannot be moved onto or into itself")
    try:
        await _backend(request).move(src, dst)
    except FileExistsError:
        raise Conflict("the destination exists") from None
    key = keys.unresolve(scope, dst)
    return web.json_response({"uri": keys.make_uri(key), "key": key})

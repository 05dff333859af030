"""The async client: one ``aiohttp`` session, the gateway's object API as methods.

Retries (with exponential backoff and jitter, ``Retry-After`` honoured) follow one rule: an
operation is retried on a connection failure or a 503 only when running it twice has the
effect of running it once, and the request can be sent again byte for byte:

- downloads, ``stat``, ``list``, ``exists``: always (RFC 9110, 9.2.2: safe methods);
- ``delete`` and ``mkdir``: always (idempotent; a retried delete that finds the key gone
  after a first attempt that did delete it raises ``NotFound``, which callers of a
  best-effort delete can ignore);
- ``upload``: when the body can be replayed: bytes, a path, a seekable file object (sent
  again from the position it had). An async iterator or a non-seekable file is read once,
  so such an upload is never retried. (A create-only upload retried after a first attempt
  that did store the object, its answer lost, gets ``PreconditionFailed``: compare the ETag
  with ``stat`` when that matters.)
- ``move``: never (a second attempt after a first that succeeded would fail or, worse, move
  something else).
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import random
import secrets
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final, Literal, TypeVar
from urllib.parse import quote

import aiohttp
from yarl import URL

from .. import keys
from ..errors import InvalidKey as _ServerInvalidKey
from .errors import APIError, InvalidKey, NotFound, TransportError, from_answer

T = TypeVar("T")

CHUNK: Final = 1 << 20
"""Bytes read from a file or the network at a time: what an upload or download holds."""
DEFAULT_RETRIES: Final = 3
DEFAULT_BACKOFF: Final = 0.5
MAX_BACKOFF: Final = 10.0
ENV_URL: Final = "GATEWAY_URL"
ENV_TENANT: Final = "GATEWAY_TENANT"
ENV_TOKEN: Final = "GATEWAY_TOKEN"
ENV_USERNAME: Final = "GATEWAY_USERNAME"
ENV_PASSWORD: Final = "GATEWAY_PASSWORD"
_TRANSPORT_ERRORS: Final = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError)

Progress = Callable[[int], object]
"""Called with the number of bytes moved since the last call."""
UploadSource = (
    bytes | bytearray | memoryview | str | os.PathLike[str] | IO[bytes] | AsyncIterable[bytes]
)


@dataclass(frozen=True, slots=True)
class FileInfo:
    """A file's or directory's attributes, as ``stats`` and ``list`` answer (Kestra's names)."""

    key: str
    type: Literal["File", "Directory"]
    size: int
    last_modified: float | None  # seconds since the epoch
    created: float | None
    etag: str | None = None
    content_type: str | None = None  # ``stat`` only: listings leave it out (``None``)
    metadata: Mapping[str, str] | None = None  # ``stat`` only: listings leave it out

    @property
    def is_dir(self) -> bool:
        return self.type == "Directory"

    @property
    def uri(self) -> str:
        return keys.make_uri(self.key) if self.key else "kestra:///"

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FileInfo:
        def seconds(value: object) -> float | None:
            return value / 1000 if isinstance(value, (int, float)) else None

        return cls(
            key=str(data.get("key", "")),
            type="Directory" if data.get("type") == "Directory" else "File",
            size=int(data.get("size") or 0),
            last_modified=seconds(data.get("lastModifiedTime")),
            created=seconds(data.get("creationTime")),
            etag=data.get("etag"),
            content_type=data.get("contentType"),
            metadata=dict(data["metadata"]) if isinstance(data.get("metadata"), dict) else None,
        )

    def to_json(self) -> dict[str, Any]:
        """Return the attributes as JSON, leaving out those the gateway did not give."""
        values = {
            "key": self.key,
            "uri": self.uri,
            "type": self.type,
            "size": self.size,
            "lastModified": self.last_modified,
            "created": self.created,
            "etag": self.etag,
            "contentType": self.content_type,
            "metadata": None if self.metadata is None else dict(self.metadata),
        }
        return {name: value for name, value in values.items() if value is not None}


@dataclass(frozen=True, slots=True)
class Uploaded:
    """The gateway's answer to an upload."""

    key: str
    uri: str
    size: int
    etag: str | None


@dataclass(frozen=True, slots=True)
class ObjectHeaders:
    """What a download's headers say about the object (and the part being sent)."""

    status: int
    size: int  # of the whole object
    length: int  # of this answer's body
    etag: str | None
    content_type: str | None
    last_modified: str | None
    metadata: Mapping[str, str]

    @classmethod
    def from_response(cls, response: aiohttp.ClientResponse) -> ObjectHeaders:
        headers = response.headers
        length = response.content_length or 0
        size = length
        content_range = headers.get("Content-Range", "")
        if "/" in content_range:
            total = content_range.rsplit("/", 1)[1]
            size = int(total) if total.isdigit() else length
        metadata = {
            name[len("X-Meta-") :].lower(): value
            for name, value in headers.items()
            if name.lower().startswith("x-meta-")
        }
        return cls(
            status=response.status,
            size=size,
            length=length,
            etag=headers.get("ETag"),
            content_type=headers.get("Content-Type"),
            last_modified=headers.get("Last-Modified"),
            metadata=metadata,
        )


def to_key(key_or_uri: str) -> str:
    """Given a logical key or a ``kestra://`` URI (either form), return the logical key.

    Only the URI is parsed here (the same ``keys.parse_uri`` the gateway uses); the key
    itself is checked by the gateway, which is the authority on what it refuses.
    """
    if key_or_uri[:7].lower() != "kestra:":
        return key_or_uri
    try:
        return keys.parse_uri(key_or_uri)
    except _ServerInvalidKey as exc:
        raise InvalidKey(exc.message, status=400, code="invalid_key", rule=exc.rule) from None


def range_header(start: int | None, end: int | None) -> str | None:
    """Given Python-style ``start``/``end`` (end exclusive; a negative start counts from the
    end), return an HTTP ``Range`` value (RFC 9110, 14.1.2), or ``None`` for the whole."""
    if start is None and end is None:
        return None
    if start is not None and start < 0:
        if end is not None:
            raise ValueError("a range from the end (negative start) takes no end")
        return f"bytes={start}"  # "bytes=-N": the last N bytes
    first = start or 0
    if end is None:
        return f"bytes={first}-"
    if end <= first:
        raise ValueError("an empty range")
    return f"bytes={first}-{end - 1}"


class _Body:
    """An upload's body: how to (re)start sending it, its length, whether it can be replayed."""

    def __init__(self, source: UploadSource, progress: Progress | None, size: int | None) -> None:
        self.source = source
        self.progress = progress
        self.length: int | None = size
        self.replayable = True
        self._offset = 0
        if isinstance(source, (bytes, bytearray, memoryview)):
            self.length = len(source)
        elif isinstance(source, (str, os.PathLike)):
            self.length = os.stat(source).st_size
        elif hasattr(source, "read"):
            file: IO[bytes] = source  # type: ignore[assignment]
            if file.seekable():
                self._offset = file.tell()
                self.length = file.seek(0, os.SEEK_END) - self._offset
                file.seek(self._offset)
            else:
                self.replayable = False
        else:
            self.replayable = False
        self._used = False
        self._reported = 0  # bytes reported to ``progress`` by the current attempt

    def data(self) -> Any:
        """Return what aiohttp sends for one attempt (a new stream each time, if replayable)."""
        if self._used and not self.replayable:
            raise RuntimeError("a one-shot body cannot be sent twice")
        self._used = True
        return self._counted(self.length, self.progress)

    async def _counted(self, length: int | None, progress: Progress | None) -> AsyncIterator[bytes]:
        """Yield the body's chunks, reporting progress (rewound when a retry starts over), and
        raise if they do not add up to the announced ``length``: a body that ends short or
        runs long must abort the upload (the gateway stores nothing), not end it cleanly."""
        if progress is not None and self._reported:
            progress(-self._reported)
            self._reported = 0
        sent = 0
        async for chunk in self._chunks():
            sent += len(chunk)
            if length is not None and sent > length:
                raise OSError(errno.EIO, "the body grew while being sent (over its length)")
            if progress is not None and chunk:
                progress(len(chunk))
                self._reported += len(chunk)
            yield chunk
        if length is not None and sent < length:
            raise OSError(errno.EIO, "the body shrank while being sent (under its length)")

    async def _chunks(self) -> AsyncIterator[bytes]:
        source = self.source
        if isinstance(source, (bytes, bytearray, memoryview)):
            view = memoryview(source)
            for start in range(0, len(view), CHUNK):
                yield bytes(view[start : start + CHUNK])
        elif isinstance(source, (str, os.PathLike)):
            with open(source, "rb") as file:
                async for chunk in _read_file(file):
                    yield chunk
        elif hasattr(source, "read"):
            stream: IO[bytes] = source  # type: ignore[assignment]
            if self.replayable:
                stream.seek(self._offset)
            async for chunk in _read_file(stream):
                yield chunk
        else:
            async for chunk in source:
                yield bytes(chunk)

    async def sha256(self) -> str:
        """Return the hex SHA-256 of a replayable body (one extra pass over it)."""
        if not self.replayable:
            raise ValueError(
                "checksum=True needs a body that can be read twice (bytes, a path, a seekable "
                "file); pass the SHA-256 as checksum='<hex>' instead"
            )
        digest = hashlib.sha256()
        async for chunk in self._chunks():
            digest.update(chunk)
        return digest.hexdigest()


async def _read_file(file: IO[bytes]) -> AsyncIterator[bytes]:
    while chunk := await asyncio.to_thread(file.read, CHUNK):
        yield chunk


class BodyBroken(TransportError):
    """The connection broke while a download's body was being read (the download is retried
    whole when it is idempotent)."""


class Download:
    """An open download: its ``headers``, then its body as chunks (read once)."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.headers = ObjectHeaders.from_response(response)

    async def chunks(self, size: int = CHUNK) -> AsyncIterator[bytes]:
        try:
            async for chunk in self.response.content.iter_chunked(size):
                yield chunk
        except _TRANSPORT_ERRORS as exc:
            raise BodyBroken(f"the download broke: {exc!r}") from exc

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks()])

    def close(self) -> None:
        """Give the connection back (or drop it, if the body was not read to its end)."""
        self.response.release()

    async def __aenter__(self) -> Download:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """An async client of the gateway's object API.

    Parameters
    ----------
    url:
        The gateway's base URL (``http://127.0.0.1:8080``); default ``$GATEWAY_URL``.
    tenant:
        The tenant id, or ``None`` for the default (null) tenant; default ``$GATEWAY_TENANT``.
    token:
        A service account's token (``Authorization: Bearer``); default ``$GATEWAY_TOKEN``.
    username, password:
        Basic credentials instead of a token; default ``$GATEWAY_USERNAME``/``$GATEWAY_PASSWORD``.
    retries:
        Further attempts of a retryable operation after a connection failure or a 503.
    backoff:
        Seconds before the first retry; doubled for each next one (with jitter, at most 10 s).
    connect_timeout, read_timeout:
        Seconds to connect; seconds a response may stay silent (``None``: no limit).
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        tenant: str | None = None,
        token: str | None = None,
        username: str | None = None,
        password: str | None = None,
        retries: int = DEFAULT_RETRIES,
        backoff: float = DEFAULT_BACKOFF,
        connect_timeout: float = 30.0,
        read_timeout: float | None = 300.0,
    ) -> None:
        url = url or os.environ.get(ENV_URL)
        if not url:
            raise ValueError(f"no gateway URL: pass url= or set {ENV_URL}")
        self.url = url.rstrip("/")
        self.tenant = tenant if tenant is not None else (os.environ.get(ENV_TENANT) or None)
        token = token if token is not None else os.environ.get(ENV_TOKEN)
        username = username if username is not None else os.environ.get(ENV_USERNAME)
        password = password if password is not None else os.environ.get(ENV_PASSWORD)
        self._headers: dict[str, str] = {}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        elif username:
            self._headers["Authorization"] = aiohttp.encode_basic_auth(username, password or "")
        self.retries = retries
        self.backoff = backoff
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout, sock_read=read_timeout
        )
        self._session: aiohttp.ClientSession | None = None

    # -- life cycle ----------------------------------------------------------------------

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # Proxies from the environment are honoured (trust_env), as curl does.
            self._session = aiohttp.ClientSession(
                headers=self._headers, timeout=self._timeout, trust_env=True
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- the object API ------------------------------------------------------------------

    async def upload(
        self,
        key: str,
        source: UploadSource,
        *,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
        checksum: str | bool | None = None,
        create_only: bool = False,
        size: int | None = None,
        progress: Progress | None = None,
    ) -> Uploaded:
        """Upload ``source`` (bytes, a path, a binary file object or an async iterator of
        bytes) to ``key``, streamed in chunks of 1 MiB.

        ``checksum``: a SHA-256 (hex or base64) the gateway verifies, or ``True`` to compute
        it from a replayable source first; a mismatch stores nothing (``ChecksumMismatch``).
        ``create_only``: fail with ``PreconditionFailed`` if the key exists. ``size``: the
        length of an async iterator's body, if known (sent as ``Content-Length``).
        """
        body = _Body(source, progress, size)
        headers = {f"X-Meta-{name}": value for name, value in (metadata or {}).items()}
        headers["Content-Type"] = content_type or "application/octet-stream"
        if body.length is not None:
            headers["Content-Length"] = str(body.length)
        if checksum is True:
            headers["X-Checksum-Sha256"] = await body.sha256()
        elif isinstance(checksum, str):
            headers["X-Checksum-Sha256"] = checksum
        if create_only:
            headers["If-None-Match"] = "*"
        async with await self._request(
            "PUT", "files", key, headers=headers, body=body.data, retry=body.replayable
        ) as response:
            answer = await response.json()
        return Uploaded(answer["key"], answer["uri"], answer["size"], answer.get("etag"))

    async def open(
        self,
        key: str,
        *,
        start: int | None = None,
        end: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Download:
        """Start downloading ``key`` (bytes ``start`` to ``end``, end exclusive) and return the
        open ``Download`` (``async with`` it, or ``close()`` it when done)."""
        sent = dict(headers or {})
        value = range_header(start, end)
        if value is not None:
            sent["Range"] = value
        response = await self._request("GET", "files", key, headers=sent, retry=True)
        return Download(response)

    async def head(self, key: str) -> ObjectHeaders:
        """Return what a download of ``key`` would say about it, without its body (HEAD)."""
        async with await self._request("HEAD", "files", key, retry=True) as response:
            return ObjectHeaders.from_response(response)

    async def read(self, key: str, *, start: int | None = None, end: int | None = None) -> bytes:
        """Return the bytes of ``key`` (or of the range ``start``:``end``)."""

        async def once() -> bytes:
            async with await self.open(key, start=start, end=end) as download:
                return await download.read()

        return await self._retrying(once)

    async def download(
        self,
        key: str,
        path: str | os.PathLike[str],
        *,
        start: int | None = None,
        end: int | None = None,
        progress: Progress | None = None,
    ) -> ObjectHeaders:
        """Download ``key`` (or a range of it) into the file ``path``, streamed.

        The bytes go to a temporary file beside ``path``, renamed over it once complete: a
        failed download leaves ``path`` as it was. A download that breaks is started over.
        """
        target = Path(path)
        reported = 0

        async def once() -> ObjectHeaders:
            nonlocal reported
            if progress is not None and reported:
                progress(-reported)  # a retry starts over
                reported = 0
            # A name of its own ("x": created here, never someone else's file).
            partial = target.with_name(f".{target.name}.{secrets.token_hex(6)}.part")
            async with await self.open(key, start=start, end=end) as download:
                try:
                    with open(partial, "xb") as file:
                        async for chunk in download.chunks():
                            await asyncio.to_thread(file.write, chunk)
                            if progress is not None:
                                progress(len(chunk))
                                reported += len(chunk)
                    os.replace(partial, target)
                finally:
                    partial.unlink(missing_ok=True)
            return download.headers

        return await self._retrying(once)

    async def stat(self, key: str = "") -> FileInfo:
        """Return the attributes of the file or directory ``key`` (``""``: the root)."""
        async with await self._request("GET", "stats", key, retry=True) as response:
            return FileInfo.from_json(await response.json())

    async def exists(self, key: str) -> bool:
        try:
            await self.stat(key)
        except NotFound:
            return False
        return True

    async def list(
        self, key: str = "", *, recursive: bool = False, page_size: int = 1000
    ) -> AsyncIterator[FileInfo]:
        """Yield the entries under the directory ``key``, page after page (``page_size``)."""
        cursor: str | None = None
        while True:
            params = {"recursive": "true" if recursive else "false", "limit": str(page_size)}
            if cursor:
                params["cursor"] = cursor
            async with await self._request(
                "GET", "list", key, params=params, retry=True
            ) as response:
                page = await response.json()
            for entry in page["entries"]:
                yield FileInfo.from_json(entry)
            cursor = page.get("cursor")
            if not cursor:
                return

    async def delete(self, key: str, *, recursive: bool = False) -> int:
        """Delete the file ``key`` (or, with ``recursive``, the directory); return the count."""
        params = {"recursive": "true"} if recursive else None
        async with await self._request(
            "DELETE", "files", key, params=params, retry=True
        ) as response:
            if response.status == 204:
                return 1
            return int((await response.json()).get("deleted", 0))

    async def mkdir(self, key: str) -> None:
        """Make the directory ``key`` and its parents."""
        async with await self._request("POST", "directories", key, retry=True):
            pass

    async def move(self, source: str, destination: str) -> str:
        """Move a file or directory within the tenant; return the new key (never retried)."""
        payload = {"from": to_key(source), "to": to_key(destination)}
        async with await self._request("POST", "move", "", json=payload, retry=False) as response:
            answer = await response.json()
        return str(answer["key"])

    # -- the one request function ---------------------------------------------------------

    def route_url(self, route: str, key: str) -> URL:
        """Given a route word and a key (or URI), return the request URL, escaped once."""
        base = f"{self.url}/api/v1/"
        if self.tenant:
            base += quote(self.tenant, safe="") + "/"
        base += route
        logical = to_key(key) if key else ""
        if logical:
            # Every byte outside the unreserved set is escaped; the gateway decodes once.
            base += "/" + quote(logical, safe="/")
        return URL(base, encoded=True)

    async def _request(
        self,
        method: str,
        route: str,
        key: str,
        *,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        body: Callable[[], Any] | None = None,
        json: Any = None,
        retry: bool,
    ) -> aiohttp.ClientResponse:
        """Send one request (again, if ``retry``, on a connection failure or a 503); return the
        response of a 2xx answer, or raise the ``APIError`` of the gateway's answer."""
        url = self.route_url(route, key)
        if params:
            url = url.with_query(params)
        attempt = 0
        while True:
            retry_after: float | None = None
            try:
                response = await self.session.request(
                    method,
                    url,
                    headers=headers,
                    data=body() if body is not None else None,
                    json=json,
                )
            except _TRANSPORT_ERRORS as exc:
                if not retry or attempt >= self.retries:
                    # A body that failed to read says why (aiohttp wraps it as a write error).
                    cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
                    raise TransportError(f"{method} {route}: {cause}") from exc
            else:
                if response.status < 400:
                    return response
                error = await _error_of(response)
                if response.status != 503 or not retry or attempt >= self.retries:
                    raise error
                retry_after = _seconds(response.headers.get("Retry-After"))
            await asyncio.sleep(self._delay(attempt, retry_after))
            attempt += 1

    async def _retrying(self, operation: Callable[[], Awaitable[T]]) -> T:
        """Run an idempotent ``operation`` again when its body breaks mid-way (the request
        itself is already retried by ``_request``)."""
        attempt = 0
        while True:
            try:
                return await operation()
            except BodyBroken:
                if attempt >= self.retries:
                    raise
            await asyncio.sleep(self._delay(attempt, None))
            attempt += 1

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, MAX_BACKOFF)
        # "Full jitter": replicas of a worker that failed together do not retry together.
        return random.uniform(0, min(MAX_BACKOFF, self.backoff * 2**attempt))


async def _error_of(response: aiohttp.ClientResponse) -> APIError:
    try:
        body: Any = await response.json(content_type=None)
    except (ValueError, aiohttp.ClientError):
        body = None
    finally:
        response.release()
    return from_answer(response.status, body, response.reason or "")


def _seconds(value: str | None) -> float | None:
    return float(value) if value is not None and value.isdigit() else None

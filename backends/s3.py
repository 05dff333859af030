"""Objects in an S3 bucket (AWS, MinIO, Ceph, ...) through s3fs's async client.

Physical key ``k`` is the object ``<path>/k`` of the bucket (``k`` when no ``path`` is set).
Directories are prefixes: a directory exists while some object lies below it, or while its
marker, the empty object ``k/`` that ``mkdir`` writes, does. Markers never show as files.

Requests go through ``S3FileSystem._call_s3`` (s3fs's retries and its filtering of arguments);
every error that comes out is turned into a builtin by ``_translate`` from one flat table,
keeping the provider's exception as ``__cause__``.

What S3 cannot promise (see the conformance suite's capability flags):

- no empty directories once their files are gone, unless ``mkdir`` left a marker;
- no "a parent is a file" checks: a file ``a`` and a file ``a/b`` may both exist;
- ``move`` is a copy then a delete, per object, and checks the destination with a HEAD
  (not race-free); ``write(exclusive=True)`` is race-free where the store honours
  ``If-None-Match: *`` (AWS, MinIO, Ceph Squid and later, moto).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import builtins
import contextlib
import errno
import logging
import re
import time
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Callable,
    Coroutine,
    Iterable,
    Mapping,
    Sequence,
)
from datetime import datetime
from types import MappingProxyType
from typing import Any, ClassVar, Final, NoReturn, TypeVar

import aiohttp
import botocore.exceptions
import s3fs

from ._metadata import normalise_metadata
from .base import (
    DIRECTORY,
    EMPTY_METADATA,
    FILE,
    Backend,
    Info,
    Page,
    Reader,
    no_space,
    same_version,
    sort_key,
)

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

MiB: Final = 1024 * 1024
GiB: Final = 1024 * MiB

MIN_PART_SIZE: Final = 5 * MiB
"""S3's smallest part (all parts of a multipart upload but the last)."""
MAX_PART_SIZE: Final = 5 * GiB
MAX_PARTS: Final = 10_000
MAX_COPY_SIZE: Final = 5 * GiB
"""Above this, CopyObject refuses and the copy goes part by part (UploadPartCopy)."""
COPY_PART_SIZE: Final = 512 * MiB

LIST_PAGE: Final = 1000
"""S3 returns at most 1,000 keys per listing and deletes at most 1,000 per DeleteObjects."""
READ_CHUNK: Final = 1 * MiB
READ_RESUMES: Final = 3
"""How often a read that broke off mid-body is resumed (at the same version) before failing."""
COPY_CONCURRENCY: Final = 16
MAX_POOL_CONNECTIONS: Final = 64
STALE_UPLOAD_AGE: Final = 24 * 3600.0
"""Multipart uploads older than this at start-up were left by a crash and are aborted."""

DEFAULT_CONTENT_TYPE: Final = "binary/octet-stream"
"""What S3 reports for an object stored without a content type (reported back as ``None``)."""

_ENCODED_WORD: Final = re.compile(r"=\?UTF-8\?B\?([A-Za-z0-9+/=]*)\?=", re.IGNORECASE)
_PLAIN_VALUE: Final = re.compile(r"(?:[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?)?")

# Characters XML 1.0 cannot carry. S3 echoes StartAfter in its XML answer, and some stores
# (moto, for one) fail with a 500 when it holds one of these.
_NOT_XML: Final = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")

_Factory = Callable[[str], OSError]


def _enoent(message: str) -> OSError:
    return FileNotFoundError(errno.ENOENT, message)


def _eacces(message: str) -> OSError:
    return PermissionError(errno.EACCES, message)


def _errno(code: int) -> _Factory:
    def factory(message: str) -> OSError:
        return OSError(code, message)

    return factory


def _unavailable(message: str) -> OSError:
    return ConnectionError(errno.EAGAIN, message)


# S3 error codes (and bare HTTP statuses, which is all a HEAD answer carries) to builtins.
# A missing bucket is a broken store, not a missing object: a plain OSError(ENXIO), so the
# HTTP layer does not answer 404 for a misconfiguration. PreconditionFailed depends on the
# condition and is handled in _translate.
ERRORS: Final[Mapping[str, _Factory]] = MappingProxyType(
    {
        "NoSuchKey": _enoent,
        "NotFound": _enoent,
        "404": _enoent,
        "NoSuchUpload": _enoent,
        "NoSuchBucket": _errno(errno.ENXIO),
        "403": _eacces,
        "AccessDenied": _eacces,
        "AllAccessDisabled": _eacces,
        "AccountProblem": _eacces,
        "InvalidAccessKeyId": _eacces,
        "SignatureDoesNotMatch": _eacces,
        "ExpiredToken": _eacces,
        "InvalidToken": _eacces,
        "TokenRefreshRequired": _eacces,
        "RequestTimeTooSkewed": _eacces,
        # Another conditional write to the key is in flight (S3's answer to racing
        # If-None-Match writes): someone else is creating the object.
        "ConditionalRequestConflict": lambda m: FileExistsError(errno.EEXIST, m),
        "EntityTooLarge": _errno(errno.EFBIG),
        "KeyTooLongError": _errno(errno.ENAMETOOLONG),
        "MetadataTooLarge": _errno(errno.EINVAL),
        "InvalidRange": _errno(errno.EINVAL),
        "QuotaExceeded": lambda m: no_space(m),  # Ceph RGW
        "XMinioStorageFull": lambda m: no_space(m),
        "XMinioAdminBucketQuotaExceeded": lambda m: OSError(errno.EDQUOT, m),
        "500": _unavailable,
        "502": _unavailable,
        "503": _unavailable,
        "504": _unavailable,
        "InternalError": _unavailable,
        "ServiceUnavailable": _unavailable,
        "SlowDown": _unavailable,
        "OperationAborted": _unavailable,
        "RequestTimeout": lambda m: TimeoutError(errno.ETIMEDOUT, m),
    }
)

_CREDENTIAL_ERRORS: Final = (
    botocore.exceptions.NoCredentialsError,
    botocore.exceptions.PartialCredentialsError,
    botocore.exceptions.CredentialRetrievalError,
    botocore.exceptions.TokenRetrievalError,
)
_TIMEOUTS: Final = (
    TimeoutError,
    botocore.exceptions.ReadTimeoutError,
    botocore.exceptions.ConnectTimeoutError,
)
_CONNECTION_ERRORS: Final = (
    ConnectionError,
    botocore.exceptions.ConnectionError,
    botocore.exceptions.HTTPClientError,
    botocore.exceptions.IncompleteReadError,
    aiohttp.ClientError,
)
# What may break a response body part way; the read resumes where it stopped.
_STREAM_ERRORS: Final = (
    *_TIMEOUTS,
    *_CONNECTION_ERRORS,
)


def _client_error(exc: BaseException) -> botocore.exceptions.ClientError | None:
    """Given an exception from s3fs, return the ClientError behind it, if any."""
    if isinstance(exc, botocore.exceptions.ClientError):
        return exc
    if isinstance(exc.__cause__, botocore.exceptions.ClientError):
        return exc.__cause__  # s3fs's translate_boto_error keeps it as the cause
    return None


# Operations whose only precondition is "If-None-Match: *" (create only).
_CREATE_ONLY_OPS: Final = frozenset({"put_object", "complete_multipart_upload"})


def _translate(exc: Exception, *, op: str, key: str) -> OSError:
    """Given an exception from a request for ``key``, return the builtin to raise instead.

    The message names the operation and the key, never credentials or the endpoint; the
    provider's exception is chained by the caller (``raise ... from``).
    """
    what = f"S3 {op} of {key!r}" if key else f"S3 {op}"
    error = _client_error(exc)
    if error is not None:
        details = error.response.get("Error", {})
        code = str(details.get("Code", ""))
        message = str(details.get("Message") or code)
        if code in ("PreconditionFailed", "412"):
            if details.get("Condition") == "If-None-Match" or op in _CREATE_ONLY_OPS:
                return FileExistsError(errno.EEXIST, f"{what}: the object exists")
            during = "while reading" if op == "get_object" else "meanwhile"
            return ConnectionError(errno.EAGAIN, f"{what}: the object changed {during}")
        if op == "head_bucket" and code in ("404", "NotFound"):
            code = "NoSuchBucket"
        factory = ERRORS.get(code)
        if factory is None:
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            factory = _unavailable if status >= 500 else _errno(errno.EIO)
        return factory(f"{what}: {code}: {message}")
    if isinstance(exc, _TIMEOUTS):
        return TimeoutError(errno.ETIMEDOUT, f"{what}: timed out ({type(exc).__name__})")
    if isinstance(exc, _CREDENTIAL_ERRORS):
        return PermissionError(errno.EACCES, f"{what}: no usable credentials")
    if isinstance(exc, _CONNECTION_ERRORS):
        return ConnectionError(errno.ECONNABORTED, f"{what}: {type(exc).__name__}")
    if isinstance(exc, OSError) and type(exc).__module__ == "builtins":
        return exc
    return OSError(errno.EIO, f"{what}: {type(exc).__name__}")


def _reraise(exc: Exception, *, op: str, key: str) -> NoReturn:
    """Given the exception being handled, raise its builtin translation, chained to the
    provider's exception (or ``exc`` itself if it is a builtin already)."""
    translated = _translate(exc, op=op, key=key)
    if translated is exc:
        raise exc
    raise translated from (_client_error(exc) or exc)


def _normalise_path(path: str) -> str:
    """Given the configured key prefix, return it without surrounding slashes, or raise."""
    stripped = path.strip("/")
    if stripped and any(part in ("", ".", "..") for part in stripped.split("/")):
        raise ValueError(f"S3 storage 'path' has value {path!r}: empty, '.' or '..' segment")
    return stripped


def _encode_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """Given normalised user metadata, return it as S3 headers take it.

    S3 carries values in HTTP headers, which trim spaces and take ASCII only: a value that is
    not plain printable ASCII travels as an RFC 2047 encoded word (what S3 itself uses to
    report such values), and ``_decode_metadata`` turns it back.
    """
    encoded: dict[str, str] = {}
    for name, value in metadata.items():
        if _PLAIN_VALUE.fullmatch(value) and not _ENCODED_WORD.fullmatch(value):
            encoded[name] = value
        else:
            word = base64.b64encode(value.encode()).decode("ascii")
            encoded[name] = f"=?UTF-8?B?{word}?="
    return encoded


def _decode_metadata(metadata: Mapping[str, str] | None) -> Mapping[str, str]:
    """Given S3's user metadata of an object, return it as it was written."""
    if not metadata:
        return EMPTY_METADATA
    decoded: dict[str, str] = {}
    for name, value in metadata.items():
        match = _ENCODED_WORD.fullmatch(value)
        if match:
            with contextlib.suppress(binascii.Error, UnicodeDecodeError):
                value = base64.b64decode(match.group(1), validate=True).decode()
        decoded[name.lower()] = value
    return MappingProxyType(decoded)


def _timestamp(value: Any) -> float | None:
    return value.timestamp() if isinstance(value, datetime) else None


def _etag(value: Any) -> str | None:
    return value.strip('"') if isinstance(value, str) else None


def _content_type(value: Any) -> str | None:
    if not isinstance(value, str) or value == DEFAULT_CONTENT_TYPE:
        return None
    return value


async def _fill(chunks: AsyncIterator[bytes], buffer: bytearray, size: int) -> bool:
    """Read ``chunks`` into ``buffer`` until it holds ``size`` bytes; return True at the end."""
    while len(buffer) < size:
        try:
            chunk = await anext(chunks)
        except StopAsyncIteration:
            return True
        buffer += chunk
    return False


async def _all(coroutines: Iterable[Coroutine[Any, Any, _T]]) -> list[_T]:
    """Run the coroutines concurrently and return their results in order.

    On the first failure the others are cancelled and awaited, and that failure is raised
    as it is (a TaskGroup would wrap it in an ExceptionGroup, which is no builtin OSError).
    """
    tasks = [asyncio.ensure_future(coroutine) for coroutine in coroutines]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


class S3Reader(Reader):
    """One version of an object (its ETag), read with ranged GETs that insist on it."""

    def __init__(self, backend: S3Backend, key: str, info: Info) -> None:
        self.info = info
        self._backend = backend
        self._key = key
        self._bodies: set[Any] = set()
        self._closed = False

    async def chunks(self, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        if self._closed:
            raise ValueError("reader is closed")
        end = self.info.size if end is None else end
        position = start
        resumes = 0
        while position < end:
            if self._closed:
                raise ValueError("reader closed while reading")
            body = await self._backend._get(self._key, self.info.etag, position, end)
            self._bodies.add(body)
            try:
                while position < end:
                    want = min(READ_CHUNK, end - position)
                    try:
                        data = await self._read(body, want)
                    except _STREAM_ERRORS as exc:
                        if self._closed:
                            raise ValueError("reader closed while reading") from exc
                        resumes += 1
                        if resumes > READ_RESUMES:
                            _reraise(exc, op="get_object", key=self._key)
                        logger.debug("resuming read of %r at %d: %r", self._key, position, exc)
                        break
                    if not data:
                        resumes += 1
                        if resumes > READ_RESUMES:
                            raise ConnectionError(
                                errno.ECONNABORTED,
                                f"S3 get_object of {self._key!r}: body ended early",
                            )
                        break
                    position += len(data)
                    yield data
            finally:
                self._bodies.discard(body)
                body.close()

    @staticmethod
    async def _read(body: Any, want: int) -> bytes:
        """Given a response body, return up to ``want`` bytes of it (fewer only at its end)."""
        data = await body.read(want)
        if not data or len(data) == want:
            return bytes(data)
        buffer = bytearray(data)
        while len(buffer) < want:
            more = await body.read(want - len(buffer))
            if not more:
                break
            buffer += more
        return bytes(buffer)

    async def close(self) -> None:
        self._closed = True
        for body in list(self._bodies):
            body.close()
        self._bodies.clear()


class S3Backend(Backend):
    """Objects in one bucket (optionally under a key prefix ``path``) of an S3 store."""

    protocol: ClassVar[str] = "s3"
    empty_directories: ClassVar[bool] = False

    multipart_copy_threshold: int = MAX_COPY_SIZE
    """Objects larger than this are copied part by part (tests lower it)."""
    copy_part_size: int = COPY_PART_SIZE

    def __init__(
        self,
        bucket: str,
        *,
        endpoint: str | None = None,
        region: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        path: str = "",
        force_path_style: bool = False,
        part_size: int = 8 * MiB,
    ) -> None:
        if not bucket or "/" in bucket:
            raise ValueError(f"S3 storage 'bucket' has value {bucket!r}: not a bucket name")
        if not MIN_PART_SIZE <= part_size <= MAX_PART_SIZE:
            raise ValueError(
                f"S3 storage 'part_size' has value {part_size!r}: "
                f"must be between {MIN_PART_SIZE} and {MAX_PART_SIZE} bytes"
            )
        if (access_key is None) != (secret_key is None):
            raise ValueError("S3 storage needs both 'access_key' and 'secret_key', or neither")
        self.bucket = bucket
        self.endpoint = endpoint
        self.region = region
        self.path = _normalise_path(path)
        self.force_path_style = force_path_style
        self.part_size = part_size
        self._root = f"{self.path}/" if self.path else ""
        self._access_key = access_key
        self._secret_key = secret_key
        self._fs: Any = None
        self._session_lock: asyncio.Lock | None = None
        self._background: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"S3Backend(bucket={self.bucket!r}, endpoint={self.endpoint!r}, path={self.path!r})"

    # -- life cycle ------------------------------------------------------------------------

    async def start(self) -> None:
        try:
            await self._client()
            await self.ready()
        except BaseException:
            await self.close()
            raise
        await self._abort_stale_uploads()

    async def close(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        fs, self._fs = self._fs, None
        # s3fs has no public way to close an asynchronous session: close its client.
        client = getattr(fs, "_s3", None)
        if client is not None:
            await client.close()

    async def ready(self) -> None:
        await self._call("head_bucket", "")

    async def _client(self) -> Any:
        """Return the s3fs file system, its session set up."""
        if self._fs is not None:
            return self._fs
        if self._session_lock is None:
            self._session_lock = asyncio.Lock()
        async with self._session_lock:
            if self._fs is None:
                config: dict[str, Any] = {
                    "max_pool_connections": MAX_POOL_CONNECTIONS,
                    # botocore's legacy mode retries a refused connection for ~15 s; a
                    # readiness check and a waiting client want the answer sooner.
                    "retries": {"mode": "standard", "total_max_attempts": 3},
                    # Checksums only where S3 requires them: S3-compatible stores (older MinIO,
                    # Ceph) reject the CRC headers newer botocore sends by default.
                    "request_checksum_calculation": "when_required",
                    "response_checksum_validation": "when_required",
                }
                if self.force_path_style:
                    config["s3"] = {"addressing_style": "path"}
                fs = s3fs.S3FileSystem(
                    asynchronous=True,
                    skip_instance_cache=True,
                    key=self._access_key,
                    secret=self._secret_key,
                    endpoint_url=self.endpoint,
                    client_kwargs={"region_name": self.region} if self.region else {},
                    config_kwargs=config,
                )
                try:
                    await fs.set_session()
                except Exception as exc:
                    _reraise(exc, op="connect", key="")
                self._fs = fs
        return self._fs

    async def _call(self, op: str, key: str, **kwargs: Any) -> Any:
        """Call the S3 operation ``op`` on this bucket; ``key`` names the object in errors."""
        fs = await self._client()
        try:
            return await fs._call_s3(op, Bucket=self.bucket, **kwargs)
        except Exception as exc:
            _reraise(exc, op=op, key=key)

    async def _abort_stale_uploads(self) -> None:
        """Abort the multipart uploads under our prefix that a crashed writer left behind."""
        cutoff = time.time() - STALE_UPLOAD_AGE
        markers: dict[str, str] = {}
        try:
            while True:
                page = await self._call("list_multipart_uploads", "", Prefix=self._root, **markers)
                for upload in page.get("Uploads", ()):
                    initiated = _timestamp(upload.get("Initiated"))
                    if initiated is not None and initiated < cutoff:
                        await self._abort(upload["Key"], upload["UploadId"])
                if not page.get("IsTruncated"):
                    break
                markers = {
                    "KeyMarker": page.get("NextKeyMarker", ""),
                    "UploadIdMarker": page.get("NextUploadIdMarker", ""),
                }
        except OSError as exc:  # not allowed to list uploads: leave them to a lifecycle rule
            logger.warning("could not clean up stale multipart uploads: %s", exc)

    # -- keys --------------------------------------------------------------------------------

    def _full(self, key: str) -> str:
        return self._root + key

    def _prefix(self, key: str) -> str:
        """Given a directory key, return the prefix of every object below it."""
        return self._root + key + "/" if key else self._root

    async def _head(self, key: str) -> dict[str, Any] | None:
        """Return HeadObject's answer for the file ``key``, or None if there is none."""
        try:
            head: dict[str, Any] = await self._call("head_object", key, Key=self._full(key))
        except FileNotFoundError:
            return None
        return head

    async def file_size(self, key: str) -> int | None:
        head = await self._head(key)  # one request: a prefix is no file
        return None if head is None else int(head.get("ContentLength", 0))

    async def _is_directory(self, key: str) -> bool:
        """Return whether any object (a marker included) lies below ``key``."""
        page = await self._call("list_objects_v2", key, Prefix=self._prefix(key), MaxKeys=1)
        return bool(page.get("KeyCount") or page.get("Contents") or page.get("CommonPrefixes"))

    def _file_info(self, key: str, head: Mapping[str, Any]) -> Info:
        mtime = _timestamp(head.get("LastModified"))
        return Info(
            name=key,
            type=FILE,
            size=int(head.get("ContentLength", head.get("Size", 0))),
            mtime=mtime,
            ctime=mtime,
            etag=_etag(head.get("ETag")),
            content_type=_content_type(head.get("ContentType")),
            metadata=_decode_metadata(head.get("Metadata")),
        )

    # -- reading -----------------------------------------------------------------------------

    async def info(self, key: str) -> Info:
        if not key:
            return Info(name="", type=DIRECTORY)
        head = await self._head(key)
        if head is not None:
            return self._file_info(key, head)
        if await self._is_directory(key):
            return Info(name=key, type=DIRECTORY)
        raise FileNotFoundError(errno.ENOENT, "no such file or directory", key)

    async def open_read(self, key: str) -> Reader:
        head = await self._head(key)
        if head is None:
            if await self._is_directory(key):
                raise IsADirectoryError(errno.EISDIR, "is a directory", key)
            raise FileNotFoundError(errno.ENOENT, "no such file", key)
        return S3Reader(self, key, self._file_info(key, head))

    async def _get(self, key: str, etag: str | None, start: int, end: int) -> Any:
        """Return the body of bytes ``[start, end)`` of ``key`` at version ``etag``."""
        conditions = {"IfMatch": f'"{etag}"'} if etag else {}
        response = await self._call(
            "get_object", key, Key=self._full(key), Range=f"bytes={start}-{end - 1}", **conditions
        )
        body = response["Body"]
        length = response.get("ContentLength")
        if length is not None and length != end - start:  # a store that ignored the range
            body.close()
            raise ConnectionError(
                errno.EIO, f"S3 get_object of {key!r}: asked {end - start} bytes, got {length}"
            )
        return body

    async def list(
        self,
        key: str,
        *,
        recursive: bool = False,
        limit: int = 1000,
        start_after: str | None = None,
    ) -> Page:
        if limit < 1:
            raise ValueError(f"limit must be positive, not {limit!r}")
        strip = len(self._root)
        request: dict[str, Any] = {"Prefix": self._prefix(key)}
        if not recursive:
            request["Delimiter"] = "/"
        if start_after:
            # S3 skips every key up to StartAfter; for a directory ("d/") that is its whole
            # content, just as the common prefix "d/" sorts (base.sort_key). A cursor with a
            # character S3 cannot echo (no key holds one) is cut before it: S3 then returns a
            # few more entries, which the filter below drops.
            unsafe = _NOT_XML.search(start_after)
            bound = start_after if unsafe is None else start_after[: unsafe.start()]
            request["StartAfter"] = self._root + bound
        entries: list[Info] = []
        found = False
        while True:
            request["MaxKeys"] = min(LIST_PAGE, limit + 1 - len(entries))
            page = await self._call("list_objects_v2", key, **request)
            batch: list[Info] = []
            for item in page.get("Contents", ()):
                found = True
                name: str = item["Key"]
                if name.endswith("/"):  # a directory marker
                    continue
                batch.append(self._file_info(name[strip:], item))
            for common in page.get("CommonPrefixes", ()):
                found = True
                batch.append(Info(name=common["Prefix"][strip:-1], type=DIRECTORY))
            batch.sort(key=sort_key)
            entries.extend(
                entry for entry in batch if start_after is None or sort_key(entry) > start_after
            )
            if len(entries) > limit or not page.get("IsTruncated"):
                break
            request.pop("StartAfter", None)
            request["ContinuationToken"] = page["NextContinuationToken"]
        if not entries and key and not found and not await self._is_directory(key):
            if await self._head(key) is not None:
                raise NotADirectoryError(errno.ENOTDIR, "not a directory", key)
            raise FileNotFoundError(errno.ENOENT, "no such directory", key)
        if len(entries) > limit:
            del entries[limit:]
            return Page(entries=entries, next_cursor=sort_key(entries[-1]))
        return Page(entries=entries, next_cursor=None)

    # -- writing -----------------------------------------------------------------------------

    async def write(
        self,
        key: str,
        chunks: AsyncIterable[bytes],
        *,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
        exclusive: bool = False,
    ) -> Info:
        metadata = normalise_metadata(metadata)  # lowercased names; ValueError if too big
        attributes: dict[str, Any] = {"Metadata": _encode_metadata(metadata)}
        if content_type is not None:
            attributes["ContentType"] = content_type
        conditions = {"IfNoneMatch": "*"} if exclusive else {}
        # The checks run while the first part arrives: one round trip less per write.
        checks = asyncio.create_task(self._check_writable(key, exclusive))
        iterator = aiter(chunks)
        buffer = bytearray()
        try:
            ended = await _fill(iterator, buffer, self.part_size + 1)
            await checks
        except BaseException:
            checks.cancel()
            with contextlib.suppress(BaseException):
                await checks
            raise
        if ended:
            response = await self._call(
                "put_object",
                key,
                Key=self._full(key),
                Body=bytes(buffer),
                **attributes,
                **conditions,
            )
            size = len(buffer)
        else:
            response, size = await self._write_parts(key, iterator, buffer, attributes, conditions)
        etag = _etag(response.get("ETag"))
        return await self._written_info(key, etag, size, content_type, metadata)

    async def _check_writable(self, key: str, exclusive: bool) -> None:
        """Raise if a directory is at ``key`` or, for an exclusive write, a file.

        If-None-Match is what makes an exclusive write race-free; the HEAD here fails early,
        before a large body is sent, and on stores that ignore the condition.
        """
        if await self._is_directory(key):
            raise IsADirectoryError(errno.EISDIR, "is a directory", key)
        if exclusive and await self._head(key) is not None:
            raise FileExistsError(errno.EEXIST, "file exists", key)

    async def _write_parts(
        self,
        key: str,
        chunks: AsyncIterator[bytes],
        buffer: bytearray,
        attributes: Mapping[str, Any],
        conditions: Mapping[str, str],
    ) -> tuple[Any, int]:
        """Upload ``buffer`` then the rest of ``chunks`` as a multipart upload.

        Holds at most the part being uploaded and the next one being read; on any failure,
        cancellation included, aborts the upload so nothing, not even parts, is left.
        """
        full = self._full(key)
        created = await self._call("create_multipart_upload", key, Key=full, **attributes)
        upload_id: str = created["UploadId"]
        parts: list[dict[str, Any]] = []
        pending: asyncio.Task[dict[str, Any]] | None = None
        size = 0
        try:
            ended = False
            while True:
                if not ended:
                    ended = await _fill(chunks, buffer, self.part_size + 1)
                if not buffer:
                    break
                if pending is not None:
                    parts.append(await pending)
                    pending = None
                if len(parts) >= MAX_PARTS:
                    raise OSError(errno.EFBIG, f"{key!r}: more than {MAX_PARTS} parts")
                cut = min(self.part_size, len(buffer))
                with memoryview(buffer) as view:
                    data = bytes(view[:cut])  # one copy, not two
                del buffer[:cut]
                size += cut
                pending = asyncio.create_task(
                    self._upload_part(key, upload_id, len(parts) + 1, data)
                )
                del data
                if ended and not buffer:
                    break
            if pending is not None:
                parts.append(await pending)
                pending = None
            response = await self._call(
                "complete_multipart_upload",
                key,
                Key=full,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
                **conditions,
            )
        except BaseException:
            if pending is not None:
                pending.cancel()
                with contextlib.suppress(BaseException):
                    await pending
            await self._abort_shielded(full, upload_id)
            raise
        return response, size

    async def _upload_part(
        self, key: str, upload_id: str, number: int, data: bytes
    ) -> dict[str, Any]:
        response = await self._call(
            "upload_part",
            key,
            Key=self._full(key),
            UploadId=upload_id,
            PartNumber=number,
            Body=data,
        )
        return {"PartNumber": number, "ETag": response["ETag"]}

    async def _abort(self, full: str, upload_id: str) -> None:
        try:
            await self._call("abort_multipart_upload", full, Key=full, UploadId=upload_id)
        except FileNotFoundError:
            pass  # already gone
        except OSError as exc:
            logger.warning("could not abort multipart upload of %r: %s", full, exc)

    async def _abort_shielded(self, full: str, upload_id: str) -> None:
        """Abort an upload even if the caller is being cancelled (it finishes in the background)."""
        task = asyncio.create_task(self._abort(full, upload_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        await asyncio.shield(task)

    async def _written_info(
        self,
        key: str,
        etag: str | None,
        size: int,
        content_type: str | None,
        metadata: Mapping[str, str],
    ) -> Info:
        """Return the Info of the object just written (as the store dates it, if still ours)."""
        try:
            conditions = {"IfMatch": f'"{etag}"'} if etag else {}
            head = await self._call("head_object", key, Key=self._full(key), **conditions)
            return self._file_info(key, head)
        except OSError:  # replaced or deleted meanwhile, or HEAD not allowed: the write stands
            now = time.time()
            return Info(
                name=key,
                type=FILE,
                size=size,
                mtime=now,
                ctime=now,
                etag=etag,
                content_type=content_type,
                metadata=metadata,
            )

    async def mkdir(self, key: str) -> None:
        if await self._head(key) is not None:
            raise FileExistsError(errno.EEXIST, "a file is in the way", key)
        await self._call("put_object", key, Key=self._prefix(key), Body=b"")

    # -- deleting ----------------------------------------------------------------------------

    async def delete(self, key: str) -> None:
        if await self._head(key) is None:
            if await self._is_directory(key):
                raise IsADirectoryError(errno.EISDIR, "is a directory", key)
            raise FileNotFoundError(errno.ENOENT, "no such file", key)
        await self._call("delete_object", key, Key=self._full(key))

    async def delete_prefix(self, key: str) -> int:
        if not key:
            raise ValueError("delete_prefix needs a directory key, not the root")
        request: dict[str, Any] = {"Prefix": self._prefix(key), "MaxKeys": LIST_PAGE}
        count = 0
        found = False
        pending: asyncio.Task[None] | None = None
        try:
            while True:
                page = await self._call("list_objects_v2", key, **request)
                names = [item["Key"] for item in page.get("Contents", ())]
                if names:
                    found = True
                    count += sum(not name.endswith("/") for name in names)
                    if pending is not None:
                        await pending
                    # Delete this page while the next one is listed (the continuation token
                    # stays valid: it points past these keys).
                    pending = asyncio.create_task(self._delete_objects(key, names))
                if not page.get("IsTruncated"):
                    break
                request["ContinuationToken"] = page["NextContinuationToken"]
            if pending is not None:
                await pending
                pending = None
        finally:
            if pending is not None:
                pending.cancel()
                with contextlib.suppress(BaseException):
                    await pending
        if not found:
            if await self._head(key) is not None:
                raise NotADirectoryError(errno.ENOTDIR, "not a directory", key)
            raise FileNotFoundError(errno.ENOENT, "no such directory", key)
        return count

    async def delete_if_unchanged(self, key: str, expected: Info) -> bool:
        head = await self._head(key)
        if head is None or not same_version(self._file_info(key, head), expected):
            return False
        # If-Match makes the delete conditional in the store (AWS, MinIO, moto); a store that
        # ignores it leaves the gap between the HEAD and the DELETE.
        conditions = {"IfMatch": f'"{expected.etag}"'} if expected.etag else {}
        try:
            await self._call("delete_object", key, Key=self._full(key), **conditions)
        except FileNotFoundError:
            return False
        except ConnectionError as exc:
            if exc.errno == errno.EAGAIN:  # the ETag no longer matches
                return False
            raise
        return True

    async def _delete_objects(self, key: str, names: Sequence[str]) -> None:
        """Delete the objects ``names`` (full keys), 1,000 per request; raise if any failed."""
        for first in range(0, len(names), LIST_PAGE):
            batch = names[first : first + LIST_PAGE]
            response = await self._call(
                "delete_objects",
                key,
                Delete={"Objects": [{"Key": name} for name in batch], "Quiet": True},
            )
            errors = [e for e in response.get("Errors", ()) if e.get("Code") != "NoSuchKey"]
            if errors:
                code = str(errors[0].get("Code", ""))
                factory = ERRORS.get(code, _errno(errno.EIO))
                raise factory(f"S3 delete_objects under {key!r}: {len(errors)} not deleted: {code}")

    # -- moving ------------------------------------------------------------------------------

    async def move(self, src: str, dst: str) -> None:
        head = await self._head(src)
        if head is None and not await self._is_directory(src):
            raise FileNotFoundError(errno.ENOENT, "no such file or directory", src)
        # Not race-free: S3 has no "copy unless the destination exists" that moto and the
        # S3-compatible stores all honour.
        if await self._head(dst) is not None or await self._is_directory(dst):
            raise FileExistsError(errno.EEXIST, "destination exists", dst)
        if head is not None:
            size = int(head.get("ContentLength", 0))
            await self._copy(src, self._full(src), self._full(dst), size, _etag(head.get("ETag")))
            await self._call("delete_object", src, Key=self._full(src))
            return
        if dst.startswith(src + "/"):
            raise OSError(errno.EINVAL, "cannot move a directory into itself", src)
        await self._move_directory(src, dst)

    async def copy(self, src: str, dst: str, *, expected: Info | None = None) -> Info:
        # One request when the version is known (a listing gave it): CopyObject, conditional
        # on the source's ETag. As S3 does, a copy onto a "directory" makes a file beside it.
        if expected is None:
            head = await self._head(src)
            if head is None:
                if await self._is_directory(src):
                    raise IsADirectoryError(errno.EISDIR, "is a directory", src)
                raise FileNotFoundError(errno.ENOENT, "no such file", src)
            expected = self._file_info(src, head)
        if expected.size > self.multipart_copy_threshold:
            await self._copy(src, self._full(src), self._full(dst), expected.size, expected.etag)
            return await self.info(dst)
        conditions = {"CopySourceIfMatch": f'"{expected.etag}"'} if expected.etag else {}
        response = await self._call(
            "copy_object",
            src,
            Key=self._full(dst),
            CopySource={"Bucket": self.bucket, "Key": self._full(src)},
            MetadataDirective="COPY",
            **conditions,
        )
        result = response.get("CopyObjectResult", {})
        etag = _etag(result.get("ETag"))
        if expected.etag and "-" not in expected.etag and etag != expected.etag:
            # A store that ignores CopySourceIfMatch (moto) copied another version: undo it.
            with contextlib.suppress(FileNotFoundError):
                await self._call("delete_object", dst, Key=self._full(dst))
            raise ConnectionError(errno.EAGAIN, f"S3 copy_object of {src!r}: the object changed")
        mtime = _timestamp(result.get("LastModified"))
        return Info(
            name=dst,
            type=FILE,
            size=expected.size,
            mtime=mtime,
            ctime=mtime,
            etag=etag,
            content_type=expected.content_type,
            metadata=expected.metadata,
        )

    async def delete_unchanged(self, expected: Sequence[Info]) -> Sequence[bool]:
        deleted: builtins.list[bool] = []
        for first in range(0, len(expected), LIST_PAGE):
            batch = expected[first : first + LIST_PAGE]
            objects: list[dict[str, str]] = []
            for info in batch:
                item = {"Key": self._full(info.name)}
                if info.etag:
                    item["ETag"] = f'"{info.etag}"'
                objects.append(item)
            response = await self._call(
                "delete_objects", batch[0].name, Delete={"Objects": objects, "Quiet": True}
            )
            failed = {e.get("Key") for e in response.get("Errors", ())}
            deleted += [self._full(info.name) not in failed for info in batch]
        return deleted

    async def _move_directory(self, src: str, dst: str) -> None:
        """Copy every object below ``src/`` to ``dst/`` (16 at a time), then delete the sources.

        If a copy fails, the copies made so far are deleted and the sources stay.
        """
        source_prefix, target_prefix = self._prefix(src), self._prefix(dst)
        copied: list[str] = []
        sources: list[str] = []
        limiter = asyncio.Semaphore(COPY_CONCURRENCY)

        async def copy_one(item: Mapping[str, Any]) -> None:
            name: str = item["Key"]
            target = target_prefix + name[len(source_prefix) :]
            copied.append(target)  # before the copy: a cancelled copy may still land
            async with limiter:
                await self._copy(src, name, target, int(item.get("Size", 0)), None)
            sources.append(name)

        request: dict[str, Any] = {"Prefix": source_prefix, "MaxKeys": LIST_PAGE}
        try:
            while True:
                page = await self._call("list_objects_v2", src, **request)
                await _all(copy_one(item) for item in page.get("Contents", ()))
                if not page.get("IsTruncated"):
                    break
                request["ContinuationToken"] = page["NextContinuationToken"]
        except BaseException:
            if copied:
                cleanup = asyncio.create_task(self._delete_objects(dst, copied))
                self._background.add(cleanup)
                cleanup.add_done_callback(self._background.discard)
                with contextlib.suppress(Exception):
                    await asyncio.shield(cleanup)
            raise
        if sources:
            await self._delete_objects(src, sources)

    async def _copy(self, key: str, source: str, target: str, size: int, etag: str | None) -> None:
        """Copy the object ``source`` to ``target`` (full keys), type and metadata included."""
        if size > self.multipart_copy_threshold:
            await self._copy_parts(key, source, target, size, etag)
            return
        conditions = {"CopySourceIfMatch": f'"{etag}"'} if etag else {}
        await self._call(
            "copy_object",
            key,
            Key=target,
            CopySource={"Bucket": self.bucket, "Key": source},
            MetadataDirective="COPY",
            **conditions,
        )

    async def _copy_parts(
        self, key: str, source: str, target: str, size: int, etag: str | None
    ) -> None:
        """Copy a large object with UploadPartCopy (CopyObject stops at 5 GiB)."""
        head = await self._call("head_object", key, Key=source)
        etag = etag or _etag(head.get("ETag"))
        attributes: dict[str, Any] = {"Metadata": head.get("Metadata") or {}}
        if head.get("ContentType"):
            attributes["ContentType"] = head["ContentType"]
        part = max(self.copy_part_size, -(-size // MAX_PARTS))
        created = await self._call("create_multipart_upload", key, Key=target, **attributes)
        upload_id: str = created["UploadId"]
        limiter = asyncio.Semaphore(COPY_CONCURRENCY)
        conditions = {"CopySourceIfMatch": f'"{etag}"'} if etag else {}

        async def copy_part(number: int, start: int) -> dict[str, Any]:
            last = min(start + part, size) - 1
            async with limiter:
                response = await self._call(
                    "upload_part_copy",
                    key,
                    Key=target,
                    UploadId=upload_id,
                    PartNumber=number,
                    CopySource={"Bucket": self.bucket, "Key": source},
                    CopySourceRange=f"bytes={start}-{last}",
                    **conditions,
                )
            return {"PartNumber": number, "ETag": response["CopyPartResult"]["ETag"]}

        try:
            parts = await _all(
                copy_part(number, start)
                for number, start in enumerate(range(0, size, part), start=1)
            )
            await self._call(
                "complete_multipart_upload",
                key,
                Key=target,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )
        except BaseException:
            await self._abort_shielded(target, upload_id)
            raise

"""The ``kestra`` fsspec protocol: ``kestra:///ns/flow/file`` through the gateway.

Registered with the ``fsspec.specs`` entry point, so once this package is installed::

    pd.read_csv("kestra:///ns/flow/executions/e1/out.csv",
                storage_options={"url": "http://gateway:8080", "tenant": "acme", "token": "..."})
    fsspec.open("kestra://ns/flow/out.parquet", "rb", url=..., token=...)

``storage_options``: ``url``, ``tenant``, ``token`` (or ``username``/``password``), ``retries``,
each falling back to ``GATEWAY_URL``, ``GATEWAY_TENANT``, ``GATEWAY_TOKEN``... as for
``AsyncClient``. A path is a key of the caller's tenant; ``kestra:///ns/x`` (legacy form),
``kestra://ns/x`` (canonical form) and ``ns/x`` name the same key. A URI is percent-decoded
once (``kestra:///ns/my%20file.csv`` is the key ``ns/my file.csv``); a bare path is taken as is.

The file system wraps :class:`AsyncClient`; gateway errors become the builtin exceptions
fsspec's callers expect, in one table (``translate``). Files open for reading are seekable
(ranged GETs, fsspec's read-ahead cache); files open for writing stream their blocks into one
PUT (a small file is one PUT of its bytes), and a ``with`` block that raises stores nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import posixpath
import weakref
from collections.abc import AsyncIterator, Iterator
from typing import Any, Final

from fsspec.asyn import AsyncFileSystem, sync, sync_wrapper
from fsspec.callbacks import DEFAULT_CALLBACK, Callback
from fsspec.spec import AbstractBufferedFile
from fsspec.utils import stringify_path

from .. import keys
from ..errors import InvalidKey as _ServerInvalidKey
from ._async import AsyncClient, FileInfo
from .errors import (
    APIError,
    Conflict,
    Forbidden,
    InvalidKey,
    NotFound,
    PreconditionFailed,
    RangeNotSatisfiable,
    Unauthorized,
)

_GLOB_MAGIC: Final = frozenset("*?[")


def translate(exc: APIError, path: str) -> Exception:
    """Given a gateway error about ``path``, return the builtin exception fsspec callers expect
    (the ``APIError`` itself when none fits). Most specific first."""
    if isinstance(exc, NotFound):
        return FileNotFoundError(errno.ENOENT, exc.message, path)
    if isinstance(exc, PreconditionFailed):
        return FileExistsError(errno.EEXIST, exc.message, path)
    if isinstance(exc, Conflict):
        if exc.code == "is_a_directory":
            return IsADirectoryError(errno.EISDIR, exc.message, path)
        if exc.code == "not_a_directory":
            return NotADirectoryError(errno.ENOTDIR, exc.message, path)
        return FileExistsError(errno.EEXIST, exc.message, path)
    if isinstance(exc, (Forbidden, Unauthorized)):
        return PermissionError(errno.EACCES, exc.message, path)
    return exc


@contextlib.contextmanager
def _translated(path: str) -> Iterator[None]:
    try:
        yield
    except APIError as exc:
        translated = translate(exc, path)
        if translated is exc:
            raise
        raise translated from exc


def _entry(info: FileInfo) -> dict[str, Any]:
    return {
        "name": info.key,
        "size": info.size,
        "type": "directory" if info.is_dir else "file",
        "etag": info.etag,
        "mtime": info.last_modified,
        "created": info.created,
        "content_type": info.content_type,
        "metadata": dict(info.metadata or {}),
        "uri": info.uri,
    }


class KestraFileSystem(AsyncFileSystem):  # type: ignore[misc]
    """fsspec's ``kestra`` protocol over the gateway's object API (one tenant per instance)."""

    protocol = ("kestra",)
    root_marker = ""
    sep = "/"

    def __init__(
        self,
        url: str | None = None,
        tenant: str | None = None,
        token: str | None = None,
        username: str | None = None,
        password: str | None = None,
        retries: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        options: dict[str, Any] = {"retries": retries} if retries is not None else {}
        self.client = AsyncClient(
            url, tenant=tenant, token=token, username=username, password=password, **options
        )
        if not self.asynchronous:
            weakref.finalize(self, _close_client, self.loop, self.client)

    # -- paths ---------------------------------------------------------------------------

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        """Given ``kestra:///ns/x``, ``kestra://ns/x`` or ``ns/x``, return the key ``ns/x``."""
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        text: str = stringify_path(path)
        if text[:7].lower() == "kestra:":
            text = _uri_key(text)
        return text.strip("/")

    @staticmethod
    def _get_kwargs_from_urls(path: str) -> dict[str, Any]:
        return {}  # the authority of a kestra URI is a namespace, not a host

    # -- reading -------------------------------------------------------------------------

    async def _info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        key = self._strip_protocol(path)
        with _translated(key):
            return _entry(await self.client.stat(key))

    async def _ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        key = self._strip_protocol(path)
        try:
            with _translated(key):
                entries = [_entry(info) async for info in self.client.list(key)]
        except (FileNotFoundError, NotADirectoryError):
            info = await self._info(key)  # a file lists as itself; anything else raises
            if info["type"] == "directory":
                raise
            entries = [info]
        return entries if detail else [entry["name"] for entry in entries]

    async def _cat_file(
        self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any
    ) -> bytes:
        key = self._strip_protocol(path)
        if (start is not None and start < 0 and end is not None) or (end is not None and end < 0):
            size = (await self._info(key))["size"]
            start = start if start is None or start >= 0 else max(size + start, 0)
            end = end if end is None or end >= 0 else max(size + end, 0)
        if end is not None and end <= (start or 0):
            return b""
        try:
            with _translated(key):
                return await self.client.read(key, start=start, end=end)
        except RangeNotSatisfiable:
            return b""  # a range past the end reads nothing, as from a local file

    async def _get_file(
        self, rpath: str, lpath: str, callback: Callback = DEFAULT_CALLBACK, **kwargs: Any
    ) -> None:
        key = self._strip_protocol(rpath)
        try:
            with _translated(key):
                headers = await self.client.download(key, lpath, progress=callback.relative_update)
        except IsADirectoryError:  # answered before any local file is made
            await asyncio.to_thread(_makedirs_local, lpath)
            return
        callback.set_size(headers.length)

    # -- writing -------------------------------------------------------------------------

    async def _pipe_file(
        self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any
    ) -> None:
        key = self._strip_protocol(path)
        with _translated(key):
            await self.client.upload(
                key,
                value,
                create_only=mode == "create",
                content_type=kwargs.get("content_type"),
                metadata=kwargs.get("metadata"),
            )

    async def _put_file(
        self,
        lpath: str,
        rpath: str,
        callback: Callback = DEFAULT_CALLBACK,
        mode: str = "overwrite",
        **kwargs: Any,
    ) -> None:
        key = self._strip_protocol(rpath)
        if await asyncio.to_thread(_is_local_dir, lpath):
            await self._makedirs(key, exist_ok=True)
            return
        with _translated(key):
            await self.client.upload(
                key,
                lpath,
                create_only=mode == "create",
                content_type=kwargs.get("content_type"),
                metadata=kwargs.get("metadata"),
                progress=callback.relative_update,
            )

    async def _cp_file(self, path1: str, path2: str, **kwargs: Any) -> None:
        """Copy through this process, streamed (the gateway has no copy route): one GET, one
        PUT; a directory is made at the destination."""
        source, target = self._strip_protocol(path1), self._strip_protocol(path2)
        try:
            with _translated(source):
                download = await self.client.open(source)
        except IsADirectoryError:
            await self._makedirs(target, exist_ok=True)
            return
        async with download:
            with _translated(target):
                await self.client.upload(
                    target,
                    download.chunks(),
                    size=download.headers.length,
                    content_type=download.headers.content_type,
                    metadata=download.headers.metadata,
                )

    async def _mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        key = self._strip_protocol(path)
        if not create_parents and not await self._isdir(self._parent(key)):
            raise FileNotFoundError(errno.ENOENT, "the parent directory does not exist", key)
        if await self._exists(key):
            raise FileExistsError(errno.EEXIST, "something already exists at this key", key)
        with _translated(key):
            await self.client.mkdir(key)

    async def _makedirs(self, path: str, exist_ok: bool = False) -> None:
        key = self._strip_protocol(path)
        if not key:
            return  # the root always exists
        if not exist_ok and await self._isdir(key):
            raise FileExistsError(errno.EEXIST, "the directory exists", key)
        with _translated(key):
            await self.client.mkdir(key)  # making a directory that exists is no error

    async def _rm_file(self, path: str, **kwargs: Any) -> None:
        key = self._strip_protocol(path)
        try:
            with _translated(key):
                await self.client.delete(key)
        except IsADirectoryError:
            # fsspec removes a tree child first: by now the directory must be empty.
            async for _ in self.client.list(key, page_size=1):
                raise OSError(errno.ENOTEMPTY, "the directory is not empty", key) from None
            with _translated(key):
                await self.client.delete(key, recursive=True)

    async def _rm(
        self,
        path: str | list[str],
        recursive: bool = False,
        batch_size: int | None = None,
        maxdepth: int | None = None,
        **kwargs: Any,
    ) -> None:
        if recursive and maxdepth is None:
            # The gateway deletes a whole tree in one request: delete the topmost paths only.
            paths = await self._expand_path(path, recursive=False)
            for key in paths:
                with _translated(key):
                    await self.client.delete(key, recursive=True)
            return
        await super()._rm(path, recursive=recursive, batch_size=batch_size, maxdepth=maxdepth)

    async def _mv(
        self, path1: Any, path2: Any, recursive: bool = False, maxdepth: int | None = None,
        **kwargs: Any,
    ) -> None:  # fmt: skip
        """Move on the gateway (one request, files or whole trees), or copy and delete for
        lists and glob patterns."""
        if isinstance(path1, str) and isinstance(path2, str) and not _GLOB_MAGIC & set(path1):
            source, target = self._strip_protocol(path1), self._strip_protocol(path2)
            if source == target:
                return
            if path2.endswith("/") or await self._isdir(target):
                target = posixpath.join(target, posixpath.basename(source))
            if (await self._isdir(source)) and not recursive:
                raise IsADirectoryError(errno.EISDIR, "moving a directory needs recursive", source)
            with _translated(source):
                await self.client.move(source, target)
            return
        await self._copy(path1, path2, recursive=recursive, maxdepth=maxdepth)
        await self._rm(path1, recursive=recursive, maxdepth=maxdepth)

    mv = sync_wrapper(_mv)

    def _open(
        self,
        path: str,
        mode: str = "rb",
        block_size: int | None = None,
        autocommit: bool = True,
        cache_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> KestraFile:
        if not autocommit:
            raise NotImplementedError("the kestra protocol writes each file at its close")
        if mode == "ab":
            raise NotImplementedError("appending is not supported: the gateway replaces objects")
        key = self._strip_protocol(path)
        if mode == "xb" and self.exists(key):
            raise FileExistsError(errno.EEXIST, "an object exists at this key", key)
        return KestraFile(
            self, key, mode, block_size or "default", cache_options=cache_options, **kwargs
        )

    def close_session(self) -> None:
        """Close the client's connections (the instance may still be used: they reopen)."""
        _close_client(self.loop, self.client)


def _close_client(loop: asyncio.AbstractEventLoop | None, client: AsyncClient) -> None:
    if loop is not None and loop.is_running() and client._session is not None:
        with contextlib.suppress(Exception):
            sync(loop, client.close, timeout=5)


def _is_local_dir(path: str) -> bool:
    import os

    return os.path.isdir(path)


def _makedirs_local(path: str) -> None:
    import os

    os.makedirs(path, exist_ok=True)


def _uri_key(uri: str) -> str:
    """Given a ``kestra:`` URI (perhaps a glob pattern), return its key, decoded once.

    ``keys.parse_uri`` for a plain URI; a pattern (``*``, ``?``, ``[``) keeps its ``?`` as a
    glob character instead of a query, and is checked for the same authority rules.
    """
    try:
        if not _GLOB_MAGIC & set(uri):
            return keys.parse_uri(uri)
        rest = uri[7:]
        if not rest.startswith("//"):
            raise _ServerInvalidKey("uri", "a kestra URI starts with 'kestra://'")
        authority, slash, path = rest[2:].partition("/")
        if "@" in authority or ":" in authority:
            raise _ServerInvalidKey("uri", "a kestra URI must not carry user information or a port")
        return keys.decode_path(authority + slash + path if authority else path)
    except _ServerInvalidKey as exc:
        raise InvalidKey(exc.message, status=400, code="invalid_key", rule=exc.rule) from None


class KestraFile(AbstractBufferedFile):  # type: ignore[misc]
    """A file of the ``kestra`` protocol: ranged reads, or one streamed upload."""

    fs: KestraFileSystem

    def __init__(self, fs: KestraFileSystem, path: str, mode: str, *args: Any, **kwargs: Any):
        self.content_type: str | None = kwargs.pop("content_type", None)
        self.metadata: dict[str, str] | None = kwargs.pop("metadata", None)
        self._queue: asyncio.Queue[bytes | None] | None = None
        self._upload: asyncio.Task[Any] | None = None
        super().__init__(fs, path, mode, *args, **kwargs)

    def _fetch_range(self, start: int, end: int) -> bytes:
        data: bytes = sync(self.fs.loop, self.fs._cat_file, self.path, start=start, end=end)
        return data

    def _initiate_upload(self) -> None:
        """Nothing yet: a file that fits in one block is sent as one PUT of its bytes."""

    def _upload_chunk(self, final: bool = False) -> bool:
        data = self.buffer.getvalue()
        if final and self._upload is None:
            self.fs.pipe_file(
                self.path,
                data,
                mode="create" if self.mode == "xb" else "overwrite",
                content_type=self.content_type,
                metadata=self.metadata,
            )
            return True
        if self._upload is None:
            sync(self.fs.loop, self._start_upload)
        if data:
            sync(self.fs.loop, self._send, data)
        if final:
            sync(self.fs.loop, self._finish)
        return True

    async def _start_upload(self) -> None:
        self._queue = asyncio.Queue(maxsize=1)  # one block waits while one is sent
        queue = self._queue

        async def blocks() -> AsyncIterator[bytes]:
            while (block := await queue.get()) is not None:
                yield block

        with _translated(self.path):
            self._upload = asyncio.ensure_future(
                self.fs.client.upload(
                    self.path,
                    blocks(),
                    create_only=self.mode == "xb",
                    content_type=self.content_type,
                    metadata=self.metadata,
                )
            )

    async def _send(self, block: bytes | None) -> None:
        """Hand ``block`` to the upload, or raise the upload's error if it ended first."""
        assert self._queue is not None and self._upload is not None
        putting = asyncio.ensure_future(self._queue.put(block))
        await asyncio.wait({putting, self._upload}, return_when=asyncio.FIRST_COMPLETED)
        if not putting.done():
            putting.cancel()
            with _translated(self.path):
                self._upload.result()  # raises the upload's error
            raise OSError(errno.EIO, "the upload ended before its body", self.path)

    async def _finish(self) -> None:
        await self._send(None)
        assert self._upload is not None
        with _translated(self.path):
            await self._upload

    def discard(self) -> None:
        """Abort the upload: the gateway stores nothing (a body that ends in an error)."""
        if self._upload is not None and not self._upload.done():
            upload = self._upload
            self.fs.loop.call_soon_threadsafe(upload.cancel)
            with contextlib.suppress(BaseException):
                sync(self.fs.loop, _wait_for, upload)
        self._upload = None
        super().discard()

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> None:
        if exc is not None and self.writable() and not self.closed:  # type: ignore[has-type]
            self.discard()  # a failure inside the `with` stores nothing
            self.closed = True
            return
        self.close()


async def _wait_for(task: asyncio.Task[Any]) -> None:
    with contextlib.suppress(BaseException):
        await task

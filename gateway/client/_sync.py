"""The synchronous client: the async client run on an event loop of its own, in one thread.

Every method of ``Client`` is the ``AsyncClient`` method of the same name, waited for; it
works the same from plain scripts, threads and from inside someone else's event loop (the
client's loop is its own, in its own thread).
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncGenerator, Awaitable, Iterator, Mapping
from types import TracebackType
from typing import Any, TypeVar

from ._async import (
    AsyncClient,
    Download,
    FileInfo,
    ObjectHeaders,
    Progress,
    Uploaded,
    UploadSource,
)

T = TypeVar("T")


class Client:
    """A synchronous client of the gateway; takes the arguments of :class:`AsyncClient`."""

    def __init__(self, url: str | None = None, **options: Any) -> None:
        self._async = AsyncClient(url, **options)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="gateway-client", daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        return self._async.url

    @property
    def tenant(self) -> str | None:
        return self._async.tenant

    def _run(self, coroutine: Awaitable[T]) -> T:
        if self._loop.is_closed():
            raise RuntimeError("the client is closed")
        return asyncio.run_coroutine_threadsafe(_await(coroutine), self._loop).result()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._run(self._async.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- the object API, as in AsyncClient -------------------------------------------------

    def upload(self, key: str, source: UploadSource, **options: Any) -> Uploaded:
        return self._run(self._async.upload(key, source, **options))

    def read(self, key: str, *, start: int | None = None, end: int | None = None) -> bytes:
        return self._run(self._async.read(key, start=start, end=end))

    def download(
        self,
        key: str,
        path: str | os.PathLike[str],
        *,
        start: int | None = None,
        end: int | None = None,
        progress: Progress | None = None,
    ) -> ObjectHeaders:
        return self._run(self._async.download(key, path, start=start, end=end, progress=progress))

    def stream(
        self,
        key: str,
        *,
        start: int | None = None,
        end: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> SyncDownload:
        """Start a download; iterate over the returned object's chunks, then close it."""
        download = self._run(self._async.open(key, start=start, end=end, headers=headers))
        return SyncDownload(self, download)

    def head(self, key: str) -> ObjectHeaders:
        return self._run(self._async.head(key))

    def stat(self, key: str = "") -> FileInfo:
        return self._run(self._async.stat(key))

    def exists(self, key: str) -> bool:
        return self._run(self._async.exists(key))

    def list(
        self, key: str = "", *, recursive: bool = False, page_size: int = 1000
    ) -> Iterator[FileInfo]:
        pages = self._async.list(key, recursive=recursive, page_size=page_size)
        assert isinstance(pages, AsyncGenerator)
        try:
            while True:
                try:
                    yield self._run(anext(pages))
                except StopAsyncIteration:
                    return
        finally:
            if not self._loop.is_closed():
                self._run(pages.aclose())

    def delete(self, key: str, *, recursive: bool = False) -> int:
        return self._run(self._async.delete(key, recursive=recursive))

    def mkdir(self, key: str) -> None:
        self._run(self._async.mkdir(key))

    def move(self, source: str, destination: str) -> str:
        return self._run(self._async.move(source, destination))


class SyncDownload:
    """A download started by ``Client.stream``: ``headers``, then the body as chunks."""

    def __init__(self, client: Client, download: Download) -> None:
        self._client = client
        self._download = download
        self.headers = download.headers

    def __iter__(self) -> Iterator[bytes]:
        chunks = self._download.chunks()
        while True:
            try:
                yield self._client._run(anext(chunks))
            except StopAsyncIteration:
                return

    def close(self) -> None:
        self._download.close()

    def __enter__(self) -> SyncDownload:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def _await(awaitable: Awaitable[T]) -> T:
    return await awaitable

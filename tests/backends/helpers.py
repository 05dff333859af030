"""Small helpers for the backend tests: bodies to write, bytes read back."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TypeVar

from backends.base import Backend, Info

_B = TypeVar("_B", bound=Backend)


@contextlib.asynccontextmanager
async def started(backend: _B) -> AsyncIterator[_B]:
    """Given a backend, start it, and close it on the way out."""
    await backend.start()
    try:
        yield backend
    finally:
        await backend.close()


async def body(*parts: bytes) -> AsyncIterator[bytes]:
    """Given byte strings, yield them one by one, as an upload arrives."""
    for part in parts:
        yield part


class UploadFailed(Exception):
    """Raised by ``failing_body``: the client went away mid-upload."""


async def failing_body(*parts: bytes) -> AsyncIterator[bytes]:
    """Given byte strings, yield them, then raise ``UploadFailed``."""
    for part in parts:
        yield part
    raise UploadFailed("the client went away")


async def put(
    backend: Backend,
    key: str,
    data: bytes = b"x",
    *,
    content_type: str | None = None,
    metadata: Mapping[str, str] | None = None,
    exclusive: bool = False,
) -> Info:
    """Write ``data`` at ``key`` in one chunk; return the new info."""
    return await backend.write(
        key, body(data), content_type=content_type, metadata=metadata, exclusive=exclusive
    )


async def get(backend: Backend, key: str, start: int = 0, end: int | None = None) -> bytes:
    """Given a key, return its bytes ``[start, end)``."""
    async with await backend.open_read(key) as reader:
        return b"".join([chunk async for chunk in reader.chunks(start, end)])


async def names(backend: Backend, key: str, *, recursive: bool = False) -> list[str]:
    """Given a directory, return the names of every entry of its listing, page after page."""
    found: list[str] = []
    cursor: str | None = None
    while True:
        page = await backend.list(key, recursive=recursive, start_after=cursor)
        found += [entry.name for entry in page.entries]
        if page.next_cursor is None:
            return found
        cursor = page.next_cursor


async def eventually(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait until ``condition()`` holds, at most ``timeout`` seconds; assert it then."""
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    assert condition()

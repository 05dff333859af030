"""The storage interface every backend implements.

Backends take *physical* keys (``tenants/acme/ns/flow/out.csv``) and know nothing of
tenants, scopes or HTTP: the gateway's key function (``gateway.keys``) is the only place
that turns a request into a physical key, and it has already refused anything odd by the
time a backend sees it.

Keys are ``/``-separated, never start or end with ``/``, never hold empty, ``.`` or ``..``
segments. The empty key ``""`` names the root directory (only ``info`` and ``list`` take it).

Errors are builtin exceptions only, so the HTTP layer maps them in one place:

- ``FileNotFoundError``: no object or directory at the key (or a parent is missing).
- ``FileExistsError``: a create-only write, a move or a mkdir found something in the way.
- ``IsADirectoryError``: a file operation named a directory.
- ``NotADirectoryError``: a directory operation named a file, or a parent of the key is a file.
- ``OSError`` with ``errno.ENOSPC`` / ``errno.EDQUOT``: the store is full.
- any other ``OSError`` / ``ConnectionError`` / ``TimeoutError``: the store failed.

Order: listings are sorted by key in code-point order (the same as S3's UTF-8 byte order).
In a one-level listing a directory sorts as its name followed by ``/``, exactly where S3
puts a common prefix, so a cursor means the same thing on every backend.
"""

from __future__ import annotations

import asyncio
import errno
import threading
from abc import ABC, abstractmethod
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import ClassVar, Final, Literal

FILE: Final = "file"
DIRECTORY: Final = "directory"

EMPTY_METADATA: Final[Mapping[str, str]] = MappingProxyType({})

# the part of the key space reserved for the gateway and its backends; no tenant key can reach it
SYSTEM_PREFIX: Final = ".gateway"

# S3 limits user metadata to 2 KiB (keys plus values); every backend keeps the same bound
# so an object can move between backends unchanged.
MAX_METADATA_BYTES: Final = 2048


@dataclass(frozen=True, slots=True)
class Info:
    """What a backend knows of one object or directory (fsspec's ``name``/``size``/``type``)."""

    name: str
    type: Literal["file", "directory"]
    size: int = 0
    mtime: float | None = None
    """Last modification, POSIX seconds (``None`` for directories a store cannot date)."""
    ctime: float | None = None
    """Creation time where the store knows it, else the last modification."""
    etag: str | None = None
    """Opaque, unquoted validator; it changes whenever the content may have changed."""
    content_type: str | None = None
    metadata: Mapping[str, str] = field(default_factory=lambda: EMPTY_METADATA)

    @property
    def is_dir(self) -> bool:
        return self.type == DIRECTORY


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a listing; pass ``next_cursor`` back as ``start_after`` for the next."""

    entries: list[Info]
    next_cursor: str | None


class Reader(ABC):
    """An object opened for reading: its ``info`` and its bytes are of the same version."""

    info: Info

    @abstractmethod
    def chunks(self, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """Yield the bytes ``[start, end)`` of the object (``end=None``: to the end).

        Parameters
        ----------
        start, end:
            Byte offsets already checked by the caller (``0 <= start <= end <= size``).
        """

    def fileno(self) -> int | None:
        """A descriptor of a regular file holding the object's bytes, for ``sendfile``.

        ``None`` (the default) when the bytes come from elsewhere. Valid until ``close``; a
        caller that uses it from another thread duplicates it first.
        """
        return None

    @abstractmethod
    async def close(self) -> None:
        """Release the handle; safe to call twice."""

    async def __aenter__(self) -> Reader:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class Appendable(ABC):
    """An object that grows: each ``append`` adds bytes at its end and is durable when it
    returns. One append at a time; a failed or cancelled one leaves the object's end unknown,
    so every later call raises (the caller starts another object)."""

    size: int
    """The bytes appended so far."""

    @abstractmethod
    async def append(self, data: bytes) -> None:
        """Add ``data`` at the end; durable when this returns."""

    @abstractmethod
    async def close(self) -> None:
        """Release the handle (an append still running finishes first); safe to call twice."""


@dataclass(slots=True)
class SocketBody:
    """A request body still partly in its connection, for a backend that moves it without
    passing it through Python (``Backend.splices_sockets``).

    ``head`` is what was already read; the next ``count`` bytes are to be taken from the
    non-blocking socket ``fd`` (a duplicate, which the backend owns and closes in every case).
    When the socket has nothing to give, ``wait_readable(fd)`` is awaited; it raises to give
    up (the client stopped sending). A connection closed early raises ``EOFError``. The
    backend counts in ``received`` the bytes it took from the socket.
    """

    head: bytes
    fd: int
    count: int
    wait_readable: Callable[[int], Awaitable[None]]
    received: int = 0


class Backend(ABC):
    """A store of objects under physical keys.

    Implementations: ``backends.local.LocalBackend``, ``backends.s3.S3Backend``,
    ``backends.memory.MemoryBackend``; ``backends.registry`` picks one by name.
    """

    protocol: ClassVar[str]
    empty_directories: ClassVar[bool] = True
    """Whether a directory outlives its last file (False on S3, where directories are prefixes)."""

    async def start(self) -> None:  # noqa: B027 (optional hook: most backends need it)
        """Open connections, check the store is usable, clean up what a crash left behind."""

    async def close(self) -> None:  # noqa: B027 (optional hook)
        """Release connections and handles."""

    async def ready(self) -> None:
        """Raise if the store cannot serve now (used by the readiness check)."""
        await self.info("")

    @abstractmethod
    async def info(self, key: str) -> Info:
        """Return what the store knows of ``key`` (``""``: the root directory).

        Raises
        ------
        FileNotFoundError
            Nothing at ``key``.
        """

    async def file_size(self, key: str) -> int | None:
        """Return the size of the file at ``key``, or ``None`` if no file is there (a
        directory included): the one look-up an upload makes to count what it replaces."""
        try:
            info = await self.info(key)
        except (FileNotFoundError, NotADirectoryError):
            return None
        return None if info.is_dir else info.size

    async def exists(self, key: str) -> bool:
        try:
            await self.info(key)
        except (FileNotFoundError, NotADirectoryError):
            return False
        return True

    @abstractmethod
    async def open_read(self, key: str) -> Reader:
        """Open the file at ``key`` for reading.

        Raises
        ------
        FileNotFoundError, IsADirectoryError
        """

    @abstractmethod
    async def write(
        self,
        key: str,
        chunks: AsyncIterable[bytes],
        *,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
        exclusive: bool = False,
    ) -> Info:
        """Store the bytes of ``chunks`` at ``key``, atomically, and return the new ``Info``.

        A reader sees the old object or the whole new one, never a part. When this returns,
        the object is durable (fsynced, or acknowledged by the store). If ``chunks`` raises,
        or the store fails, nothing is stored, the old object (if any) is untouched, and the
        exception propagates. Parent directories are created as needed.

        Parameters
        ----------
        content_type:
            Stored and returned by ``info`` (``None``: not recorded).
        metadata:
            User metadata, string to string, at most ``MAX_METADATA_BYTES`` in all.
        exclusive:
            Create only: raise ``FileExistsError`` if an object exists at ``key``.

        Raises
        ------
        FileExistsError, IsADirectoryError, NotADirectoryError
        """

    async def write_replacing(
        self,
        key: str,
        chunks: AsyncIterable[bytes],
        *,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
        exclusive: bool = False,
    ) -> tuple[Info, int | None]:
        """``write``, and the size of the file the write replaced (``None``: there was none),
        for usage counters: as ``file_size`` before the write would say. Here it is that
        look-up; a backend that looks at the key while writing anyway answers from there."""
        replaced = await self.file_size(key)
        info = await self.write(
            key, chunks, content_type=content_type, metadata=metadata, exclusive=exclusive
        )
        return info, replaced

    appends: ClassVar[bool] = False
    """True if ``create_appendable`` makes objects: an object may then grow after a read."""

    async def create_appendable(
        self, key: str, *, content_type: str | None = None
    ) -> Appendable | None:
        """A new, empty object at ``key`` (create-only: ``FileExistsError`` if anything is
        there), durable with its name when this returns, to be grown by ``append``; or
        ``None`` where the store cannot append (S3: the caller writes whole objects then).

        While it grows, a reader may see a prefix of an append that has not returned yet.
        """
        return None

    splices_sockets: ClassVar[bool] = False
    """True if ``write_socket_body`` is implemented."""

    async def write_socket_body(
        self,
        key: str,
        body: SocketBody,
        *,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
        exclusive: bool = False,
    ) -> Info:
        """``write`` of ``body``: the same guarantees, the bytes taken straight from a socket."""
        raise NotImplementedError

    @abstractmethod
    async def list(
        self,
        key: str,
        *,
        recursive: bool = False,
        limit: int = 1000,
        start_after: str | None = None,
    ) -> Page:
        """List the directory ``key`` (``""``: the root).

        One level: its files and directories. Recursive: every file below it, no directories.
        At most ``limit`` entries whose sort key (directories: name + ``/``) is greater than
        ``start_after``, in order.

        Raises
        ------
        FileNotFoundError
            No directory at ``key`` (and, on stores without real directories, no key below it).
        NotADirectoryError
            ``key`` is a file.
        """

    @abstractmethod
    async def delete(self, key: str) -> None:
        """Delete the file at ``key``.

        Raises
        ------
        FileNotFoundError, IsADirectoryError
        """

    @abstractmethod
    async def delete_prefix(self, key: str) -> int:
        """Delete the directory ``key`` and everything below it; return the files deleted.

        Raises
        ------
        FileNotFoundError, NotADirectoryError
        """

    @abstractmethod
    async def move(self, src: str, dst: str) -> None:
        """Move the file or directory ``src`` to ``dst`` (which must not exist).

        Raises
        ------
        FileNotFoundError, FileExistsError, NotADirectoryError
        """

    atomic_moves: ClassVar[bool] = False
    """Whether ``move`` of a file is one atomic step that keeps its bytes and its ``etag``
    (a rename); if not, a verified move is ``copy``, a check, then ``delete_if_unchanged``."""

    async def copy(self, src: str, dst: str, *, expected: Info | None = None) -> Info:
        """Copy the file ``src`` to ``dst`` (replacing it), bytes, type and metadata, and
        return the new ``Info``; server-side where the store can. The default streams it.

        Parameters
        ----------
        expected:
            Copy only this version of ``src`` (its ``etag``), else raise ``ConnectionError``.

        Raises
        ------
        FileNotFoundError, IsADirectoryError
            ``src`` is not a file.
        ConnectionError
            With ``errno.EAGAIN``: ``src`` is not (or no longer) the version expected.
        """
        async with await self.open_read(src) as reader:
            info = reader.info
            if expected is not None and info.etag != expected.etag:
                raise ConnectionError(errno.EAGAIN, "the object changed", src)
            return await self.write(
                dst, reader.chunks(), content_type=info.content_type, metadata=info.metadata
            )

    async def delete_unchanged(self, expected: Sequence[Info]) -> Sequence[bool]:
        """Delete each file ``expected`` names if its content is still the one described
        (its ``etag``); return, in order, which were deleted. Batched where the store can
        (S3: 1,000 a request, the ETag checked by the store where it supports conditional
        deletes); the default is ``delete_if_unchanged`` for each, which also checks ``mtime``.
        """
        return [await self.delete_if_unchanged(info.name, info) for info in expected]

    async def delete_if_unchanged(self, key: str, expected: Info) -> bool:
        """Delete the file ``key`` only if it is still the version ``expected`` describes
        (same ``etag``, ``size`` and ``mtime``); return whether it was deleted.

        A file rewritten, replaced or removed since ``expected`` was read stays as it is
        (``False``). The default checks, then deletes: a write landing between the two is
        deleted with it; backends narrow or close that window where the store allows.
        """
        try:
            current = await self.info(key)
        except (FileNotFoundError, NotADirectoryError):
            return False
        if not same_version(current, expected):
            return False
        try:
            await self.delete(key)
        except (FileNotFoundError, IsADirectoryError):
            return False
        return True

    @abstractmethod
    async def mkdir(self, key: str) -> None:
        """Create the directory ``key`` and its parents; no error if it is already a directory.

        Raises
        ------
        FileExistsError
            A file is at ``key``.
        NotADirectoryError
            A parent of ``key`` is a file.
        """


def sort_key(info: Info) -> str:
    """Given an entry of a one-level listing, return the string it sorts and pages by."""
    return info.name + "/" if info.is_dir else info.name


def same_version(current: Info, expected: Info) -> bool:
    """Given two ``Info`` of one key, say whether they describe the same version of a file."""
    return (
        not current.is_dir
        and current.etag == expected.etag
        and current.size == expected.size
        and current.mtime == expected.mtime
    )


def metadata_size(metadata: Mapping[str, str]) -> int:
    """Given user metadata, return its size as S3 counts it (UTF-8 keys plus values)."""
    return sum(len(k.encode()) + len(v.encode()) for k, v in metadata.items())


def no_space(message: str = "no space left in the store") -> OSError:
    """Return the error a backend raises when the store is full."""
    return OSError(errno.ENOSPC, message)


async def close_when_idle(lock: threading.Lock, close: Callable[[], None]) -> None:
    """Run ``close`` holding ``lock``, the lock a worker thread holds while it uses what
    ``close`` releases: at once if it is free, else in a thread once that call has returned,
    so the event loop never blocks on it and no descriptor is closed under a running call."""
    if lock.acquire(blocking=False):
        try:
            close()
        finally:
            lock.release()
        return

    def locked() -> None:
        with lock:
            close()

    await asyncio.to_thread(locked)

"""A backend that keeps everything in this process's memory: for tests and trials.

It behaves like a file system (as fsspec's ``implementations/memory.py``): a write creates the
parents of its key, a directory lives on after its last file, and a file and a directory never
share a name. Nothing here awaits between checking and changing the store, so every operation
is atomic with respect to the others.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import time
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from typing import Final

from ._metadata import normalise_metadata
from .base import (
    DIRECTORY,
    EMPTY_METADATA,
    FILE,
    Backend,
    Info,
    Page,
    Reader,
)

READ_CHUNK_SIZE: Final = 1024 * 1024


def _check_key(key: str) -> None:
    """Given a key, raise ``ValueError`` unless it has the shape ``backends.base`` describes."""
    if not key or any(seg in ("", ".", "..") for seg in key.split("/")) or "\0" in key:
        raise ValueError(f"invalid key {key!r}")


def _ancestors(key: str) -> list[str]:
    """Given a key, return the keys of its parent directories, outermost first (no root)."""
    segments = key.split("/")[:-1]
    return ["/".join(segments[: i + 1]) for i in range(len(segments))]


def _listed(info: Info) -> Info:
    """Given an object's info, return it as a listing shows it: as S3 lists, no content type
    and no user metadata (``info`` has them)."""
    return dataclasses.replace(info, content_type=None, metadata=EMPTY_METADATA)


class MemoryReader(Reader):
    """One version of an object, held by reference: a later write does not change it."""

    def __init__(self, data: bytes, info: Info) -> None:
        self.info = info
        self._data: bytes | None = data

    async def chunks(self, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        if self._data is None:
            raise ValueError("read from a closed reader")
        data = self._data
        stop = len(data) if end is None else end
        for offset in range(start, stop, READ_CHUNK_SIZE):
            yield data[offset : min(offset + READ_CHUNK_SIZE, stop)]

    async def close(self) -> None:
        self._data = None


class MemoryBackend(Backend):
    """Objects in a dict, directories in a set; lost when the process ends."""

    protocol = "memory"
    empty_directories = True
    atomic_moves = True

    def __init__(self) -> None:
        self._files: dict[str, tuple[bytes, Info]] = {}
        self._dirs: set[str] = set()  # every directory but the root

    async def info(self, key: str) -> Info:
        if key == "":
            return Info(name="", type=DIRECTORY)
        _check_key(key)
        if key in self._files:
            return self._files[key][1]
        if key in self._dirs:
            return Info(name=key, type=DIRECTORY)
        raise FileNotFoundError(errno.ENOENT, "no such object", key)

    async def open_read(self, key: str) -> Reader:
        _check_key(key)
        if key in self._dirs:
            raise IsADirectoryError(errno.EISDIR, "is a directory", key)
        try:
            data, info = self._files[key]
        except KeyError:
            raise FileNotFoundError(errno.ENOENT, "no such object", key) from None
        return MemoryReader(data, info)

    def _check_writable(self, key: str, exclusive: bool) -> None:
        """Given a key about to be written, raise if a directory or a file is in the way."""
        if key in self._dirs:
            raise IsADirectoryError(errno.EISDIR, "is a directory", key)
        for parent in _ancestors(key):
            if parent in self._files:
                raise NotADirectoryError(errno.ENOTDIR, "a parent is a file", key)
        if exclusive and key in self._files:
            raise FileExistsError(errno.EEXIST, "object exists", key)

    async def write(
        self,
        key: str,
        chunks: AsyncIterable[bytes],
        *,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
        exclusive: bool = False,
    ) -> Info:
        _check_key(key)
        metadata = normalise_metadata(metadata)
        self._check_writable(key, exclusive)  # fail before reading a body that cannot land
        parts = [bytes(chunk) async for chunk in chunks]
        # No await from here on: the check and the change are one step for other tasks.
        self._check_writable(key, exclusive)
        data = b"".join(parts)
        del parts
        now = time.time()
        info = Info(
            name=key,
            type=FILE,
            size=len(data),
            mtime=now,
            ctime=now,
            etag=hashlib.md5(data, usedforsecurity=False).hexdigest(),
            content_type=content_type,
            metadata=metadata,
        )
        self._dirs.update(_ancestors(key))
        self._files[key] = (data, info)
        return info

    def _require_directory(self, key: str) -> None:
        """Given a key, raise unless it names a directory (``""``: the root, always there)."""
        if key == "" or key in self._dirs:
            return
        _check_key(key)
        if key in self._files:
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", key)
        raise FileNotFoundError(errno.ENOENT, "no such directory", key)

    async def list(
        self,
        key: str,
        *,
        recursive: bool = False,
        limit: int = 1000,
        start_after: str | None = None,
    ) -> Page:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self._require_directory(key)
        prefix = f"{key}/" if key else ""
        after = "" if start_after is None else start_after
        # Sort keys first (a directory sorts as name + "/"), entries only for the page: a
        # listing in pages must not build every entry of the store for every page.
        found = [
            name
            for name in self._files
            if name > after
            and name.startswith(prefix)
            and (recursive or "/" not in name[len(prefix) :])
        ]
        if not recursive:
            found.extend(
                name + "/"
                for name in self._dirs
                if name + "/" > after and name.startswith(prefix) and "/" not in name[len(prefix) :]
            )
        found.sort()
        page = [
            Info(name=k[:-1], type=DIRECTORY) if k.endswith("/") else _listed(self._files[k][1])
            for k in found[:limit]
        ]
        more = len(found) > limit
        return Page(entries=page, next_cursor=found[limit - 1] if more else None)

    async def delete(self, key: str) -> None:
        _check_key(key)
        if key in self._dirs:
            raise IsADirectoryError(errno.EISDIR, "is a directory", key)
        if self._files.pop(key, None) is None:
            raise FileNotFoundError(errno.ENOENT, "no such object", key)

    async def delete_prefix(self, key: str) -> int:
        _check_key(key)
        self._require_directory(key)
        prefix = f"{key}/"
        doomed = [name for name in self._files if name.startswith(prefix)]
        for name in doomed:
            del self._files[name]
        self._dirs -= {name for name in self._dirs if name.startswith(prefix)}
        self._dirs.discard(key)
        return len(doomed)

    async def move(self, src: str, dst: str) -> None:
        _check_key(src)
        _check_key(dst)
        if src not in self._files and src not in self._dirs:
            raise FileNotFoundError(errno.ENOENT, "no such object", src)
        if dst in self._files or dst in self._dirs:
            raise FileExistsError(errno.EEXIST, "destination exists", dst)
        for parent in _ancestors(dst):
            if parent in self._files:
                raise NotADirectoryError(errno.ENOTDIR, "a parent is a file", dst)
        if dst.startswith(f"{src}/"):
            raise OSError(errno.EINVAL, "cannot move a directory into itself", dst)
        self._dirs.update(_ancestors(dst))
        if src in self._files:
            data, info = self._files.pop(src)
            self._files[dst] = (data, dataclasses.replace(info, name=dst))
            return
        prefix = f"{src}/"
        for name in [name for name in self._files if name.startswith(prefix)]:
            data, info = self._files.pop(name)
            new = dst + name[len(src) :]
            self._files[new] = (data, dataclasses.replace(info, name=new))
        moved = {name for name in self._dirs if name == src or name.startswith(prefix)}
        self._dirs -= moved
        self._dirs.update(dst + name[len(src) :] for name in moved)

    async def mkdir(self, key: str) -> None:
        _check_key(key)
        if key in self._files:
            raise FileExistsError(errno.EEXIST, "a file is there", key)
        for parent in _ancestors(key):
            if parent in self._files:
                raise NotADirectoryError(errno.ENOTDIR, "a parent is a file", key)
        self._dirs.update(_ancestors(key))
        self._dirs.add(key)

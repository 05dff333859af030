"""Small JSON documents of the gateway's own in its storage (registry, sessions, usage
counters, the migration journal, audit batches): one way to give a backend a body held in
memory, to read one back whole, and to write one."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import orjson

from backends.base import Backend

_compact = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def encode(value: Any) -> bytes:
    """Compact JSON of ``value`` in UTF-8, by orjson (several times the standard library's
    speed: an access line, an audit record and a response body per request); what orjson
    refuses (a lone surrogate in a string) by the standard library."""
    try:
        return orjson.dumps(value)
    except TypeError:  # orjson.JSONEncodeError
        return _compact(value).encode(errors="surrogateescape")


def encode_text(value: Any) -> str:
    """``encode`` as text."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return _compact(value)


class DocumentTooLarge(ValueError):
    """A document larger than its reader accepts (someone else wrote it)."""


async def one(data: bytes) -> AsyncIterator[bytes]:
    """``data`` as the chunks a backend's ``write`` takes."""
    yield data


async def read_whole(backend: Backend, key: str, max_bytes: int | None = None) -> bytes | None:
    """Given a key, return its bytes, ``None`` if there is no file there; raise
    ``DocumentTooLarge`` if it holds more than ``max_bytes``."""
    try:
        reader = await backend.open_read(key)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    async with reader:
        if max_bytes is not None and reader.info.size > max_bytes:
            raise DocumentTooLarge(key)
        return b"".join([chunk async for chunk in reader.chunks()])


async def write_json(
    backend: Backend, key: str, doc: Any, *, exclusive: bool = False, sort_keys: bool = False
) -> None:
    """Write ``doc`` as compact JSON at ``key`` (``exclusive``: only if nothing is there)."""
    data = json.dumps(doc, separators=(",", ":"), sort_keys=sort_keys).encode()
    await backend.write(key, one(data), content_type="application/json", exclusive=exclusive)

"""Conditional requests and byte ranges for downloads (RFC 9110, sections 13 and 14)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import formatdate, parsedate_to_datetime
from typing import Final

from backends.base import Info

from .errors import PreconditionFailed, RangeNotSatisfiable

NOT_MODIFIED: Final = 304


def quote_etag(etag: str | None) -> str | None:
    return None if etag is None else f'"{etag}"'


def http_date(timestamp: float | None) -> str | None:
    return None if timestamp is None else _http_date(timestamp)


@functools.lru_cache(maxsize=4096)
def _http_date(timestamp: float) -> str:
    # Formatting a date cost more than the rest of the headers of a small download, and the
    # same objects (the same modification times) are read again and again.
    return formatdate(timestamp, usegmt=True)


def _parse_date(value: str) -> float | None:
    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _etag_list(value: str) -> list[str]:
    """Given an If-Match / If-None-Match value, return its entity tags (``W/`` kept)."""
    return [part.strip() for part in value.split(",") if part.strip()]


def _weak_match(tags: list[str], etag: str | None) -> bool:
    # RFC 9110, 8.8.3.2: If-None-Match uses the weak comparison.
    if etag is None:
        return False
    opaque = etag.removeprefix("W/")
    return any(tag == "*" or tag.removeprefix("W/") == opaque for tag in tags)


def _strong_match(tags: list[str], etag: str | None) -> bool:
    # RFC 9110, 13.1.1: If-Match uses the strong comparison.
    if etag is None or etag.startswith("W/"):
        return False
    return any(tag == "*" or tag == etag for tag in tags)


def evaluate(headers: Mapping[str, str], info: Info) -> int | None:
    """Given request headers and the object, return 304, raise 412, or return ``None``.

    The order is RFC 9110, section 13.2.2: If-Match, If-Unmodified-Since, If-None-Match,
    If-Modified-Since (the last only without If-None-Match). Used for GET and HEAD.
    """
    etag = quote_etag(info.etag)
    mtime = None if info.mtime is None else int(info.mtime)  # HTTP dates have whole seconds
    if_match = headers.get("If-Match")
    if if_match is not None:
        if not _strong_match(_etag_list(if_match), etag):
            raise PreconditionFailed("If-Match: the object's entity tag does not match")
    else:
        since = headers.get("If-Unmodified-Since")
        limit = None if since is None else _parse_date(since)
        if limit is not None and mtime is not None and mtime > limit:
            raise PreconditionFailed("If-Unmodified-Since: the object was modified since")
    if_none_match = headers.get("If-None-Match")
    if if_none_match is not None:
        return NOT_MODIFIED if _weak_match(_etag_list(if_none_match), etag) else None
    since = headers.get("If-Modified-Since")
    limit = None if since is None else _parse_date(since)
    if limit is not None and mtime is not None and mtime <= limit:
        return NOT_MODIFIED
    return None


@dataclass(frozen=True, slots=True)
class ByteRange:
    start: int
    end: int  # exclusive

    def content_range(self, size: int) -> str:
        return f"bytes {self.start}-{self.end - 1}/{size}"


def select_range(headers: Mapping[str, str], info: Info) -> ByteRange | None:
    """Given request headers and the object, return the one range to send, or ``None``.

    ``None`` means the whole object (200). A Range that is not a single ``bytes`` range, or
    whose If-Range does not match, is ignored as RFC 9110, 14.2 allows. A satisfiable-looking
    range past the end raises ``RangeNotSatisfiable`` (416).
    """
    value = headers.get("Range")
    if value is None:
        return None
    if_range = headers.get("If-Range")
    if if_range is not None and not _if_range_holds(if_range, info):
        return None
    unit, _, spec = value.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash or not (first.isdigit() or first == "") or not (last.isdigit() or last == ""):
        return None
    size = info.size
    if first == "":
        if last == "":
            return None
        suffix = int(last)
        if suffix == 0:
            raise RangeNotSatisfiable("the range is empty", size)
        return ByteRange(max(0, size - suffix), size) if size else _unsatisfiable(size)
    start = int(first)
    end = size if last == "" else min(int(last) + 1, size)
    if last != "" and int(last) < start:
        return None  # invalid range-spec: ignored (RFC 9110, 14.1.1)
    if start >= size:
        _unsatisfiable(size)
    return ByteRange(start, end)


def _unsatisfiable(size: int) -> ByteRange:
    raise RangeNotSatisfiable("the range starts past the end of the object", size)


def _if_range_holds(value: str, info: Info) -> bool:
    # RFC 9110, 13.1.5: an entity tag compares strongly; a date must equal Last-Modified.
    value = value.strip()
    if value.startswith('"') or value.startswith("W/"):
        return _strong_match([value], quote_etag(info.etag))
    when = _parse_date(value)
    return when is not None and info.mtime is not None and int(info.mtime) == int(when)

"""User metadata as every backend stores it: S3's rules, so an object moves between stores
unchanged (names are lowercased HTTP header tokens, at most ``MAX_METADATA_BYTES`` in all)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from .base import EMPTY_METADATA, MAX_METADATA_BYTES, metadata_size

# RFC 9110 section 5.6.2 token, lowercase: S3 carries each name in an x-amz-meta-* header.
_HEADER_TOKEN: Final = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+")


def normalise_metadata(metadata: Mapping[str, str] | None) -> Mapping[str, str]:
    """Given user metadata, return it read-only with lowercased names, or raise ``ValueError``
    for a name that is not a header token or for metadata over ``MAX_METADATA_BYTES``."""
    if not metadata:
        return EMPTY_METADATA
    if metadata_size(metadata) > MAX_METADATA_BYTES:
        raise ValueError(f"user metadata over {MAX_METADATA_BYTES} bytes")
    normalised: dict[str, str] = {}
    for name, value in metadata.items():
        lowered = name.lower()
        if not _HEADER_TOKEN.fullmatch(lowered):
            raise ValueError(f"metadata name {name!r} is not an HTTP header token")
        normalised[lowered] = value
    return MappingProxyType(normalised)

"""A Python client of the gateway: ``AsyncClient`` (aiohttp) and ``Client``, its synchronous
wrapper; the ``kestra`` fsspec protocol (``gateway.client.fs``); the ``gateway files`` CLI.

Example::

    from gateway.client import Client

    with Client("http://127.0.0.1:8080", tenant="acme", token="...") as client:
        client.upload("ns/flow/out.csv", "out.csv", content_type="text/csv")
        data = client.read("kestra:///ns/flow/out.csv", start=0, end=10)
"""

from ._async import (
    CHUNK,
    AsyncClient,
    Download,
    FileInfo,
    ObjectHeaders,
    Uploaded,
    range_header,
    to_key,
)
from ._sync import Client, SyncDownload
from .errors import (
    APIError,
    BadRequest,
    ChecksumMismatch,
    ClientError,
    Conflict,
    Forbidden,
    InvalidKey,
    NotFound,
    PayloadTooLarge,
    PreconditionFailed,
    RangeNotSatisfiable,
    TransportError,
    Unauthorized,
    Unavailable,
)

__all__ = [
    "CHUNK",
    "APIError",
    "AsyncClient",
    "BadRequest",
    "ChecksumMismatch",
    "Client",
    "ClientError",
    "Conflict",
    "Download",
    "FileInfo",
    "Forbidden",
    "InvalidKey",
    "NotFound",
    "ObjectHeaders",
    "PayloadTooLarge",
    "PreconditionFailed",
    "RangeNotSatisfiable",
    "SyncDownload",
    "TransportError",
    "Unauthorized",
    "Unavailable",
    "Uploaded",
    "range_header",
    "to_key",
]

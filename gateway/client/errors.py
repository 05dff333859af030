"""Errors the client raises: one class per answer of the gateway's API, and transport failures.

The gateway answers errors as JSON ``{"error": code, "message": text}`` (plus ``rule`` for a
refused key). :func:`from_answer` turns such an answer into the most specific class below,
keeping the code, the message and the rule; the status decides when the code is unknown.

Tree::

    ClientError
    ├── TransportError                  the gateway could not be reached or cut the connection
    │                                   (raised after the retries an operation allows)
    └── APIError (.status, .code, .message, .rule)
        ├── BadRequest (400)
        │   ├── InvalidKey (400 invalid_key, invalid_tenant; .rule names the broken rule)
        │   └── ChecksumMismatch (400 checksum_mismatch)
        ├── Unauthorized (401)
        ├── Forbidden (403)
        ├── NotFound (404)
        ├── Conflict (409)                  the destination exists; a directory is in the way
        ├── PreconditionFailed (412)        create-only upload of a key that exists
        ├── PayloadTooLarge (413)
        ├── RangeNotSatisfiable (416)
        └── Unavailable (503, 507)          the storage failed or is full; 503 is retried
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar, Final


class ClientError(Exception):
    """Base of every error this client raises."""


class TransportError(ClientError):
    """The gateway could not be reached, or the connection broke during an operation."""


class APIError(ClientError):
    """An error answer of the gateway (4xx, 5xx)."""

    status: ClassVar[int] = 0

    def __init__(
        self, message: str, *, status: int, code: str = "", rule: str | None = None
    ) -> None:
        super().__init__(f"{status} {code}: {message}" + (f" (rule {rule})" if rule else ""))
        self.message = message
        self.http_status = status
        self.code = code
        self.rule = rule


class BadRequest(APIError):
    status = 400


class InvalidKey(BadRequest):
    """A key or ``kestra://`` URI broke a rule of the gateway's key function (``.rule``)."""


class ChecksumMismatch(BadRequest):
    pass


class Unauthorized(APIError):
    status = 401


class Forbidden(APIError):
    status = 403


class NotFound(APIError):
    status = 404


class Conflict(APIError):
    status = 409


class PreconditionFailed(APIError):
    status = 412


class PayloadTooLarge(APIError):
    status = 413


class RangeNotSatisfiable(APIError):
    status = 416


class Unavailable(APIError):
    status = 503


# Error codes first (most specific), then the status.
_BY_CODE: Final[Mapping[str, type[APIError]]] = MappingProxyType(
    {
        "invalid_key": InvalidKey,
        "invalid_tenant": InvalidKey,
        "checksum_mismatch": ChecksumMismatch,
    }
)
_BY_STATUS: Final[Mapping[int, type[APIError]]] = MappingProxyType(
    {
        400: BadRequest,
        401: Unauthorized,
        403: Forbidden,
        404: NotFound,
        409: Conflict,
        412: PreconditionFailed,
        413: PayloadTooLarge,
        416: RangeNotSatisfiable,
        503: Unavailable,
        507: Unavailable,
    }
)


def from_answer(status: int, body: Any, reason: str = "") -> APIError:
    """Given an error answer's status and parsed JSON body (or anything else), return its error."""
    code = message = ""
    rule = None
    if isinstance(body, dict):
        code = str(body.get("error") or "")
        message = str(body.get("message") or "")
        rule = body.get("rule") if isinstance(body.get("rule"), str) else None
    cls = _BY_CODE.get(code) or _BY_STATUS.get(status) or APIError
    return cls(message or reason or "error", status=status, code=code, rule=rule)
